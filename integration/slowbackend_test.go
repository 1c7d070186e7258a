package integration

import (
	"crypto/tls"
	"io"
	"net"
	netsmtp "net/smtp"
	"os"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// slowBackend is an SMTP server that takes its time to answer the final dot,
// as a backend running slow content filters does.
type slowBackend struct{ delay time.Duration }

func (b slowBackend) NewSession(*smtp.Conn) (smtp.Session, error) { return slowSession(b), nil }

type slowSession slowBackend

func (slowSession) Mail(string, *smtp.MailOptions) error { return nil }
func (slowSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (slowSession) Reset()                               {}
func (slowSession) Logout() error                        { return nil }

func (s slowSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	time.Sleep(s.delay) // the backend's slowness under test, not a wait of the test
	return nil
}

// TestSlowBackendFinalDot: a backend that answers the final dot after three
// minutes of silence still delivers through the edge with its default
// timeouts; the idle timeout is about silence, and RFC 5321 allows the
// server 10 minutes there. It takes three minutes, so it runs with the soak.
func TestSlowBackendFinalDot(t *testing.T) {
	if os.Getenv(soakEnv) != "1" {
		t.Skipf("runs with %s=1 (it takes three minutes)", soakEnv)
	}
	t.Parallel()
	const delay = 3 * time.Minute

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := smtp.NewServer(slowBackend{delay: delay})
	srv.Domain = "slow.localhost"
	srv.AllowInsecureAuth = true
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	edge := listener{name: "submissions", mode: implicitTLS}
	proc := startCaddy(t, func() caddySetup {
		edge.addr = freeAddr(t)
		return caddySetup{
			config: caddyConfig{Edges: []edgeConfig{{
				Addrs: []string{edge.addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Backend: ln.Addr().String(),
				// the test's slow backend offers no AUTH: this test is
				// about the wait for the final dot, not about AUTH
				Options: []string{"require_auth off"},
			}}},
			addrs:     []string{edge.addr},
			probe:     edge,
			hostnames: []string{firstHost},
		}
	})

	conn, err := tls.Dial("tcp", edge.addr, proc.tlsConfig(firstHost))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(delay + 2*time.Minute))
	c, err := netsmtp.NewClient(conn, firstHost)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(uniqueToken(t), "slow")); err != nil {
		t.Fatalf("after %s: %v", time.Since(start).Round(time.Second), err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
}
