package integration

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// sinkEnv is a caddy with the three listeners of the quickstart (implicit
// TLS, and two STARTTLS ports on one route) in front of an smtp_sink in the
// same config, and a second pair of listeners in front of a second sink that
// only the accounting test uses.
type sinkEnv struct {
	proc      *caddyProc
	listeners []listener // submissions (implicit), submission, alt (STARTTLS)
	sinkDir   string

	acctListeners []listener
	acctDir       string
}

const (
	mainSinkMaxSize = 64 << 20
	acctSinkMaxSize = 256 << 10
)

func startSinkEnv(t *testing.T) *sinkEnv {
	dir := t.TempDir()
	env := &sinkEnv{
		sinkDir: filepath.Join(dir, "mail"),
		acctDir: filepath.Join(dir, "accounting"),
	}
	for _, d := range []string{env.sinkDir, env.acctDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	env.proc = startCaddy(t, func() caddySetup {
		env.listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
			{name: "alt", mode: startTLS, addr: freeAddr(t)},
		}
		env.acctListeners = []listener{
			{name: "acct-submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "acct-submission", mode: startTLS, addr: freeAddr(t)},
		}
		sinkAddr, acctSinkAddr := freeAddr(t), freeAddr(t)

		hosts := []string{firstHost, secondHost}
		cfg := caddyConfig{
			Edges: []edgeConfig{
				{Addrs: []string{env.listeners[0].addr}, Hostnames: hosts, ImplicitTLS: true, Backend: sinkAddr},
				{Addrs: []string{env.listeners[1].addr, env.listeners[2].addr}, Hostnames: hosts, Backend: sinkAddr},
				{Addrs: []string{env.acctListeners[0].addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Backend: acctSinkAddr},
				{Addrs: []string{env.acctListeners[1].addr}, Hostnames: []string{firstHost}, Backend: acctSinkAddr},
			},
			Sinks: []sinkConfig{
				{Addr: sinkAddr, Dir: env.sinkDir, MaxMessageSize: mainSinkMaxSize},
				{Addr: acctSinkAddr, Dir: env.acctDir, MaxMessageSize: acctSinkMaxSize},
			},
		}
		var addrs []string
		for _, l := range slices.Concat(env.listeners, env.acctListeners) {
			addrs = append(addrs, l.addr)
		}
		return caddySetup{
			config:    cfg,
			addrs:     append(addrs, sinkAddr, acctSinkAddr),
			probe:     env.listeners[0],
			hostnames: hosts,
		}
	})
	return env
}

// TestEdgeToSink runs the quickstart's shape: the edge on implicit TLS and
// two STARTTLS ports, in front of the smtp_sink handler.
func TestEdgeToSink(t *testing.T) {
	t.Parallel()
	env := startSinkEnv(t)

	for _, l := range env.listeners {
		t.Run("Delivery/"+l.name, func(t *testing.T) {
			t.Parallel()
			testDelivery(t, env, l)
		})
		for _, host := range []string{firstHost, secondHost} {
			t.Run("Certificate/"+l.name+"/SNI="+host, func(t *testing.T) {
				t.Parallel()
				testCertificateSNI(t, env, l, host)
			})
		}
		t.Run("Certificate/"+l.name+"/NoSNI", func(t *testing.T) {
			t.Parallel()
			testCertificateNoSNI(t, env, l)
		})
		t.Run("TLSVersion/"+l.name+"/TLS1.1-refused", func(t *testing.T) {
			t.Parallel()
			testTLS11Refused(t, env, l)
		})
		for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			t.Run("TLSVersion/"+l.name+"/"+strings.ReplaceAll(tls.VersionName(v), " ", ""), func(t *testing.T) {
				t.Parallel()
				testTLSVersion(t, env, l, v)
			})
		}
		t.Run("NoALPN/"+l.name, func(t *testing.T) {
			t.Parallel()
			testNoALPN(t, env, l)
		})
	}
	for _, l := range env.listeners[:2] {
		t.Run("LargeMessage8Bit/"+l.name, func(t *testing.T) {
			t.Parallel()
			testLargeMessage(t, env, l)
		})
	}
	for _, l := range []listener{env.listeners[0], env.listeners[2]} {
		t.Run("Pipelining/"+l.name, func(t *testing.T) {
			t.Parallel()
			testPipelining(t, env, l)
		})
	}
	t.Run("Accounting", func(t *testing.T) {
		t.Parallel()
		testAccounting(t, env)
	})

	// real tools
	for _, l := range env.listeners {
		t.Run("Swaks/"+l.name, func(t *testing.T) {
			t.Parallel()
			testSwaks(t, env, l)
		})
		t.Run("OpenSSL/"+l.name+"/TLS1.2", func(t *testing.T) {
			t.Parallel()
			testOpenSSL12(t, env, l)
		})
		t.Run("OpenSSL/"+l.name+"/TLS1.1-refused", func(t *testing.T) {
			t.Parallel()
			testOpenSSL11(t, env, l)
		})
		t.Run("Curl/"+l.name, func(t *testing.T) {
			t.Parallel()
			testCurl(t, env, l)
		})
	}
}

func testDelivery(t *testing.T, env *sinkEnv, l listener) {
	c := smtpClient(t, l, env.proc.tlsConfig(firstHost))
	state, _ := c.TLSConnectionState()
	if state.Version < tls.VersionTLS12 || len(state.VerifiedChains) == 0 {
		t.Fatalf("TLS %s, %d verified chains", tls.VersionName(state.Version), len(state.VerifiedChains))
	}
	token := uniqueToken(t)
	msg := testMessage(token, "delivered through "+l.name+" ("+l.mode.String()+")")
	if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
		t.Fatalf("sending: %v", err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	assertSameBytes(t, "the stored message", sinkMessage(t, env.sinkDir, token), msg)
}

// testCertificateSNI: with SNI, the edge serves the certificate of that
// name, issued by Caddy's local CA (crypto/tls verifies chain and name).
func testCertificateSNI(t *testing.T, env *sinkEnv, l listener, host string) {
	conn, err := dialTLS(l, env.proc.tlsConfig(host))
	if err != nil {
		t.Fatalf("verified TLS with SNI %s: %v", host, err)
	}
	defer conn.Close()
	state := conn.ConnectionState()
	leaf := state.PeerCertificates[0]
	if !slices.Equal(leaf.DNSNames, []string{host}) {
		t.Errorf("certificate names %q, want [%s]", leaf.DNSNames, host)
	}
	checkLocalCAChain(t, env.proc, state.VerifiedChains)
}

// checkLocalCAChain checks that a verified chain ends at the root in
// Caddy's data directory.
func checkLocalCAChain(t *testing.T, p *caddyProc, chains [][]*x509.Certificate) {
	t.Helper()
	rootPEM, err := os.ReadFile(p.rootPath())
	if err != nil {
		t.Fatal(err)
	}
	root, err := firstPEMCertificate(rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	for _, chain := range chains {
		if chain[len(chain)-1].Equal(root) {
			return
		}
	}
	t.Errorf("no verified chain ends at %s", p.rootPath())
}

// testCertificateNoSNI: a client that sends no SNI gets the first
// hostname's certificate, issued by Caddy's local CA.
func testCertificateNoSNI(t *testing.T, env *sinkEnv, l listener) {
	verified := false
	cfg := &tls.Config{
		ServerName:         "",   // no SNI
		InsecureSkipVerify: true, // crypto/tls cannot verify without a name; VerifyConnection does
		MinVersion:         tls.VersionTLS12,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if cs.ServerName != "" {
				return fmt.Errorf("the client sent SNI %q", cs.ServerName)
			}
			if err := env.proc.verifyLeaf(cs.PeerCertificates, firstHost); err != nil {
				return fmt.Errorf("certificate without SNI: %w (names %q)", err, cs.PeerCertificates[0].DNSNames)
			}
			verified = true
			return nil
		},
	}
	conn, err := dialTLS(l, cfg)
	if err != nil {
		t.Fatalf("TLS without SNI: %v", err)
	}
	defer conn.Close()
	if !verified {
		t.Fatal("VerifyConnection did not run")
	}
	if names := conn.ConnectionState().PeerCertificates[0].DNSNames; !slices.Equal(names, []string{firstHost}) {
		t.Errorf("certificate without SNI is for %q, want [%s]", names, firstHost)
	}
}

// testTLS11Refused: a TLS 1.1 client fails the handshake.
func testTLS11Refused(t *testing.T, env *sinkEnv, l listener) {
	cfg := env.proc.tlsConfig(firstHost)
	cfg.MinVersion = tls.VersionTLS10
	cfg.MaxVersion = tls.VersionTLS11
	conn, err := dialTLS(l, cfg)
	if err == nil {
		conn.Close()
		t.Fatalf("a TLS 1.1 client completed the handshake (%s)", tls.VersionName(conn.ConnectionState().Version))
	}
	if !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("TLS 1.1: got %v, want the server's protocol version alert", err)
	}
}

// testTLSVersion: TLS 1.2 and 1.3 clients get through, to the backend.
func testTLSVersion(t *testing.T, env *sinkEnv, l listener, version uint16) {
	cfg := env.proc.tlsConfig(firstHost)
	cfg.MinVersion, cfg.MaxVersion = version, version
	s := rawTLSSession(t, l, cfg)
	if got := s.conn.ConnectionState().Version; got != version {
		t.Fatalf("negotiated %s, want %s", tls.VersionName(got), tls.VersionName(version))
	}
	if l.mode == implicitTLS {
		if _, _, err := s.tp.ReadResponse(220); err != nil {
			t.Fatalf("greeting: %v", err)
		}
	}
	// the EHLO reply comes from the sink, not from the edge's dialogue
	lines := s.ehlo(t)
	if lines[0] == firstHost || hasExtension(lines, "STARTTLS") {
		t.Errorf("EHLO after TLS answered by the edge's plaintext dialogue: %q", lines)
	}
}

// testNoALPN: no ALPN protocol is negotiated, even when the client offers
// the HTTP ones.
func testNoALPN(t *testing.T, env *sinkEnv, l listener) {
	cfg := env.proc.tlsConfig(firstHost)
	cfg.NextProtos = []string{"h2", "http/1.1"}
	conn, err := dialTLS(l, cfg)
	if err != nil {
		t.Fatalf("TLS offering h2 and http/1.1: %v", err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "" {
		t.Errorf("negotiated ALPN %q on a mail port", p)
	}
}

// testLargeMessage: a 10 MB message with every byte value but CR and LF
// arrives byte for byte.
func testLargeMessage(t *testing.T, env *sinkEnv, l listener) {
	c := smtpClient(t, l, env.proc.tlsConfig(firstHost))
	if ok, _ := c.Extension("8BITMIME"); !ok {
		t.Errorf("EHLO after TLS does not list 8BITMIME")
	}
	token := uniqueToken(t)
	msg := eightBitMessage(token, 10<<20)
	if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
		t.Fatalf("sending %d bytes: %v", len(msg), err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	assertSameBytes(t, "the stored 10 MB message", sinkMessage(t, env.sinkDir, token), msg)
}

// eightBitMessage is a message of at least size bytes whose body has every
// byte value except CR and LF, in lines of 1 to 996 octets (plus CRLF), some
// of them starting with dots.
func eightBitMessage(token string, size int) []byte {
	var b bytes.Buffer
	b.Grow(size + 2048)
	b.WriteString("From: <sender@example.com>\r\n" +
		"To: <rcpt@example.com>\r\n" +
		"Subject: " + token + "\r\n" +
		"Message-ID: <" + token + "@client.localhost>\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: application/octet-stream\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n" +
		"\r\n" +
		".\r\n..\r\n.leading dot\r\n" +
		"Gr\xc3\xbc\xc3\x9fe, \xe4\xb8\x96\xe7\x95\x8c\r\n")
	v := 0
	for line := 0; b.Len() < size; line++ {
		n := 1 + (line*7919)%996
		for range n {
			c := byte(v)
			v++
			if c == '\r' || c == '\n' {
				c = byte(v)
				v++
			}
			b.WriteByte(c)
		}
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// testPipelining: after AUTH, MAIL, RCPT, RCPT and DATA in one write after
// TLS, the replies read afterwards; then the message and QUIT in one write.
func testPipelining(t *testing.T, env *sinkEnv, l listener) {
	s := rawTLSSession(t, l, env.proc.tlsConfig(firstHost))
	if l.mode == implicitTLS {
		if _, _, err := s.tp.ReadResponse(220); err != nil {
			t.Fatalf("greeting: %v", err)
		}
	}
	if lines := s.ehlo(t); !hasExtension(lines, "PIPELINING") {
		t.Fatalf("EHLO after TLS does not list PIPELINING: %q", lines)
	}
	s.authPlain(t)
	token := uniqueToken(t)
	msg := testMessage(token, "pipelined through "+l.name)
	commands := "MAIL FROM:<sender@example.com>\r\n" +
		"RCPT TO:<rcpt1@example.com>\r\n" +
		"RCPT TO:<rcpt2@example.com>\r\n" +
		"DATA\r\n"
	if _, err := s.conn.Write([]byte(commands)); err != nil {
		t.Fatal(err)
	}
	for i, code := range []int{250, 250, 250, 354} {
		if _, _, err := s.tp.ReadResponse(code); err != nil {
			t.Fatalf("reply %d to the pipelined commands: %v", i+1, err)
		}
	}
	if _, err := s.conn.Write(slices.Concat(msg, []byte(".\r\nQUIT\r\n"))); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.tp.ReadResponse(250); err != nil {
		t.Fatalf("end of data: %v", err)
	}
	if _, _, err := s.tp.ReadResponse(221); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	expectClosed(t, s.tp.R)
	assertSameBytes(t, "the stored message", sinkMessage(t, env.sinkDir, token), msg)
}

// testAccounting: several concurrent sessions through both accounting
// listeners; each message that got 250 is in the sink directory, once and
// byte for byte, and nothing else is: not the messages refused as too big,
// not the ones whose session died in the middle of DATA.
func testAccounting(t *testing.T, env *sinkEnv) {
	const (
		sessions    = 6
		perSession  = 8
		abandonings = 2
	)
	var (
		mu       sync.Mutex
		accepted = make(map[string][]byte) // token → message
		wg       sync.WaitGroup
	)
	cfg := env.proc.tlsConfig(firstHost)
	base := uniqueToken(t)

	for i := range sessions {
		l := env.acctListeners[i%len(env.acctListeners)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := smtpClientErr(l, cfg)
			if err != nil {
				t.Errorf("session %d (%s): %v", i, l.name, err)
				return
			}
			defer c.Close()
			if err := authenticate(c); err != nil {
				t.Errorf("session %d: %v", i, err)
				return
			}
			for j := range perSession {
				token := fmt.Sprintf("%s-s%d-m%d", base, i, j)
				body := strings.Repeat(fmt.Sprintf("line %d of %s\r\n", j, token), 1+(i*perSession+j)*37)
				msg := testMessage(token, body)
				err := deliver(c, "sender@example.com", []string{fmt.Sprintf("rcpt%d@example.com", j)}, msg)
				if err != nil {
					t.Errorf("session %d message %d: %v", i, j, err)
					return
				}
				mu.Lock()
				accepted[token] = msg
				mu.Unlock()

				if j == perSession/2 {
					// one message over the sink's size limit:
					// it must be refused and leave nothing
					token := fmt.Sprintf("%s-s%d-big", base, i)
					big := testMessage(token, strings.Repeat(strings.Repeat("y", 900)+"\r\n", acctSinkMaxSize/900+10))
					err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, big)
					if code := replyCode(err); code < 500 || code > 599 {
						t.Errorf("session %d: a message over max_message_size got %v, want a 5xx refusal", i, err)
						return
					}
					if err := c.Reset(); err != nil {
						t.Errorf("session %d: RSET after the refusal: %v", i, err)
						return
					}
				}
			}
			if err := c.Quit(); err != nil {
				t.Errorf("session %d: QUIT: %v", i, err)
			}
		}()
	}
	// sessions that die in the middle of DATA: no 250, so no file
	for i := range abandonings {
		l := env.acctListeners[i%len(env.acctListeners)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := smtpClientErr(l, cfg)
			if err != nil {
				t.Errorf("abandoned session %d (%s): %v", i, l.name, err)
				return
			}
			defer c.Close()
			if err := authenticate(c); err != nil {
				t.Errorf("abandoned session %d: %v", i, err)
				return
			}
			if err := c.Mail("sender@example.com"); err != nil {
				t.Errorf("abandoned session %d: MAIL: %v", i, err)
				return
			}
			if err := c.Rcpt("rcpt@example.com"); err != nil {
				t.Errorf("abandoned session %d: RCPT: %v", i, err)
				return
			}
			w, err := c.Data()
			if err != nil {
				t.Errorf("abandoned session %d: DATA: %v", i, err)
				return
			}
			token := fmt.Sprintf("%s-abandoned%d", base, i)
			_, _ = w.Write(testMessage(token, strings.Repeat("abandoned\r\n", 4000)))
			// close the connection without the final dot
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if len(accepted) != sessions*perSession {
		t.Fatalf("%d messages got 250, want %d", len(accepted), sessions*perSession)
	}

	// Every 250 was answered after the file was on disk, so the .eml
	// files are all there now. What the abandoned sessions left behind
	// (temporary files) the sink removes when it sees the connection
	// end, which happens after our close, asynchronously: wait, with a
	// bound, for the directory to hold nothing but .eml files.
	var others []string
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, others = readSinkDir(t, env.acctDir)
		if len(others) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling for the sink's cleanup
	}
	if len(others) > 0 {
		t.Errorf("the sink directory holds other files than .eml messages: %q", others)
	}

	stored, _ := readSinkDir(t, env.acctDir)
	if len(stored) != len(accepted) {
		t.Errorf("the sink holds %d messages, %d got 250", len(stored), len(accepted))
	}
	found := make(map[string]bool)
	for path, data := range stored {
		var token string
		for tok := range accepted {
			if bytes.Contains(data, []byte("Subject: "+tok+"\r\n")) {
				token = tok
				break
			}
		}
		if token == "" {
			t.Errorf("%s is no message that got 250 (%d bytes, starts %q)", path, len(data), head(data))
			continue
		}
		if found[token] {
			t.Errorf("%s: message %s is stored twice", path, token)
		}
		found[token] = true
		if !bytes.Equal(data, accepted[token]) {
			t.Errorf("%s: message %s differs from what was sent (%d bytes stored, %d sent)", path, token, len(data), len(accepted[token]))
		}
	}
	for token := range accepted {
		if !found[token] {
			t.Errorf("message %s got 250 and is not in the sink", token)
		}
	}
}

// readSinkDir returns the .eml files under dir (path → content) and the
// paths of all other files.
func readSinkDir(t *testing.T, dir string) (map[string][]byte, []string) {
	t.Helper()
	messages := make(map[string][]byte)
	var others []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while we walked
			}
			return err
		}
		if d.IsDir() {
			return nil
		}
		if !d.Type().IsRegular() || !strings.HasSuffix(d.Name(), ".eml") {
			others = append(others, path)
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		messages[path] = data
		return nil
	})
	if err != nil {
		t.Fatalf("reading the sink directory: %v", err)
	}
	return messages, others
}

// sinkMessage returns the one stored message that contains token. The
// message got 250, so it must be on disk already.
func sinkMessage(t *testing.T, dir, token string) []byte {
	t.Helper()
	messages, _ := readSinkDir(t, dir)
	var found []string
	var data []byte
	for path, content := range messages {
		if bytes.Contains(content, []byte(token)) {
			found = append(found, path)
			data = content
		}
	}
	switch len(found) {
	case 0:
		t.Fatalf("no .eml file in %s contains %s (%d messages there)", dir, token, len(messages))
	case 1:
	default:
		t.Fatalf("%d .eml files contain %s: %q", len(found), token, found)
	}
	return data
}

// assertSameBytes fails unless got and want are equal, and says where they
// first differ.
func assertSameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	from := max(0, i-32)
	t.Errorf("%s differs from what was sent: %d bytes, want %d; first difference at offset %d:\n got  %q\n want %q",
		what, len(got), len(want), i, got[from:min(len(got), i+32)], want[from:min(len(want), i+32)])
}

func head(b []byte) []byte { return b[:min(len(b), 80)] }
