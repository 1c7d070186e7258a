package integration

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The attack tests run against one caddy with short timeouts:
//   - guarded: STARTTLS, into a backend that must never see a connection
//     (nothing sent before TLS, or by a client that never gets TLS, may
//     reach a backend);
//   - implicit: implicit TLS, into the same untouched backend;
//   - session: STARTTLS, into an smtp_sink that has no TLS of its own;
//   - inside: STARTTLS, into a backend that records what it gets, for the
//     commands after TLS that the edge answers itself.
type attackEnv struct {
	proc      *caddyProc
	untouched *authBackend
	recorder  *authBackend
	guarded   listener
	implicit  listener
	session   listener
	inside    listener
	sinkDir   string
}

// Short enough to keep the tests fast, long enough for a loaded machine to
// finish a handshake well within them.
const attackTimeout = "2s"

func startAttackEnv(t *testing.T) *attackEnv {
	env := &attackEnv{untouched: startAuthBackend(t), recorder: startAuthBackend(t), sinkDir: filepath.Join(t.TempDir(), "mail")}
	if err := os.MkdirAll(env.sinkDir, 0o700); err != nil {
		t.Fatal(err)
	}
	timeouts := []string{"timeouts {", "command " + attackTimeout, "handshake " + attackTimeout, "idle " + attackTimeout, "}"}
	env.proc = startCaddy(t, func() caddySetup {
		env.guarded = listener{name: "guarded", mode: startTLS, addr: freeAddr(t)}
		env.implicit = listener{name: "implicit", mode: implicitTLS, addr: freeAddr(t)}
		env.session = listener{name: "session", mode: startTLS, addr: freeAddr(t)}
		env.inside = listener{name: "inside", mode: startTLS, addr: freeAddr(t)}
		sinkAddr := freeAddr(t)
		hosts := []string{firstHost}
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{env.guarded.addr}, Hostnames: hosts, Options: timeouts, Backend: env.untouched.addr},
					{Addrs: []string{env.implicit.addr}, Hostnames: hosts, ImplicitTLS: true, Options: timeouts, Backend: env.untouched.addr},
					{Addrs: []string{env.session.addr}, Hostnames: hosts, Options: timeouts, Backend: sinkAddr},
					{Addrs: []string{env.inside.addr}, Hostnames: hosts, Options: timeouts, Backend: env.recorder.addr},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: env.sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{env.guarded.addr, env.implicit.addr, env.session.addr, env.inside.addr, sinkAddr},
			probe:     env.session, // the probe must not touch env.untouched
			hostnames: hosts,
		}
	})
	return env
}

func TestAttacks(t *testing.T) {
	t.Parallel()
	env := startAttackEnv(t)

	t.Run("Injection", func(t *testing.T) {
		cases := []struct {
			name string
			ehlo bool     // EHLO first, on its own
			send []string // written one after the other, without reading
		}{
			{name: "one segment", ehlo: true, send: []string{"STARTTLS\r\nMAIL FROM:<attacker@example.com>\r\n"}},
			{name: "two segments", ehlo: true, send: []string{"STARTTLS\r\n", "MAIL FROM:<attacker@example.com>\r\n"}},
			{name: "bare LF", ehlo: true, send: []string{"STARTTLS\nMAIL FROM:<attacker@example.com>\n"}},
			{name: "after EHLO in the same segment", send: []string{"EHLO client.localhost\r\nSTARTTLS\r\nMAIL FROM:<attacker@example.com>\r\n"}},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				conn, r := dialPlain(t, env.guarded)
				if tc.ehlo {
					io.WriteString(conn, "EHLO client.localhost\r\n")
					if _, err := r.readReply(250); err != nil {
						t.Fatal(err)
					}
				}
				for _, s := range tc.send {
					if _, err := io.WriteString(conn, s); err != nil {
						t.Fatal(err)
					}
				}
				rest := readUntilClosed(t, conn)
				// allowed: the EHLO reply (same segment case), then a 421, or
				// the 220 to STARTTLS followed by a close without TLS; never a
				// reply to the injected MAIL
				for _, line := range scanLines(rest) {
					ok := strings.HasPrefix(line, "250") || strings.HasPrefix(line, "421 ") || line == "220 2.0.0 Ready to start TLS"
					if !ok {
						t.Errorf("unexpected reply %q in %q", line, rest)
					}
				}
				if env.untouched.conns.Load() != 0 {
					t.Errorf("the backend was contacted")
				}
			})
		}
	})

	// After TLS the edge itself answers what no backend should get: a
	// second STARTTLS (the recorder offers STARTTLS of its own), a
	// client's XCLIENT or XFORWARD (a forged identity), and mail commands
	// before AUTH (require_auth). The commands are sent in lower case, so
	// that the recorder's transcript (which has its own replies, in upper
	// case) shows whether it got them; each session goes on afterwards.
	t.Run("AfterTLS", func(t *testing.T) {
		session := func(t *testing.T) *rawSession {
			s := rawTLSSession(t, env.inside, env.proc.tlsConfig(firstHost))
			if lines := s.ehlo(t); hasExtension(lines, "STARTTLS") || hasExtension(lines, "XCLIENT") {
				t.Fatalf("EHLO inside TLS offers STARTTLS or XCLIENT: %q", lines)
			}
			return s
		}
		// goesOn checks that the session still works and that the
		// recorder has read every line sent before (it answers in order)
		goesOn := func(t *testing.T, s *rawSession) {
			t.Helper()
			if err := s.tp.PrintfLine("NOOP"); err != nil {
				t.Fatal(err)
			}
			if _, _, err := s.tp.ReadResponse(250); err != nil {
				t.Fatalf("the session broke after the refusal: %v", err)
			}
		}
		notAtBackend := func(t *testing.T, what string) {
			t.Helper()
			if env.recorder.transcriptContains(what) {
				t.Errorf("the backend got %q", what)
			}
		}

		t.Run("second STARTTLS", func(t *testing.T) {
			t.Parallel()
			s := session(t)
			s.send(t, "starttls")
			s.expectReply(t, "STARTTLS inside TLS", 503, "5.5.1")
			goesOn(t, s)
			notAtBackend(t, "starttls")
		})
		t.Run("XCLIENT and XFORWARD", func(t *testing.T) {
			t.Parallel()
			token := uniqueToken(t)
			s := session(t)
			s.send(t, "xclient ADDR=192.0.2.1 NAME="+token+"-xclient")
			s.expectReply(t, "XCLIENT", 502, "5.5.1")
			s.send(t, "xforward ADDR=192.0.2.1 NAME="+token+"-xforward")
			s.expectReply(t, "XFORWARD", 502, "5.5.1")
			goesOn(t, s)
			notAtBackend(t, token)
		})
		t.Run("pipelined mail before AUTH", func(t *testing.T) {
			t.Parallel()
			token := uniqueToken(t)
			s := session(t)
			// one write, as an RFC 2920 client sends it; the BDAT's
			// chunk is a QUIT that must stay a chunk (dropped), never
			// a command
			if _, err := io.WriteString(s.conn, "mail FROM:<"+token+"@example.com>\r\n"+
				"rcpt TO:<"+token+"-rcpt@example.com>\r\n"+
				"data\r\n"); err != nil {
				t.Fatal(err)
			}
			for _, what := range []string{"MAIL", "RCPT", "DATA"} {
				s.expectReply(t, what+" before AUTH", 530, "5.7.0")
			}
			s.send(t, "bdat 6 LAST\r\nQUIT")
			s.expectReply(t, "BDAT before AUTH", 530, "5.7.0")
			goesOn(t, s)
			notAtBackend(t, token)
			notAtBackend(t, "bdat")
		})
	})

	t.Run("Malformed", func(t *testing.T) {
		cases := []struct {
			name string
			send string
			want string // prefix of a reply line that must come before the close
		}{
			{name: "NUL bytes", send: "\x00\x00NOOP\x00\r\n", want: "500 5.5.2"},
			{name: "8-bit bytes", send: "\xff\xfe\x80\x81\r\n", want: "500 5.5.2"},
			{name: "100 KB line", send: strings.Repeat("A", 100<<10) + "\r\n", want: "500 5.5.6"},
			{name: "10000 empty lines", send: strings.Repeat("\r\n", 10000), want: "421 4.7.0"},
			{name: "lone CR", send: "\r", want: "421 4.4.2"},
			{name: "HTTP request", send: "GET / HTTP/1.1\r\nHost: mail.localhost\r\n\r\n", want: "500 5.5.2"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				conn, _ := dialPlain(t, env.guarded)
				// the edge may close while a large write is in flight
				go io.WriteString(conn, tc.send)
				rest := readUntilClosed(t, conn)
				if !strings.Contains("\n"+rest, "\n"+tc.want) {
					t.Errorf("got %q, want a %q reply before the close", rest, tc.want)
				}
				if env.untouched.conns.Load() != 0 {
					t.Errorf("the backend was contacted")
				}
			})
		}

		t.Run("ClientHello to the STARTTLS port", func(t *testing.T) {
			t.Parallel()
			conn := dialRaw(t, env.guarded.addr)
			if err := tls.Client(conn, env.proc.tlsConfig(firstHost)).Handshake(); err == nil {
				t.Fatal("a TLS handshake succeeded on the STARTTLS port without STARTTLS")
			}
		})

		t.Run("plaintext to the implicit TLS port", func(t *testing.T) {
			t.Parallel()
			conn := dialRaw(t, env.implicit.addr)
			io.WriteString(conn, "EHLO client.localhost\r\n")
			rest := readUntilClosed(t, conn)
			if strings.Contains(rest, "250") || strings.Contains(rest, "220") {
				t.Errorf("the implicit TLS port answered plaintext: %q", rest)
			}
		})
	})

	t.Run("Slow", func(t *testing.T) {
		t.Run("a byte at a time before TLS", func(t *testing.T) {
			t.Parallel()
			conn, _ := dialPlain(t, env.guarded)
			stop := make(chan struct{})
			defer close(stop)
			go func() {
				ticker := time.NewTicker(300 * time.Millisecond) // the slow client's pace, not a wait
				defer ticker.Stop()
				for i := 0; i < 100; i++ {
					select {
					case <-stop:
						return
					case <-ticker.C:
						if _, err := conn.Write([]byte{"NOOP"[i%4]}); err != nil {
							return
						}
					}
				}
			}()
			rest := readUntilClosed(t, conn)
			if !strings.HasPrefix(rest, "421 4.4.2 ") {
				t.Errorf("got %q, want a 421 4.4.2 timeout", rest)
			}
		})
		t.Run("stalled STARTTLS handshake", func(t *testing.T) {
			t.Parallel()
			conn, r := dialPlain(t, env.guarded)
			io.WriteString(conn, "STARTTLS\r\n")
			if _, err := r.readReply(220); err != nil {
				t.Fatal(err)
			}
			conn.Write([]byte{0x16, 0x03}) // the start of a ClientHello, then nothing
			if rest := readUntilClosed(t, conn); rest != "" {
				t.Errorf("got %q before the close", rest)
			}
		})
		t.Run("stalled implicit TLS handshake", func(t *testing.T) {
			t.Parallel()
			conn := dialRaw(t, env.implicit.addr)
			conn.Write([]byte{0x16, 0x03}) // the start of a ClientHello, then nothing
			if rest := readUntilClosed(t, conn); rest != "" {
				t.Errorf("got %q before the close", rest)
			}
		})
		t.Run("silent client on the implicit TLS port", func(t *testing.T) {
			t.Parallel()
			// taken for a STARTTLS client (detect_tls): greeted in
			// plaintext after the wait, then held to the command timeout
			conn := dialRaw(t, env.implicit.addr)
			rest := readUntilClosed(t, conn)
			if !strings.HasPrefix(rest, "220 ") || !strings.Contains(rest, "\n421 4.4.2 ") {
				t.Errorf("got %q, want the greeting and a 421 4.4.2 timeout", rest)
			}
		})
		t.Run("silent session after TLS", func(t *testing.T) {
			t.Parallel()
			s := rawTLSSession(t, env.session, env.proc.tlsConfig(firstHost))
			s.ehlo(t)
			code, msg, err := s.tp.ReadResponse(421)
			if err != nil || !strings.HasPrefix(msg, "4.4.2 ") {
				t.Fatalf("after silence: %d %q (%v), want 421 4.4.2", code, msg, err)
			}
			expectClosed(t, s.conn)
		})
	})

	// after all that, the edge still serves
	c := smtpClient(t, env.session, env.proc.tlsConfig(firstHost))
	token := uniqueToken(t)
	msg := testMessage(token, "after the attacks")
	if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
		t.Fatalf("a normal session after the attacks: %v", err)
	}
	c.Quit()
	assertSameBytes(t, "the stored message", sinkMessage(t, env.sinkDir, token), msg)
	if env.untouched.conns.Load() != 0 {
		t.Errorf("the guarded backend was contacted %d times", env.untouched.conns.Load())
	}
}

// send writes line and CRLF.
func (s *rawSession) send(t *testing.T, line string) {
	t.Helper()
	if err := s.tp.PrintfLine("%s", line); err != nil {
		t.Fatal(err)
	}
}

// expectReply reads a reply and fails unless it has code and starts with
// the enhanced status code enhanced.
func (s *rawSession) expectReply(t *testing.T, what string, code int, enhanced string) {
	t.Helper()
	got, msg, err := s.tp.ReadResponse(code)
	if err != nil || !strings.HasPrefix(msg, enhanced+" ") {
		t.Fatalf("%s: %d %q (%v), want %d %s", what, got, msg, err, code, enhanced)
	}
}

// dialRaw connects to addr, with a deadline of ioTimeout; the connection is
// closed at the end of the test.
func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	return conn
}

// dialPlain connects to a STARTTLS listener and reads the greeting.
func dialPlain(t *testing.T, l listener) (net.Conn, *unbufferedLineReader) {
	t.Helper()
	conn := dialRaw(t, l.addr)
	r := &unbufferedLineReader{r: conn}
	if _, err := r.readReply(220); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	return conn, r
}

// readUntilClosed reads everything until the edge closes the connection,
// and fails if it stays open for ioTimeout.
func readUntilClosed(t *testing.T, conn net.Conn) string {
	t.Helper()
	var buf bytes.Buffer
	_, err := io.Copy(&buf, conn)
	if err != nil && isTimeout(err) {
		t.Fatalf("the connection stayed open (read %q)", buf.String())
	}
	return buf.String()
}
