package integration

import (
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/smtp"
	"net/textproto"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Postfix told who the client is by XCLIENT (the listener of
// examples/postfix/master.cf that names the edge in
// smtpd_authorized_xclient_hosts), and Postfix made an open relay by
// permit_mynetworks behind an edge that requires AUTH.

// edgeSpec is one listener of startEdges: a mode, the way it relays, the
// Postfix listener it relays to and the smtp block's extra option lines.
type edgeSpec struct {
	listener
	via     relayWay
	backend string
	options []string
	// proxyProtocol, when set, is the PROXY version the edge sends: with
	// the smtp handler's proxy_protocol, or caddy-l4 proxy's
	proxyProtocol string
}

// startEdges starts one caddy with an edge for each spec (their addresses
// are filled in), probing the first one for readiness.
func startEdges(t *testing.T, specs []*edgeSpec) *caddyProc {
	t.Helper()
	return startCaddy(t, func() caddySetup {
		var servers strings.Builder
		var addrs []string
		for _, s := range specs {
			s.addr = freeAddr(t)
			addrs = append(addrs, s.addr)
			var lines []string
			if s.mode == implicitTLS {
				lines = append(lines, "implicit_tls")
			}
			if s.via == viaBackend {
				lines = append(lines, "backend "+s.backend)
				if s.proxyProtocol != "" {
					lines = append(lines, "proxy_protocol "+s.proxyProtocol)
				}
			}
			lines = append(lines, s.options...)
			block := ""
			if len(lines) > 0 {
				block = " {\n\t\t\t\t\t" + strings.Join(lines, "\n\t\t\t\t\t") + "\n\t\t\t\t}"
			}
			proxy := ""
			if s.via == viaProxy {
				proxy = "\n\t\t\t\tproxy " + s.backend
				if s.proxyProtocol != "" {
					proxy += " {\n\t\t\t\t\tproxy_protocol " + s.proxyProtocol + "\n\t\t\t\t}"
				}
			}
			fmt.Fprintf(&servers, "\n\t\t%s {\n\t\t\troute {\n\t\t\t\tsmtp %s%s%s\n\t\t\t}\n\t\t}",
				s.addr, firstHost, block, proxy)
		}
		return caddySetup{
			caddyfile: "{\n\tadmin off\n\tskip_install_trust\n\tdebug\n\n\tlayer4 {" +
				servers.String() + "\n\t}\n}\n",
			addrs:     addrs,
			probe:     specs[0].listener,
			hostnames: []string{firstHost},
		}
	})
}

// postfixNoXClientListener is a listener like the example's XCLIENT one, but
// without smtpd_authorized_xclient_hosts (empty by default): Postfix does not
// offer XCLIENT to the edge.
const postfixNoXClientListener = ` inet n - n - - smtpd
  -o syslog_name=postfix/no-xclient
  -o smtpd_tls_security_level=none
  -o smtpd_tls_auth_only=no
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
`

// Postfix's names for the sessions of the example's XCLIENT listener and of
// postfixOpenRelayListener (their syslog_name).
const (
	xclientSyslog   = "postfix/submission-xclient"
	openRelaySyslog = "postfix/open-relay"
)

func TestPostfixXClient(t *testing.T) {
	noXClientAddr := freeAddr(t)
	env := startPostfixBackends(t, noXClientAddr+postfixNoXClientListener)
	edges := map[relayWay][]*edgeSpec{}
	var specs []*edgeSpec
	for _, way := range relayWays {
		for _, s := range []*edgeSpec{
			{listener{name: "submissions", mode: implicitTLS}, way, env.xclientAddr, []string{"xclient"}, ""},
			{listener{name: "submission", mode: startTLS}, way, env.xclientAddr, []string{"xclient"}, ""},
			{listener{name: "submissions", mode: implicitTLS}, way, noXClientAddr, []string{"xclient"}, ""},
		} {
			edges[way] = append(edges[way], s)
			specs = append(specs, s)
		}
	}
	proc := startEdges(t, specs)

	// The control: Postfix takes XCLIENT from 127.0.0.1, the edge's
	// address, whoever sends it. Through the edge a client's own XCLIENT
	// is refused below: the edge is what stops it.
	t.Run("a forged XCLIENT straight to Postfix is taken", func(t *testing.T) {
		testPostfixXClientDirect(t, env)
	})
	for w, way := range relayWays {
		t.Run(string(way), func(t *testing.T) {
			for i, s := range edges[way][:2] {
				t.Run("client address and HELO/"+s.mode.String(), func(t *testing.T) {
					testPostfixXClientAddress(t, env, proc, s.listener)
				})
				if i == 0 {
					// one per way: the edge's auth_guard delays each
					// further failure for the account
					t.Run("wrong password/"+s.mode.String(), func(t *testing.T) {
						testPostfixXClientWrongPassword(t, env, proc, s.listener, wayIP(w, 11))
					})
				}
			}
			t.Run("a client's XCLIENT and XFORWARD get 502", func(t *testing.T) {
				testPostfixXClientForged(t, env, proc, edges[way][0].listener, wayIP(w, 13))
			})
			t.Run("backend without XCLIENT for the edge", func(t *testing.T) {
				testPostfixXClientNotAuthorized(t, proc, edges[way][2].listener, wayIP(w, 14))
			})
		})
	}
}

// rawClient is an SMTP session through an edge written line by line, for
// what net/smtp cannot do: another EHLO name after STARTTLS than before it,
// and commands it does not have.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	tp   *textproto.Conn
}

// dialLines connects to l from localIP and completes TLS (implicit, or with
// EHLO heloBefore and STARTTLS before it) and the greeting; the caller sends
// the EHLO after TLS.
func dialLines(t *testing.T, l listener, cfg *tls.Config, localIP, heloBefore string) *rawClient {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	conn, err := d.Dial("tcp", l.addr)
	if err != nil {
		t.Fatalf("%s (%s) from %s: %v", l.name, l.addr, localIP, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	c := &rawClient{t: t, conn: conn, tp: textproto.NewConn(conn)}
	if l.mode == startTLS {
		c.expect("", 220)
		c.expect("EHLO "+heloBefore, 250)
		c.expect("STARTTLS", 220)
	}
	tlsConn := tls.Client(conn, cfg)
	if err := tlsConn.Handshake(); err != nil {
		t.Fatalf("%s: TLS handshake: %v", l.name, err)
	}
	c.conn, c.tp = tlsConn, textproto.NewConn(tlsConn)
	if l.mode == implicitTLS {
		c.expect("", 220)
	}
	return c
}

// cmd sends line (nothing when it is empty: the greeting) and returns the
// reply.
func (c *rawClient) cmd(line string) (int, string) {
	c.t.Helper()
	if line != "" {
		if err := c.tp.PrintfLine("%s", line); err != nil {
			c.t.Fatalf("sending %q: %v", line, err)
		}
	}
	code, msg, err := c.tp.ReadResponse(0)
	if err != nil {
		c.t.Fatalf("the reply to %q: %v", line, err)
	}
	return code, msg
}

// expect sends line and fails the test unless the reply has code.
func (c *rawClient) expect(line string, code int) string {
	c.t.Helper()
	got, msg := c.cmd(line)
	if got != code {
		c.t.Fatalf("%q: %d %s, want %d", line, got, msg, code)
	}
	return msg
}

// send authenticates with AUTH PLAIN, sends a message with token, quits,
// and returns Postfix's queue ID for the message.
func (c *rawClient) send(token string) string {
	c.t.Helper()
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + postfixUser + "\x00" + postfixPassword))
	c.expect("AUTH PLAIN "+plain, 235)
	c.expect("MAIL FROM:<"+postfixUser+"@example.com>", 250)
	c.expect("RCPT TO:<rcpt@example.com>", 250)
	c.expect("DATA", 354)
	w := c.tp.DotWriter()
	if _, err := w.Write(testMessage(token, "through the edge into Postfix, with XCLIENT")); err != nil {
		c.t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		c.t.Fatal(err)
	}
	m := queuedAs.FindStringSubmatch(c.expect("", 250))
	if m == nil {
		c.t.Fatal("the reply to DATA names no queue ID")
	}
	c.expect("QUIT", 221)
	return m[1]
}

// testPostfixXClientDirect: the example's XCLIENT listener, reached straight
// from 127.0.0.1 (the edge's address, which it trusts), takes XCLIENT
// ADDR=1.2.3.4 and logs the session as from 1.2.3.4.
func testPostfixXClientDirect(t *testing.T, env *postfixBackends) {
	conn, err := net.DialTimeout("tcp", env.xclientAddr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	c := &rawClient{t: t, conn: conn, tp: textproto.NewConn(conn)}
	c.expect("", 220)
	if ehlo := c.expect("EHLO direct.localhost", 250); !hasExtension(strings.Split(ehlo, "\n"), "XCLIENT") {
		t.Fatalf("Postfix offers no XCLIENT to 127.0.0.1:\n%s", ehlo)
	}
	// XCLIENT's success reply is a fresh greeting (XCLIENT_README)
	c.expect("XCLIENT ADDR=1.2.3.4", 220)
	c.expect("EHLO forged.localhost", 250)
	c.expect("QUIT", 221)
	env.postfix.log.wait(t, regexp.MustCompile(regexp.QuoteMeta(xclientSyslog)+`/smtpd\[\d+\]: disconnect from \S*\[1\.2\.3\.4\]`))
}

// testPostfixXClientAddress: a client from 127.0.0.7 that says EHLO
// before-tls.localhost before STARTTLS and EHLO after-tls.localhost after TLS
// authenticates (Dovecot SASL) and sends a message; Postfix logs the
// session's login and its end for 127.0.0.7, and its Received: header names
// after-tls.localhost and 127.0.0.7: the address from the edge's XCLIENT,
// the HELO name from the client's own EHLO (the edge's EHLO, mail.localhost,
// is forgotten with XCLIENT).
func testPostfixXClientAddress(t *testing.T, env *postfixBackends, proc *caddyProc, l listener) {
	c := dialLines(t, l, proc.tlsConfig(firstHost), clientIP, "before-tls.localhost")
	ehlo := strings.Split(c.expect("EHLO after-tls.localhost", 250), "\n")
	for _, ext := range []string{"XCLIENT", "XFORWARD", "STARTTLS"} {
		if hasExtension(ehlo, ext) {
			t.Errorf("the EHLO reply after TLS offers %s:\n%s", ext, strings.Join(ehlo, "\n"))
		}
	}
	token := uniqueToken(t)
	queueID := c.send(token)

	checkReceived(t, env, token, queueID)
	received := messageHeader(t, env.sink.wait(t, token)).Values("Received")[0]
	if !strings.HasPrefix(received, "from after-tls.localhost (") {
		t.Errorf("Received: %q, want the client's HELO name after TLS, \"from after-tls.localhost (\"", received)
	}

	want := "[" + clientIP + "]"
	login := regexp.MustCompile(regexp.QuoteMeta(xclientSyslog) + `/smtpd\[(\d+)\]: ` + queueID +
		`: client=(\S+), sasl_method=PLAIN, sasl_username=` + postfixUser + `$`)
	m := env.postfix.log.wait(t, login)
	if !strings.HasSuffix(m[2], want) {
		t.Errorf("Postfix logged %q, want client=...%s", m[0], want)
	}
	// the session's disconnect line, after the login line, counts the
	// commands Postfix got: the edge's EHLO and XCLIENT, and the
	// client's EHLO after TLS, AUTH, MAIL, RCPT, DATA and QUIT (Postfix
	// 3.7 counts the XCLIENT it took as 0/1, a straight one too)
	disconnect := regexp.MustCompile(regexp.QuoteMeta(xclientSyslog) + `/smtpd\[` + m[1] + `\]: disconnect from (\S+) (.*)$`)
	var end []string
	afterLogin := false
	deadline := time.Now().Add(mtaLogTimeout)
	for end == nil {
		for _, line := range env.postfix.log.lines() {
			afterLogin = afterLogin || login.MatchString(line)
			if d := disconnect.FindStringSubmatch(line); afterLogin && d != nil {
				end = d
				break
			}
		}
		if end == nil && time.Now().After(deadline) {
			t.Fatalf("Postfix logged no end of session %s; log:\n%s", m[1], env.postfix.log.tail())
		}
		if end == nil {
			time.Sleep(50 * time.Millisecond) // polling interval, not synchronisation
		}
	}
	if !strings.HasSuffix(end[1], want) || !oneXClientSession.MatchString(end[2]) {
		t.Errorf("Postfix logged %q, want \"disconnect from ...%s\" and %s", end[0], want, oneXClientSession)
	}
	t.Logf("Postfix: %s\nReceived: %s", end[0], received)
}

// oneXClientSession is the command counts of Postfix's disconnect line for a
// session through the edge with xclient: the edge's EHLO and XCLIENT, then
// the client's EHLO, AUTH, MAIL, RCPT, DATA and QUIT, and nothing else.
// Postfix 3.7 counts an XCLIENT it took as 0/1 (one sent straight to it as
// well), a later Postfix may count it as 1.
var oneXClientSession = regexp.MustCompile(`ehlo=2 xclient=(?:0/)?1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=(?:7/)?8$`)

// testPostfixXClientWrongPassword: a wrong password through the XCLIENT
// listener gets Postfix's 535 5.7.8, and Dovecot checked it for the
// client's address, which Postfix passed on from XCLIENT.
func testPostfixXClientWrongPassword(t *testing.T, env *postfixBackends, proc *caddyProc, l listener, ip string) {
	c := dialLines(t, l, proc.tlsConfig(firstHost), ip, "client.localhost")
	c.expect("EHLO client.localhost", 250)
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + postfixUser + "\x00wrong"))
	if code, msg := c.cmd("AUTH PLAIN " + plain); code != 535 || !strings.HasPrefix(msg, "5.7.8 ") {
		t.Fatalf("AUTH PLAIN with a wrong password: %d %s, want Postfix's 535 5.7.8", code, msg)
	}
	env.dovecot.log.wait(t, dovecotPasswordMismatch(ip))
	c.expect("QUIT", 221)
}

// testPostfixXClientForged: through the edge, a client's XCLIENT ADDR=1.2.3.4
// and XFORWARD ADDR=1.2.3.4 get the edge's 502 5.5.1, and the session goes on
// as the client's own: Postfix counts one XCLIENT in the session (the
// edge's) and never logs 1.2.3.4.
func testPostfixXClientForged(t *testing.T, env *postfixBackends, proc *caddyProc, l listener, ip string) {
	forged := env.postfix.log.count(regexp.MustCompile(`1\.2\.3\.4`))
	c := dialLines(t, l, proc.tlsConfig(firstHost), ip, "client.localhost")
	c.expect("EHLO client.localhost", 250)
	for _, cmd := range []string{"XCLIENT ADDR=1.2.3.4", "XFORWARD ADDR=1.2.3.4", "XCLIENT NAME=forged.example ADDR=1.2.3.4 LOGIN=" + postfixUser} {
		if code, msg := c.cmd(cmd); code != 502 || !strings.HasPrefix(msg, "5.5.1 ") {
			t.Errorf("%s through the edge: %d %s, want 502 5.5.1", cmd, code, msg)
		}
	}
	// AUTH, MAIL, RCPT, DATA and QUIT after the refusals
	token := uniqueToken(t)
	queueID := c.send(token)
	received := messageHeader(t, env.sink.wait(t, token)).Values("Received")[0]
	if !strings.Contains(received, "["+ip+"])") || !strings.Contains(received, " id "+queueID) {
		t.Errorf("Received: %q, want Postfix's line for queue ID %s from [%s]", received, queueID, ip)
	}
	env.postfix.log.wait(t, regexp.MustCompile(regexp.QuoteMeta(xclientSyslog)+`/smtpd\[\d+\]: disconnect from \S*\[`+
		regexp.QuoteMeta(ip)+`\] `+oneXClientSession.String()))
	if n := env.postfix.log.count(regexp.MustCompile(`1\.2\.3\.4`)); n != forged {
		t.Errorf("Postfix logged 1.2.3.4 in %d lines during the session; log:\n%s", n-forged, env.postfix.log.tail())
	}
}

// testPostfixXClientNotAuthorized: an edge with xclient in front of a Postfix
// listener that does not authorize it (no smtpd_authorized_xclient_hosts)
// answers the client 421 4.4.1 and closes, and caddy logs an Error for
// that client and the access line's outcome identity_refused.
func testPostfixXClientNotAuthorized(t *testing.T, proc *caddyProc, l listener, ip string) {
	c := dialLines(t, l, proc.tlsConfig(firstHost), ip, "client.localhost")
	code, msg := c.cmd("EHLO client.localhost")
	if code != 421 || !strings.HasPrefix(msg, "4.4.1 ") {
		t.Fatalf("EHLO: %d %s, want 421 4.4.1", code, msg)
	}
	if _, err := c.tp.ReadLine(); !errors.Is(err, io.EOF) {
		t.Errorf("after the 421: %v, want the connection closed", err)
	}
	proc.waitLogEntry(t, "an Error for "+ip, func(e map[string]any) bool {
		return logField(e, "level") == "error" && logField(e, "remote_ip") == ip && logField(e, "reason") != ""
	})
	proc.waitLogEntry(t, "the access line of "+ip, func(e map[string]any) bool {
		return logField(e, "remote_ip") == ip && logField(e, "outcome") == "identity_refused"
	})
}

// postfixOpenRelayListener is the classic accident (Mailu #1560, mailcow
// #733): Postfix's default relay restrictions, permit_mynetworks first,
// behind a proxy whose address is in mynetworks. No PROXY header and no
// XCLIENT: every session is from 127.0.0.1, the edge.
const postfixOpenRelayListener = ` inet n - n - - smtpd
  -o syslog_name=` + openRelaySyslog + `
  -o smtpd_tls_security_level=none
  -o smtpd_tls_auth_only=no
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_relay_restrictions=permit_mynetworks,permit_sasl_authenticated,reject
`

func TestPostfixOpenRelay(t *testing.T) {
	openRelayAddr := freeAddr(t)
	env := startPostfixBackends(t, openRelayAddr+postfixOpenRelayListener)
	edges := map[relayWay][]*edgeSpec{}
	var specs []*edgeSpec
	for _, way := range relayWays {
		for _, s := range []*edgeSpec{
			{listener{name: "submissions", mode: implicitTLS}, way, openRelayAddr, nil, ""},
			{listener{name: "submission", mode: startTLS}, way, openRelayAddr, []string{"require_auth off"}, ""},
			{listener{name: "submissions", mode: implicitTLS}, way, env.proxyAddr, []string{"require_auth off"}, "v2"},
		} {
			edges[way] = append(edges[way], s)
			specs = append(specs, s)
		}
	}
	proc := startEdges(t, specs)

	for _, way := range relayWays {
		t.Run(string(way), func(t *testing.T) {
			e := edges[way]
			t.Run("no MAIL without AUTH", func(t *testing.T) {
				testOpenRelayRefused(t, env, proc, e[0].listener)
			})
			t.Run("relayed after AUTH", func(t *testing.T) {
				c := dialFrom(t, e[0].listener, proc.tlsConfig(firstHost), "127.0.0.1")
				token := uniqueToken(t)
				queueID := sendThroughPostfix(t, c, smtp.PlainAuth("", postfixUser, postfixPassword, firstHost), token)
				env.sink.wait(t, token)
				env.postfix.log.wait(t, regexp.MustCompile(regexp.QuoteMeta(openRelaySyslog)+`/smtpd\[\d+\]: `+queueID+
					`: client=\S*\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=`+postfixUser+`$`))
			})
			// the control: the same Postfix relays for anyone once the
			// edge lets MAIL through without AUTH
			t.Run("require_auth off: relayed without AUTH", func(t *testing.T) {
				c := dialFrom(t, e[1].listener, proc.tlsConfig(firstHost), "127.0.0.1")
				token := uniqueToken(t)
				reply, err := deliverQueued(c, "anyone@example.com", []string{"rcpt@example.net"},
					testMessage(token, "relayed without AUTH"))
				if err != nil {
					t.Fatalf("without AUTH and require_auth off: %v, want the open relay's 250", err)
				}
				env.sink.wait(t, token)
				m := queuedAs.FindStringSubmatch(reply)
				if m == nil {
					t.Fatalf("the reply to DATA %q names no queue ID", reply)
				}
				env.postfix.log.wait(t, regexp.MustCompile(regexp.QuoteMeta(openRelaySyslog)+`/smtpd\[\d+\]: `+m[1]+
					`: client=\S*\[127\.0\.0\.1\]$`))
			})
			// the example's listener is the second lock: with the
			// edge's check off it refuses a client without AUTH itself
			t.Run("require_auth off: the example's listener refuses", func(t *testing.T) {
				c := dialFrom(t, e[2].listener, proc.tlsConfig(firstHost), "127.0.0.1")
				if err := c.Mail("anyone@example.com"); err != nil {
					t.Fatalf("MAIL: %v", err)
				}
				err := c.Rcpt("rcpt@example.net")
				if code := replyCode(err); code < 500 || code > 599 {
					t.Fatalf("RCPT without AUTH: %v, want Postfix's 5xx refusal", err)
				}
			})
		})
	}
}

// testOpenRelayRefused: without AUTH, MAIL, RCPT and DATA get the edge's 530
// 5.7.0, and Postfix gets none of them: its disconnect line for the session
// counts EHLO and QUIT only, and it opened no queue file.
func testOpenRelayRefused(t *testing.T, env *postfixBackends, proc *caddyProc, l listener) {
	session := regexp.MustCompile(regexp.QuoteMeta(openRelaySyslog) +
		`/smtpd\[\d+\]: disconnect from \S*\[127\.0\.0\.1\] ehlo=1 quit=1 commands=2$`)
	queued := regexp.MustCompile(regexp.QuoteMeta(openRelaySyslog) + `/smtpd\[\d+\]: [0-9A-Za-z]+: client=`)
	sessions, messages := env.postfix.log.count(session), env.postfix.log.count(queued)

	c := dialFrom(t, l, proc.tlsConfig(firstHost), "127.0.0.1")
	for _, cmd := range []string{"MAIL FROM:<anyone@example.com>", "RCPT TO:<rcpt@example.net>", "DATA"} {
		id, err := c.Text.Cmd("%s", cmd)
		if err != nil {
			t.Fatal(err)
		}
		c.Text.StartResponse(id)
		code, msg, err := c.Text.ReadResponse(0)
		c.Text.EndResponse(id)
		if err != nil || code != 530 || !strings.HasPrefix(msg, "5.7.0 ") {
			t.Fatalf("%s without AUTH: %d %s (%v), want the edge's 530 5.7.0", cmd, code, msg, err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	env.postfix.log.waitCount(t, session, sessions+1)
	if n := env.postfix.log.count(queued); n != messages {
		t.Errorf("Postfix opened %d queue files for the session without AUTH; log:\n%s", n-messages, env.postfix.log.tail())
	}
}
