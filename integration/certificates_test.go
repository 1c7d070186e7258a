package integration

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// An HTTPS site of the same name in the same Caddyfile gets the very
// certificate the edge serves, obtained once.
func TestCertificateSharedWithHTTPSSite(t *testing.T) {
	t.Parallel()
	var edge listener
	var httpsAddr string
	proc := startCaddy(t, func() caddySetup {
		edge = listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
		httpAddr := freeAddr(t)
		httpsAddr = freeAddr(t)
		_, httpPort, _ := net.SplitHostPort(httpAddr)
		_, httpsPort, _ := net.SplitHostPort(httpsAddr)
		return caddySetup{
			caddyfile: fmt.Sprintf(`{
	admin off
	skip_install_trust
	debug
	http_port %s
	https_port %s
	default_bind 127.0.0.1
	layer4 {
		%s {
			route {
				smtp %s {
					implicit_tls
					backend %s
				}
			}
		}
	}
}

%s {
	respond "web"
}
`, httpPort, httpsPort, edge.addr, firstHost, freeAddr(t), firstHost),
			addrs:     []string{edge.addr, httpsAddr},
			probe:     edge,
			hostnames: []string{firstHost},
		}
	})
	edgeConn, err := dialTLS(edge, proc.tlsConfig(firstHost))
	if err != nil {
		t.Fatal(err)
	}
	defer edgeConn.Close()
	siteConn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp",
		httpsAddr, proc.tlsConfig(firstHost))
	if err != nil {
		t.Fatal(err)
	}
	defer siteConn.Close()

	edgeLeaf := edgeConn.ConnectionState().PeerCertificates[0]
	siteLeaf := siteConn.ConnectionState().PeerCertificates[0]
	if !bytes.Equal(edgeLeaf.Raw, siteLeaf.Raw) {
		t.Errorf("the edge and the HTTPS site serve different certificates (serials %s and %s)",
			edgeLeaf.SerialNumber, siteLeaf.SerialNumber)
	}
	if n := obtainedCount(t, proc, firstHost); n != 1 {
		t.Errorf("certificate for %s obtained %d times, want once", firstHost, n)
	}
}

// caddy adapt and caddy validate obtain no certificate: certificates are
// managed only when the config starts.
func TestAdaptAndValidateObtainNothing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	caddyfile := filepath.Join(dir, "Caddyfile")
	config := fmt.Sprintf(`{
	admin off
	skip_install_trust
	layer4 {
		%s {
			route {
				smtp %s mail.example.com {
					implicit_tls
					backend %s
				}
			}
		}
	}
}
`, freeAddr(t), firstHost, freeAddr(t))
	if err := os.WriteFile(caddyfile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	dataDir := filepath.Join(dir, "data")
	for _, command := range []string{"adapt", "validate"} {
		cmd := exec.Command(caddyBinary, command, "--config", caddyfile, "--adapter", "caddyfile")
		cmd.Dir = dir
		cmd.Env = append(environWithout("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"),
			"HOME="+filepath.Join(dir, "home"),
			"XDG_DATA_HOME="+dataDir,
			"XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("caddy %s: %v\n%s", command, err, out)
		}
		// a negative check on a log message, which a change of wording
		// could only weaken; the storage check below decides
		if bytes.Contains(out, []byte("obtaining certificate")) {
			t.Errorf("caddy %s started obtaining a certificate:\n%s", command, out)
		}
	}
	if _, err := os.Stat(filepath.Join(dataDir, "caddy", "certificates")); !os.IsNotExist(err) {
		t.Errorf("certificates were stored by adapt or validate (stat: %v)", err)
	}
}
