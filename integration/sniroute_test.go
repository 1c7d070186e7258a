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

// TestSNIRouting runs examples/sni-routing/Caddyfile itself: one edge for
// two customer domains, each with its own certificate and its own mail
// server (sni_routes), each server an smtp_sink that reads the PROXY header.
// A client of mail.localhost lands on backend A, a client of relay.localhost
// on backend B, after STARTTLS as well as with implicit TLS, each server
// learning the client's address from its route's header; a client without
// SNI, and one that asks for an alias the edge has no certificate for, land
// on the default (A) with the first hostname's certificate.
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
			{name: "submission 2525", mode: startTLS, addr: freeAddr(t)},
		}
		sinkA := freeAddr(t)
		sinkB = freeAddr(t)
		caddyfile := readExample(t, "sni-routing/Caddyfile", map[string]string{
			// debug: the sinks' "stored message" lines, which say who the
			// client was
			"\temail postmaster@example.com\n": "\tdebug\n\tadmin off\n\tskip_install_trust\n\temail postmaster@example.com\n",
			"\tlayer4 {\n":                     "\tlayer4 {" + proxySinkBlock(sinkA, dirA, "sink-a.localhost") + proxySinkBlock(sinkB, dirB, "sink-b.localhost"),
			"\t\t:465 {":                       "\t\t" + listeners[0].addr + " {",
			"\t\t:587 :2525 {":                 "\t\t" + listeners[1].addr + " " + listeners[2].addr + " {",
			"mail.a.example":                   firstHost,
			"mail.b.example":                   secondHost,
			"backend 10.0.1.21:10587":          "backend " + sinkA,
			"backend 10.0.2.21:10587":          "backend " + sinkB,
		})
		return caddySetup{
			caddyfile: caddyfile,
			addrs:     []string{listeners[0].addr, listeners[1].addr, listeners[2].addr, sinkA, sinkB},
			probe:     listeners[0],
			hostnames: []string{firstHost, secondHost},
		}
	})

	// the config's summary at start names the route, once per smtp block
	routes := 0
	for _, e := range proc.logEntries(t) {
		if e["msg"] == "serving SMTP" && strings.Contains(fmt.Sprint(e["sni_routes"]), secondHost+": "+sinkB) {
			routes++
		}
	}
	if routes != 2 {
		t.Errorf("%d 'serving SMTP' lines name the route %s: %s, want one per smtp block (2)", routes, secondHost, sinkB)
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
	for i, l := range listeners {
		for j, tc := range cases {
			// each session from a loopback address of its own, for the
			// server to name
			clientIP := fmt.Sprintf("127.0.8.%d", 10*i+j+1)
			t.Run(l.name+"/"+tc.name, func(t *testing.T) {
				t.Parallel()
				c, err := smtpClientFrom(l, tc.tls, clientIP)
				if err != nil {
					t.Fatalf("%s: %v", l.name, err)
				}
				defer c.Close()
				state, _ := c.TLSConnectionState()
				if len(state.PeerCertificates) == 0 || !slices.Contains(state.PeerCertificates[0].DNSNames, tc.certFor) {
					t.Fatalf("served a certificate for %v, want %s's", state.PeerCertificates[0].DNSNames, tc.certFor)
				}
				token := uniqueToken(t)
				if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, tc.name)); err != nil {
					t.Fatalf("delivery: %v", err)
				}
				_ = c.Quit()
				sinkMessage(t, tc.want, token)
				if stored := messagesWith(t, tc.notThere, token); stored != 0 {
					t.Errorf("the other backend stored it too (%d)", stored)
				}
				// the edge connects from 127.0.0.1: a server that names
				// clientIP read it from the route's PROXY header
				proc.waitLogEntry(t, "the server's line for the message from "+clientIP, func(e map[string]any) bool {
					return logField(e, "msg") == "stored message" && strings.HasPrefix(logField(e, "remote"), clientIP+":")
				})
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
