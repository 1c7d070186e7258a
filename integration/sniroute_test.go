package integration

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestSNIRouting: one edge for two customer domains, each with its own
// certificate and its own mail server (sni_routes). A client of
// mail.localhost lands on backend A, a client of relay.localhost on backend
// B, after STARTTLS as well as with implicit TLS; a client without SNI, and
// one that asks for an alias the edge has no certificate for, land on the
// default (A) with the first hostname's certificate.
func TestSNIRouting(t *testing.T) {
	t.Parallel()
	dirA := filepath.Join(t.TempDir(), "a")
	dirB := filepath.Join(t.TempDir(), "b")
	var listeners []listener
	var sinkB string
	proc := startCaddy(t, func() caddySetup {
		listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		sinkA := freeAddr(t)
		sinkB = freeAddr(t)
		hosts := []string{firstHost, secondHost}
		// the test is about where sessions go, not about AUTH
		options := []string{"require_auth off", "sni " + secondHost + " {", "\tbackend " + sinkB, "}"}
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{listeners[0].addr}, Hostnames: hosts, ImplicitTLS: true, Backend: sinkA, Options: options},
					{Addrs: []string{listeners[1].addr}, Hostnames: hosts, Backend: sinkA, Options: options},
				},
				Sinks: []sinkConfig{
					{Addr: sinkA, Dir: dirA, MaxMessageSize: 1 << 20},
					{Addr: sinkB, Dir: dirB, MaxMessageSize: 1 << 20},
				},
			},
			addrs:     []string{listeners[0].addr, listeners[1].addr, sinkA, sinkB},
			probe:     listeners[0],
			hostnames: hosts,
		}
	})

	// the config's summary at start names the route
	routes := ""
	for _, e := range proc.logEntries(t) {
		if e["msg"] == "serving SMTP" {
			routes += fmt.Sprint(e["sni_routes"])
		}
	}
	if want := secondHost + ": " + sinkB; !strings.Contains(routes, want) {
		t.Errorf("'serving SMTP' lines name the routes %q, want %q", routes, want)
	}

	cases := []struct {
		name     string
		tls      *tls.Config
		certFor  string // the name the served certificate must cover
		want     string // the sink directory the message must be in
		notThere string
	}{
		{"mail.localhost", proc.tlsConfig(firstHost), firstHost, dirA, dirB},
		{"relay.localhost", proc.tlsConfig(secondHost), secondHost, dirB, dirA},
		{"relay.localhost in capitals", proc.tlsConfig("RELAY.localhost"), secondHost, dirB, dirA},
		{"no SNI", &tls.Config{InsecureSkipVerify: true}, firstHost, dirA, dirB},
		{"alias without a certificate", &tls.Config{ServerName: "smtp.example.com", InsecureSkipVerify: true}, firstHost, dirA, dirB},
	}
	for _, l := range listeners {
		for _, tc := range cases {
			t.Run(l.name+"/"+tc.name, func(t *testing.T) {
				t.Parallel()
				c := smtpClient(t, l, tc.tls)
				state, _ := c.TLSConnectionState()
				if len(state.PeerCertificates) == 0 || !slices.Contains(state.PeerCertificates[0].DNSNames, tc.certFor) {
					t.Fatalf("served a certificate for %v, want %s's", state.PeerCertificates[0].DNSNames, tc.certFor)
				}
				token := uniqueToken(t)
				if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, tc.name)); err != nil {
					t.Fatalf("delivery: %v", err)
				}
				_ = c.Quit()
				sinkMessage(t, tc.want, token)
				if stored := messagesWith(t, tc.notThere, token); stored != 0 {
					t.Errorf("the other backend stored it too (%d)", stored)
				}
			})
		}
	}
}

// messagesWith counts the stored messages in dir that contain token.
func messagesWith(t *testing.T, dir, token string) int {
	t.Helper()
	messages, _ := readSinkDir(t, dir)
	n := 0
	for _, data := range messages {
		if bytes.Contains(data, []byte(token)) {
			n++
		}
	}
	return n
}
