package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Helpers for tests that get the edge's certificates from a real ACME
// server: Pebble (Let's Encrypt's ACME test server, Debian package
// `pebble`), run by the test on loopback ports, in "always valid" mode so
// that no challenge has to reach caddy.

const (
	// pebbleStartTimeout bounds Pebble's start (it answers in well under a
	// second).
	pebbleStartTimeout = 30 * time.Second
)

// pebbleCA is a running Pebble.
type pebbleCA struct {
	dir         string // its config, TLS certificate and log
	dirURL      string // the ACME directory: acme_ca
	mgmtURL     string // the management interface
	tlsCertPath string // the CA of Pebble's own HTTPS certificate: acme_ca_root
	logPath     string
	tlsRoots    *x509.CertPool // trusts tlsCertPath, for talking to Pebble

	// roots trusts Pebble's issuing root (/roots/0) and nothing else; the
	// edge must send the intermediate itself.
	roots        *x509.CertPool
	root         *x509.Certificate
	intermediate *x509.Certificate // /intermediates/0, which signs the leaves

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// pebbleOptions are the settings a test may change.
type pebbleOptions struct {
	// validity is the lifetime of the certificates Pebble issues
	// (certificateValidityPeriod); zero is Pebble's default (5 years).
	validity time.Duration
}

// startPebble starts Pebble on free loopback ports with a TLS certificate
// of its own made here, waits until its ACME directory answers, and fetches
// its issuing root and intermediate. It skips the test (fails it under
// SMTP_EDGE_REQUIRE_TOOLS=1) when pebble is not installed. Pebble is
// stopped when t's cleanup runs; its log is printed if t failed.
func startPebble(t *testing.T, opts pebbleOptions) *pebbleCA {
	t.Helper()
	bin := requireTool(t, "pebble", "pebble")
	dir := t.TempDir()
	certPath, keyPath := filepath.Join(dir, "pebble-tls.pem"), filepath.Join(dir, "pebble-tls.key")
	tlsRoots := writePebbleTLSCert(t, certPath, keyPath)

	const attempts = 3
	for attempt := 1; ; attempt++ {
		p, err := startPebbleOnce(t, bin, dir, attempt, certPath, keyPath, tlsRoots, opts)
		if err == nil {
			return p
		}
		if attempt < attempts && p.portInUse() {
			t.Logf("pebble could not bind a port (attempt %d); retrying with new ports: %v", attempt, err)
			continue
		}
		t.Fatalf("pebble did not become ready: %v", err)
	}
}

func startPebbleOnce(t *testing.T, bin, dir string, attempt int, certPath, keyPath string,
	tlsRoots *x509.CertPool, opts pebbleOptions) (*pebbleCA, error) {
	t.Helper()
	listen, mgmt := freeAddr(t), freeAddr(t)
	_, httpPort, _ := net.SplitHostPort(freeAddr(t))
	_, tlsPort, _ := net.SplitHostPort(freeAddr(t))
	p := &pebbleCA{
		dir:         dir,
		dirURL:      "https://" + listen + "/dir",
		mgmtURL:     "https://" + mgmt,
		tlsCertPath: certPath,
		logPath:     filepath.Join(dir, fmt.Sprintf("pebble-%d.log", attempt)),
		tlsRoots:    tlsRoots,
		exited:      make(chan struct{}),
	}
	// httpPort and tlsPort are where Pebble's VA would validate challenges;
	// in always-valid mode it contacts nothing, but the ports stay on
	// loopback-only free ports anyway.
	hp, _ := strconv.Atoi(httpPort)
	tp, _ := strconv.Atoi(tlsPort)
	cfg := map[string]any{
		"pebble": map[string]any{
			"listenAddress":                  listen,
			"managementListenAddress":        mgmt,
			"certificate":                    certPath,
			"privateKey":                     keyPath,
			"httpPort":                       hp,
			"tlsPort":                        tp,
			"ocspResponderURL":               "",
			"externalAccountBindingRequired": false,
			"certificateValidityPeriod":      uint64(opts.validity / time.Second),
		},
	}
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	configPath := filepath.Join(dir, fmt.Sprintf("pebble-config-%d.json", attempt))
	if err := os.WriteFile(configPath, data, 0o600); err != nil {
		t.Fatal(err)
	}

	logFile, err := os.Create(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	// -dnsserver: Pebble's VA resolves nothing in always-valid mode; should
	// it ever try, it asks a loopback port where nothing answers.
	_, dnsPort, _ := net.SplitHostPort(freeAddr(t))
	p.cmd = exec.Command(bin, "-config", configPath, "-dnsserver", "127.0.0.1:"+dnsPort)
	p.cmd.Dir = dir
	p.cmd.Env = append(environWithout("PEBBLE_VA_ALWAYS_VALID", "PEBBLE_VA_NOSLEEP", "PEBBLE_WFE_NONCEREJECT",
		"PEBBLE_AUTHZREUSE", "PEBBLE_ALTERNATE_ROOTS", "PEBBLE_CHAIN_LENGTH", "PEBBLE_VA_SLEEPTIME"),
		"PEBBLE_VA_ALWAYS_VALID=1", // no challenge has to reach caddy
		"PEBBLE_VA_NOSLEEP=1",
		"PEBBLE_WFE_NONCEREJECT=0", // no random badNonce errors
		"PEBBLE_AUTHZREUSE=0",      // every order is a new issuance
	)
	p.cmd.Stdout = logFile
	p.cmd.Stderr = logFile
	if err := p.cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("starting pebble: %v", err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		logFile.Close()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			out, _ := os.ReadFile(p.logPath)
			t.Logf("pebble config:\n%s\npebble output (%s):\n%s", data, p.logPath, out)
		}
	})

	if err := p.waitReady(); err != nil {
		p.stop(t)
		return p, err
	}
	return p, nil
}

// waitReady polls, within pebbleStartTimeout, until the ACME directory
// answers, then fetches the issuing root and intermediate.
func (p *pebbleCA) waitReady() error {
	deadline := time.Now().Add(pebbleStartTimeout)
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("pebble exited: %v", p.waitErr)
		default:
		}
		body, err := p.get(p.dirURL)
		if err == nil {
			var dir struct {
				NewOrder string `json:"newOrder"`
			}
			if err := json.Unmarshal(body, &dir); err != nil || dir.NewOrder == "" {
				return fmt.Errorf("%s is not an ACME directory: %q", p.dirURL, body)
			}
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not answering after %s: %v", p.dirURL, pebbleStartTimeout, err)
		}
		time.Sleep(50 * time.Millisecond) // polling interval of a readiness check
	}

	root, err := p.fetchCert("/roots/0")
	if err != nil {
		return err
	}
	intermediate, err := p.fetchCert("/intermediates/0")
	if err != nil {
		return err
	}
	if err := intermediate.CheckSignatureFrom(root); err != nil {
		return fmt.Errorf("pebble's intermediate is not signed by its root: %v", err)
	}
	p.root, p.intermediate = root, intermediate
	p.roots = x509.NewCertPool()
	p.roots.AddCert(root)
	return nil
}

// get fetches url from Pebble, trusting only Pebble's TLS certificate.
func (p *pebbleCA) get(url string) ([]byte, error) {
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Proxy:           nil, // loopback, never through a proxy
			TLSClientConfig: &tls.Config{RootCAs: p.tlsRoots, MinVersion: tls.VersionTLS12},
		},
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %q", url, resp.Status, body)
	}
	return body, nil
}

// fetchCert fetches one PEM certificate from the management interface.
func (p *pebbleCA) fetchCert(path string) (*x509.Certificate, error) {
	body, err := p.get(p.mgmtURL + path)
	if err != nil {
		return nil, err
	}
	cert, err := firstPEMCertificate(body)
	if err != nil {
		return nil, fmt.Errorf("%s%s: %v", p.mgmtURL, path, err)
	}
	return cert, nil
}

// portInUse reports whether Pebble exited because an address was taken.
func (p *pebbleCA) portInUse() bool {
	select {
	case <-p.exited:
	default:
		return false
	}
	out, _ := os.ReadFile(p.logPath)
	return strings.Contains(string(out), "address already in use")
}

// stop ends Pebble: SIGTERM, and SIGKILL if it has not exited within
// stopTimeout.
func (p *pebbleCA) stop(t *testing.T) { stopProcess(t, "pebble", p.cmd, p.exited) }

// issuedSerials returns the serials of every certificate Pebble has issued
// so far (its log's "Issued certificate serial ... for order ..." lines), in
// order, in lowercase hex without leading zeros.
func (p *pebbleCA) issuedSerials(t *testing.T) []string {
	t.Helper()
	out, err := os.ReadFile(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	var serials []string
	for _, line := range scanLines(string(out)) {
		// "Issued" in Debian's 2.4, "issued" in later Pebbles
		_, rest, ok := strings.Cut(strings.ToLower(line), "issued certificate serial ")
		if !ok {
			continue
		}
		hex, _, _ := strings.Cut(rest, " ")
		n, ok := new(big.Int).SetString(hex, 16)
		if !ok {
			t.Fatalf("pebble logged a serial that is not hex: %q", line)
		}
		serials = append(serials, n.Text(16)) // as serial() writes it: no leading zeros
	}
	return serials
}

// writePebbleTLSCert makes a self-signed CA certificate for Pebble's own
// HTTPS (127.0.0.1 and localhost), writes it and its key as PEM, and
// returns a pool that trusts it.
func writePebbleTLSCert(t *testing.T, certPath, keyPath string) *x509.CertPool {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "pebble test listener"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool
}

// verifyFromPebble checks that chain (leaf first, as the server sent it)
// is a certificate for host that Pebble issued: it verifies against
// Pebble's root alone, with only the intermediates the server sent, and the
// leaf's issuer is Pebble's intermediate.
func (p *pebbleCA) verifyFromPebble(chain []*x509.Certificate, host string) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	intermediates := x509.NewCertPool()
	for _, c := range chain[1:] {
		intermediates.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{
		DNSName:       host,
		Roots:         p.roots,
		Intermediates: intermediates,
	}); err != nil {
		return err
	}
	if err := chain[0].CheckSignatureFrom(p.intermediate); err != nil {
		return fmt.Errorf("the leaf is not signed by pebble's intermediate %q: %v", p.intermediate.Subject, err)
	}
	return nil
}
