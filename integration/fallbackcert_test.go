package integration

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"path/filepath"
	"slices"
	"testing"
)

// TestFallbackCertificate: a client that asks for a name the edge has no
// certificate for (an alias such as smtp.example.com pointing at the edge,
// an IP address as the name) gets the first hostname's certificate, as
// Postfix and nginx serve theirs whatever the SNI: a client that verifies
// gets a name mismatch it can report, one that does not verify delivers.
// A connection policy's own fallback_sni wins.
//
// A name with a trailing dot is not among them: RFC 6066 forbids the dot in
// SNI and Go's TLS stack refuses such a ClientHello (decode_error) before
// any certificate is chosen. Go's own client, like curl, strips the dot, so
// such a client connects (tested below).
func TestFallbackCertificate(t *testing.T) {
	t.Parallel()
	sinkDir := filepath.Join(t.TempDir(), "mail")
	var listeners []listener
	var policyEdge listener
	proc := startCaddy(t, func() caddySetup {
		listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		policyEdge = listener{name: "own fallback_sni", mode: implicitTLS, addr: freeAddr(t)}
		sinkAddr := freeAddr(t)
		hosts := []string{firstHost, secondHost}
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{listeners[0].addr}, Hostnames: hosts, ImplicitTLS: true, Backend: sinkAddr},
					{Addrs: []string{listeners[1].addr}, Hostnames: hosts, Backend: sinkAddr},
					{Addrs: []string{policyEdge.addr}, Hostnames: hosts, ImplicitTLS: true, Backend: sinkAddr,
						Options: []string{"connection_policy {", "\tfallback_sni " + secondHost, "}"}},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{listeners[0].addr, listeners[1].addr, policyEdge.addr, sinkAddr},
			probe:     listeners[0],
			hostnames: hosts,
		}
	})

	// unverified: the client takes whatever certificate comes, and the test
	// checks which one it was
	unverified := func(serverName string) *tls.Config {
		return &tls.Config{ServerName: serverName, InsecureSkipVerify: true}
	}
	servedFor := func(t *testing.T, c interface {
		TLSConnectionState() (tls.ConnectionState, bool)
	}) []string {
		state, _ := c.TLSConnectionState()
		if len(state.PeerCertificates) == 0 {
			t.Fatal("no certificate served")
		}
		return state.PeerCertificates[0].DNSNames
	}

	for _, l := range listeners {
		for _, name := range []string{"smtp.example.com", "127.0.0.1"} {
			t.Run("Go-unverified/"+l.name+"/"+name, func(t *testing.T) {
				t.Parallel()
				cfg := unverified(name)
				if name == "127.0.0.1" {
					// Go never sends an IP address as SNI; openssl does (below)
					cfg.ServerName = ""
				}
				c := smtpClient(t, l, cfg)
				if got := servedFor(t, c); !slices.Contains(got, firstHost) {
					t.Errorf("certificate for %q, want %s's", got, firstHost)
				}
				token := uniqueToken(t)
				if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "to an alias")); err != nil {
					t.Fatalf("delivery: %v", err)
				}
				sinkMessage(t, sinkDir, token)
			})
		}
		t.Run("Go-verified-alias/"+l.name, func(t *testing.T) {
			t.Parallel()
			_, err := smtpClientErr(l, proc.tlsConfig("smtp.example.com"))
			var mismatch x509.HostnameError
			if !errors.As(err, &mismatch) {
				t.Fatalf("error %v, want a certificate name mismatch", err)
			}
			if !slices.Contains(mismatch.Certificate.DNSNames, firstHost) {
				t.Errorf("mismatched certificate is for %q, want %s's", mismatch.Certificate.DNSNames, firstHost)
			}
		})
		t.Run("Go-trailing-dot/"+l.name, func(t *testing.T) {
			t.Parallel()
			c := smtpClient(t, l, proc.tlsConfig(firstHost+"."))
			if got := servedFor(t, c); !slices.Contains(got, firstHost) {
				t.Errorf("certificate for %q, want %s's", got, firstHost)
			}
		})
		for _, name := range []string{"smtp.example.com", "127.0.0.1"} {
			t.Run("openssl/"+l.name+"/"+name, func(t *testing.T) {
				t.Parallel()
				openssl := requireTool(t, "openssl", "openssl")
				args := []string{"s_client", "-connect", l.addr, "-servername", name,
					"-CAfile", proc.rootPath(), "-crlf", "-ign_eof"}
				if l.mode == startTLS {
					args = append(args, "-starttls", "smtp")
				}
				// not verifying the name: a session
				out, err := runTool(t, []byte("QUIT\n"), openssl, args...)
				if err != nil {
					t.Fatalf("openssl s_client -servername %s: %v", name, err)
				}
				if !tpSessionThrough(out) {
					t.Errorf("no 221 from the backend: the session did not get through")
				}
				cert, err := firstPEMCertificate([]byte(out))
				if err != nil {
					t.Fatalf("the certificate openssl printed: %v", err)
				}
				if !slices.Contains(cert.DNSNames, firstHost) {
					t.Errorf("certificate for %q, want %s's", cert.DNSNames, firstHost)
				}
				// verifying the name: refused by the client
				verify := []string{"-verify_return_error", "-verify_hostname", name}
				if name == "127.0.0.1" {
					verify = []string{"-verify_return_error", "-verify_ip", name}
				}
				if _, err := runTool(t, []byte("QUIT\n"), openssl, append(args, verify...)...); err == nil {
					t.Errorf("openssl verifying %s accepted %s's certificate", name, firstHost)
				}
			})
		}
	}

	t.Run("policy's own fallback_sni", func(t *testing.T) {
		t.Parallel()
		c := smtpClient(t, policyEdge, unverified("smtp.example.com"))
		if got := servedFor(t, c); !slices.Contains(got, secondHost) {
			t.Errorf("certificate for %q, want %s's (the policy's fallback_sni)", got, secondHost)
		}
	})
}
