package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBackendFailover: the smtp handler's backend option with two
// addresses tries them in turn. With the first refusing connections (a
// closed loopback port) and the second an smtp_sink, a message sent through
// the edge arrives, and caddy's log warns about the first address; with
// both refusing, the client gets 421 4.4.1 (with implicit TLS right after
// the handshake, with STARTTLS in answer to the EHLO after it) and the
// connection closes.
func TestBackendFailover(t *testing.T) {
	t.Parallel()
	sinkDir := filepath.Join(t.TempDir(), "mail")
	if err := os.MkdirAll(sinkDir, 0o700); err != nil {
		t.Fatal(err)
	}
	var (
		failover, dead    []listener
		refused, refused2 string // nothing listens on these
		probe             listener
	)
	proc := startCaddy(t, func() caddySetup {
		failover = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		dead = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		// the readiness probe has a route of its own, so that the
		// failover routes' log entries are the test's sessions' only
		probe = listener{name: "probe", mode: implicitTLS, addr: freeAddr(t)}
		refused, refused2 = freeAddr(t), freeAddr(t)
		sinkAddr := freeAddr(t)
		hosts := []string{firstHost}
		twoAddrs := refused + " " + sinkAddr
		noAddrs := refused + " " + refused2
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{failover[0].addr}, Hostnames: hosts, ImplicitTLS: true, Backend: twoAddrs},
					{Addrs: []string{failover[1].addr}, Hostnames: hosts, Backend: twoAddrs},
					{Addrs: []string{dead[0].addr}, Hostnames: hosts, ImplicitTLS: true, Backend: noAddrs},
					{Addrs: []string{dead[1].addr}, Hostnames: hosts, Backend: noAddrs},
					{Addrs: []string{probe.addr}, Hostnames: hosts, ImplicitTLS: true, Backend: sinkAddr},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{failover[0].addr, failover[1].addr, dead[0].addr, dead[1].addr, probe.addr, sinkAddr},
			probe:     probe,
			hostnames: hosts,
		}
	})
	cfg := proc.tlsConfig(firstHost)

	// each session comes from a loopback address of its own, which finds
	// its entries in caddy's log
	for i, l := range failover {
		ip := fmt.Sprintf("127.0.0.%d", 41+i)
		t.Run("first refuses/"+l.mode.String(), func(t *testing.T) {
			t.Parallel()
			c := dialFrom(t, l, cfg, ip)
			token := uniqueToken(t)
			msg := testMessage(token, "through the second backend address")
			if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
				t.Fatalf("sending: %v", err)
			}
			if err := c.Quit(); err != nil {
				t.Errorf("QUIT: %v", err)
			}
			assertSameBytes(t, "the stored message", sinkMessage(t, sinkDir, token), msg)

			e := proc.waitLogEntry(t, "warning that "+refused+" was unreachable for "+ip,
				func(e map[string]any) bool {
					return logField(e, "msg") == "mail server unreachable; trying the next backend" &&
						logField(e, "remote_ip") == ip
				})
			if logField(e, "level") != "warn" || logField(e, "backend") != refused ||
				!strings.Contains(logField(e, "error"), "connection refused") {
				t.Errorf("log entry %v, want a warning for backend %s, connection refused", e, refused)
			}
			for _, e := range proc.logEntries(t) {
				if logField(e, "msg") == "mail server unavailable" && logField(e, "remote_ip") == ip {
					t.Errorf("the session that was delivered is logged as unavailable: %v", e)
				}
			}
		})
	}
	for i, l := range dead {
		ip := fmt.Sprintf("127.0.0.%d", 43+i)
		t.Run("all refuse/"+l.mode.String(), func(t *testing.T) {
			t.Parallel()
			conn, err := dialTLSFrom(l, cfg, ip)
			if err != nil {
				t.Fatalf("TLS: %v", err)
			}
			defer conn.Close()
			expectBackendUnavailable(t, conn, l.mode)

			// the first address was tried, then the second
			fromIP := func(msg string) func(map[string]any) bool {
				return func(e map[string]any) bool {
					return logField(e, "msg") == msg && logField(e, "remote_ip") == ip
				}
			}
			e := proc.waitLogEntry(t, "warning that "+refused+" was unreachable for "+ip,
				fromIP("mail server unreachable; trying the next backend"))
			if logField(e, "backend") != refused {
				t.Errorf("log entry %v, want the warning for the first address %s", e, refused)
			}
			e = proc.waitLogEntry(t, "saying the mail server was unavailable for "+ip, fromIP("mail server unavailable"))
			if msg := logField(e, "error"); logField(e, "level") != "warn" ||
				!strings.Contains(msg, refused) || !strings.Contains(msg, refused2) {
				t.Errorf("log entry %v, want a warning naming both addresses", e)
			}
		})
	}
}
