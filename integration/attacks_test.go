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
//   - session: STARTTLS, into an smtp_sink that has no TLS of its own.
type attackEnv struct {
	proc      *caddyProc
	untouched *authBackend
	guarded   listener
	implicit  listener
	session   listener
	sinkDir   string
}

// Short enough to keep the tests fast, long enough for a loaded machine to
// finish a handshake well within them.
const attackTimeout = "2s"

func startAttackEnv(t *testing.T) *attackEnv {
	env := &attackEnv{untouched: startAuthBackend(t), sinkDir: filepath.Join(t.TempDir(), "mail")}
	if err := os.MkdirAll(env.sinkDir, 0o700); err != nil {
		t.Fatal(err)
	}
	timeouts := []string{"timeouts {", "command " + attackTimeout, "handshake " + attackTimeout, "idle " + attackTimeout, "}"}
	env.proc = startCaddy(t, func() caddySetup {
		env.guarded = listener{name: "guarded", mode: startTLS, addr: freeAddr(t)}
		env.implicit = listener{name: "implicit", mode: implicitTLS, addr: freeAddr(t)}
		env.session = listener{name: "session", mode: startTLS, addr: freeAddr(t)}
		sinkAddr := freeAddr(t)
		hosts := []string{firstHost}
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{env.guarded.addr}, Hostnames: hosts, Options: timeouts, Backend: env.untouched.addr},
					{Addrs: []string{env.implicit.addr}, Hostnames: hosts, ImplicitTLS: true, Options: timeouts, Backend: env.untouched.addr},
					{Addrs: []string{env.session.addr}, Hostnames: hosts, Options: timeouts, Backend: sinkAddr},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: env.sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{env.guarded.addr, env.implicit.addr, env.session.addr, sinkAddr},
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

	t.Run("NoSecondSTARTTLS", func(t *testing.T) {
		t.Parallel()
		s := rawTLSSession(t, env.session, env.proc.tlsConfig(firstHost))
		lines := s.ehlo(t)
		if hasExtension(lines, "STARTTLS") {
			t.Fatalf("EHLO inside TLS offers STARTTLS: %q", lines)
		}
		if err := s.tp.PrintfLine("STARTTLS"); err != nil {
			t.Fatal(err)
		}
		code, msg, err := s.tp.ReadResponse(0)
		if code < 500 || code > 599 {
			t.Fatalf("STARTTLS inside TLS: %d %s (%v), want a 5xx", code, msg, err)
		}
		if err := s.tp.PrintfLine("NOOP"); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.tp.ReadResponse(250); err != nil {
			t.Fatalf("the session broke after the refused STARTTLS: %v", err)
		}
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
	if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
		t.Fatalf("a normal session after the attacks: %v", err)
	}
	c.Quit()
	assertSameBytes(t, "the stored message", sinkMessage(t, env.sinkDir, token), msg)
	if env.untouched.conns.Load() != 0 {
		t.Errorf("the guarded backend was contacted %d times", env.untouched.conns.Load())
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
