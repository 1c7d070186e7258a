package integration

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"io"
	"net"
	"net/smtp"
	"net/textproto"
	"slices"
	"strings"
	"testing"
	"time"
)

// authEnv is a caddy whose edges proxy to go-smtp backends in this process.
type authEnv struct {
	proc         *caddyProc
	backend      *authBackend // requires AUTH PLAIN
	listeners    []listener   // implicit TLS and STARTTLS, into backend
	injection    listener     // STARTTLS, into untouched
	untouched    *authBackend // must never see a connection
	downImplicit listener     // implicit TLS, into a port nobody listens on
	downSTARTTLS listener     // STARTTLS, into the same
}

func startAuthEnv(t *testing.T) *authEnv {
	env := &authEnv{
		backend:   startAuthBackend(t),
		untouched: startAuthBackend(t),
	}
	env.proc = startCaddy(t, func() caddySetup {
		env.listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		env.injection = listener{name: "injection", mode: startTLS, addr: freeAddr(t)}
		env.downImplicit = listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
		env.downSTARTTLS = listener{name: "submission", mode: startTLS, addr: freeAddr(t)}
		dead := freeAddr(t) // nothing listens here

		hosts := []string{firstHost}
		// the wrong passwords test the backend's 535 passing through, not
		// the password guard: no delay before it
		noDelay := []string{"auth_guard {", "delay off", "}"}
		return caddySetup{
			config: caddyConfig{Edges: []edgeConfig{
				{Addrs: []string{env.listeners[0].addr}, Hostnames: hosts, ImplicitTLS: true, Options: noDelay, Backend: env.backend.addr},
				{Addrs: []string{env.listeners[1].addr}, Hostnames: hosts, Options: noDelay, Backend: env.backend.addr},
				{Addrs: []string{env.injection.addr}, Hostnames: hosts, Backend: env.untouched.addr},
				{Addrs: []string{env.downImplicit.addr}, Hostnames: hosts, ImplicitTLS: true, Backend: dead},
				{Addrs: []string{env.downSTARTTLS.addr}, Hostnames: hosts, Backend: dead},
			}},
			addrs: []string{env.listeners[0].addr, env.listeners[1].addr, env.injection.addr,
				env.downImplicit.addr, env.downSTARTTLS.addr},
			// the probe must not touch env.untouched
			probe:     env.listeners[0],
			hostnames: hosts,
		}
	})
	return env
}

// TestEdgeToAuthBackend runs the edge in front of a backend that requires
// AUTH PLAIN, as a submission server does.
func TestEdgeToAuthBackend(t *testing.T) {
	t.Parallel()
	env := startAuthEnv(t)

	for _, l := range env.listeners {
		t.Run("AUTH/"+l.name, func(t *testing.T) {
			t.Parallel()
			testAuthAfterTLS(t, env, l)
		})
		t.Run("EHLOAfterTLS/"+l.name, func(t *testing.T) {
			t.Parallel()
			testEHLOAfterTLS(t, env, l)
		})
	}
	t.Run("NoAUTHBeforeTLS", func(t *testing.T) {
		t.Parallel()
		testNoAuthBeforeTLS(t, env, env.listeners[1])
	})
	t.Run("STARTTLSInjection", func(t *testing.T) {
		t.Parallel()
		testSTARTTLSInjection(t, env)
	})
	for _, l := range []listener{env.downImplicit, env.downSTARTTLS} {
		t.Run("BackendDown/"+l.name, func(t *testing.T) {
			t.Parallel()
			testBackendDown(t, env, l)
		})
	}
}

// testAuthAfterTLS: after TLS the backend's AUTH is offered and works; MAIL
// before AUTH gets the edge's 530 (require_auth) and never reaches the
// backend; the backend's own refusal of a wrong password reaches the client
// unchanged.
func testAuthAfterTLS(t *testing.T, env *authEnv, l listener) {
	token := uniqueToken(t)
	cfg := env.proc.tlsConfig(firstHost)

	c := smtpClient(t, l, cfg)
	if ok, mechs := c.Extension("AUTH"); !ok || !slices.Contains(strings.Fields(mechs), "PLAIN") {
		t.Fatalf("EHLO after TLS: AUTH = %q, %v; want it to offer PLAIN", mechs, ok)
	}
	early := "early-" + token + "@example.com"
	err := c.Mail(early)
	if !isReply(err, 530, "5.7.0") {
		t.Errorf("MAIL before AUTH: got %v, want the edge's 530 5.7.0", err)
	}
	if env.backend.transcriptContains(early) {
		t.Errorf("the backend got the MAIL sent before AUTH")
	}
	wrong := "wrong-" + token
	err = c.Auth(smtp.PlainAuth("", backendUser, wrong, firstHost))
	if replyCode(err) != 535 {
		t.Errorf("AUTH PLAIN with a wrong password: got %v, want 535", err)
	}
	if !env.backend.sawPassword(wrong) {
		t.Errorf("the backend never saw the wrong password: the 535 did not come from it")
	}

	c = smtpClient(t, l, cfg)
	if err := c.Auth(smtp.PlainAuth("", backendUser, backendPassword, firstHost)); err != nil {
		t.Fatalf("AUTH PLAIN %s/%s: %v", backendUser, backendPassword, err)
	}
	msg := testMessage(token, "authenticated submission through "+l.name)
	if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
		t.Fatalf("sending after AUTH: %v", err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}

	m, ok := env.backend.message(token)
	if !ok {
		t.Fatalf("the backend has no message with %s", token)
	}
	if m.user != backendUser || m.from != "sender@example.com" || !slices.Equal(m.to, []string{"rcpt@example.com"}) {
		t.Errorf("backend got user %q from %q to %q", m.user, m.from, m.to)
	}
	assertSameBytes(t, "the message at the backend", m.data, msg)
}

// testEHLOAfterTLS: the EHLO reply after TLS is the backend's own, with its
// real extensions, and never STARTTLS (which the backend does offer).
func testEHLOAfterTLS(t *testing.T, env *authEnv, l listener) {
	// control: the backend itself offers STARTTLS, so its absence at the
	// edge is the edge's doing
	direct, err := net.DialTimeout("tcp", env.backend.addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	_ = direct.SetDeadline(time.Now().Add(ioTimeout))
	tp := textproto.NewConn(direct)
	if _, _, err := tp.ReadResponse(220); err != nil {
		t.Fatalf("backend greeting: %v", err)
	}
	_ = tp.PrintfLine("EHLO control.localhost")
	_, msg, err := tp.ReadResponse(250)
	if err != nil {
		t.Fatalf("backend EHLO: %v", err)
	}
	if !hasExtension(strings.Split(msg, "\n"), "STARTTLS") {
		t.Fatalf("control: the backend does not offer STARTTLS itself: %q", msg)
	}

	s := rawTLSSession(t, l, env.proc.tlsConfig(firstHost))
	if l.mode == implicitTLS {
		// the backend's greeting is the first thing inside TLS
		_, greeting, err := s.tp.ReadResponse(220)
		if err != nil {
			t.Fatalf("greeting: %v", err)
		}
		if !strings.HasPrefix(greeting, backendDomain+" ") {
			t.Errorf("greeting %q is not the backend's", greeting)
		}
	}
	// STARTTLS: the backend's greeting was swallowed; the first reply is
	// the one to EHLO (ReadResponse(250) fails on a 220)
	lines := s.ehlo(t)
	t.Logf("EHLO after TLS:\n%s", strings.Join(lines, "\n"))
	// go-smtp's EHLO reply starts "250-Hello <client name>"; the edge's
	// own would start "250-mail.localhost"
	if lines[0] != "Hello client.localhost" {
		t.Errorf("first EHLO line %q is not the backend's", lines[0])
	}
	for _, ext := range []string{"PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING", "SIZE", "AUTH", "ENHANCEDSTATUSCODES"} {
		if !hasExtension(lines, ext) {
			t.Errorf("EHLO after TLS does not list %s", ext)
		}
	}
	if !slices.Contains(lines, "SIZE 20971520") {
		t.Errorf("EHLO after TLS does not relay the backend's SIZE 20971520")
	}
	if !slices.Contains(lines, "AUTH PLAIN") {
		t.Errorf("EHLO after TLS does not relay the backend's AUTH PLAIN")
	}
	for _, ext := range []string{"STARTTLS", "XCLIENT", "XFORWARD"} {
		if hasExtension(lines, ext) {
			t.Errorf("EHLO after TLS lists %s", ext)
		}
	}

	// the session works on from here: the relay kept the reply framing
	if err := s.tp.PrintfLine("NOOP"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.tp.ReadResponse(250); err != nil {
		t.Errorf("NOOP after EHLO: %v", err)
	}
}

// testNoAuthBeforeTLS: before STARTTLS the edge neither offers nor accepts
// AUTH, and the credentials never reach the backend.
func testNoAuthBeforeTLS(t *testing.T, env *authEnv, l listener) {
	token := uniqueToken(t)
	conn, err := net.DialTimeout("tcp", l.addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	r := &unbufferedLineReader{r: conn}
	send := func(line string) {
		t.Helper()
		if _, err := io.WriteString(conn, line+"\r\n"); err != nil {
			t.Fatalf("sending %q: %v", line, err)
		}
	}
	expectLines := func(what string, want ...string) {
		t.Helper()
		for _, w := range want {
			got, err := r.readLine()
			if err != nil {
				t.Fatalf("%s: reading %q: %v", what, w, err)
			}
			if got != w {
				t.Fatalf("%s: got %q, want %q", what, got, w)
			}
		}
	}

	expectLines("greeting", "220 "+firstHost+" ESMTP")
	send("EHLO client.localhost")
	expectLines("EHLO before TLS", "250-"+firstHost, "250-ENHANCEDSTATUSCODES", "250 STARTTLS")

	password := "pretls-" + token
	credentials := base64.StdEncoding.EncodeToString([]byte("\x00" + backendUser + "\x00" + password))
	send("AUTH PLAIN " + credentials)
	expectLines("AUTH PLAIN before TLS", "530 5.7.0 Must issue a STARTTLS command first")
	send("MAIL FROM:<" + token + "@example.com>")
	expectLines("MAIL before TLS", "530 5.7.0 Must issue a STARTTLS command first")

	// now TLS, and the session goes on to the backend, where AUTH works
	send("STARTTLS")
	expectLines("STARTTLS", "220 2.0.0 Ready to start TLS")
	tlsConn := tls.Client(conn, env.proc.tlsConfig(firstHost))
	if err := tlsConn.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	s := &rawSession{conn: tlsConn, tp: textproto.NewConn(tlsConn)}
	lines := s.ehlo(t)
	if !slices.Contains(lines, "AUTH PLAIN") {
		t.Errorf("EHLO after TLS does not offer AUTH PLAIN: %q", lines)
	}
	good := base64.StdEncoding.EncodeToString([]byte("\x00" + backendUser + "\x00" + backendPassword))
	_ = s.tp.PrintfLine("AUTH PLAIN %s", good)
	if _, _, err := s.tp.ReadResponse(235); err != nil {
		t.Errorf("AUTH PLAIN after TLS: %v", err)
	}
	_ = s.tp.PrintfLine("QUIT")
	if _, _, err := s.tp.ReadResponse(221); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	expectClosed(t, tlsConn)

	// the backend answered QUIT, so it has read everything it ever got
	// from this session
	if env.backend.sawPassword(password) {
		t.Errorf("the backend saw the password sent before TLS")
	}
	for _, s := range []string{credentials, token} {
		if env.backend.transcriptContains(s) {
			t.Errorf("the backend's transcript contains %q, sent before TLS", s)
		}
	}
}

// testSTARTTLSInjection: a command pipelined after STARTTLS (CVE-2011-0411)
// gets no TLS, and nothing reaches the backend.
func testSTARTTLSInjection(t *testing.T, env *authEnv) {
	token := uniqueToken(t)
	conn, err := net.DialTimeout("tcp", env.injection.addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	r := &unbufferedLineReader{r: conn}
	if _, err := r.readReply(220); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	if _, err := io.WriteString(conn, "EHLO client.localhost\r\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.readReply(250); err != nil {
		t.Fatalf("EHLO: %v", err)
	}

	if _, err := io.WriteString(conn, "STARTTLS\r\nMAIL FROM:<"+token+"@example.com>\r\n"); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(conn)
	if err != nil && isTimeout(err) {
		t.Fatalf("the connection stayed open after the injection (read %q)", rest)
	}
	t.Logf("after the injected command: %q (%v)", rest, err)
	for _, line := range scanLines(string(rest)) {
		if !strings.HasPrefix(line, "421 ") {
			t.Errorf("got %q; want nothing but a 421 before the close", line)
		}
	}
	if bytes.HasPrefix(rest, []byte("220")) || bytes.Contains(rest, []byte("\n220")) {
		t.Errorf("the edge agreed to start TLS: %q", rest)
	}
	if n := env.untouched.conns.Load(); n != 0 {
		t.Errorf("the backend got %d connections", n)
	}
	if env.untouched.transcriptContains(token) {
		t.Errorf("the injected command reached the backend")
	}
}

// testBackendDown: with no backend, the client gets 421 4.4.1 after TLS (as
// the answer to EHLO after STARTTLS; as the greeting with implicit TLS), and
// the connection closes.
func testBackendDown(t *testing.T, env *authEnv, l listener) {
	conn, err := dialTLS(l, env.proc.tlsConfig(firstHost))
	if err != nil {
		t.Fatalf("TLS: %v", err)
	}
	defer conn.Close()
	expectBackendUnavailable(t, conn, l.mode)
}

// expectBackendUnavailable reads the edge's 421 4.4.1 for a backend it
// could not reach, on a connection just after TLS: right away with implicit
// TLS, in answer to EHLO after STARTTLS; then the connection must close.
func expectBackendUnavailable(t *testing.T, conn *tls.Conn, mode tlsMode) {
	t.Helper()
	tp := textproto.NewConn(conn)
	if mode == startTLS {
		// the write may race with the edge's close; the reply is
		// what counts
		_ = tp.PrintfLine("EHLO client.localhost")
	}
	line, err := tp.ReadLine()
	if err != nil {
		t.Fatalf("reading the reply: %v", err)
	}
	if !strings.HasPrefix(line, "421 4.4.1 ") {
		t.Errorf("got %q, want a reply starting with 421 4.4.1", line)
	}
	expectClosed(t, tp.R)
}
