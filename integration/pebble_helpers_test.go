package integration

import (
	"bytes"
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
	"mime"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
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
	dirURL      string // the ACME directory, through the recorder: acme_ca
	ownDirURL   string // the ACME directory on Pebble's own listener
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

	recorder *acmeRecorder
}

// pebbleOptions are the settings a test may change.
type pebbleOptions struct {
	// validity is the lifetime of the certificates Pebble issues
	// (certificateValidityPeriod); zero is Pebble's default (5 years).
	validity time.Duration
}

// startPebble starts Pebble on free loopback ports with a TLS certificate
// of its own made here, waits until its ACME directory answers, fetches
// its issuing root and intermediate, and puts an acmeRecorder in front of
// its ACME listener (dirURL). It skips the test (fails it under
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
			p.recorder = startACMERecorder(t, p.ownDirURL, certPath, keyPath, tlsRoots)
			p.dirURL = p.recorder.dirURL
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
		ownDirURL:   "https://" + listen + "/dir",
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
		body, err := p.get(p.ownDirURL)
		if err == nil {
			var dir struct {
				NewOrder string `json:"newOrder"`
			}
			if err := json.Unmarshal(body, &dir); err != nil || dir.NewOrder == "" {
				return fmt.Errorf("%s is not an ACME directory: %q", p.ownDirURL, body)
			}
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not answering after %s: %v", p.ownDirURL, pebbleStartTimeout, err)
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
// to caddy so far, as the recorder saw them go by, in order, as serial()
// writes them.
func (p *pebbleCA) issuedSerials(t *testing.T) []string {
	t.Helper()
	return p.recorder.serials(t)
}

// acmeRecorder is an HTTPS reverse proxy in front of Pebble's ACME
// listener, with Pebble's own TLS certificate, through which caddy talks to
// Pebble. It counts issuance by the ACME protocol instead of by the wording
// of Pebble's log: it records the first certificate of every response of
// media type application/pem-certificate-chain, the certificate download
// that ends an issuance (RFC 8555 7.4.2). The Host header goes to Pebble as
// caddy sent it, so the URLs Pebble hands out lead back through the proxy.
type acmeRecorder struct {
	dirURL string

	mu      sync.Mutex
	issued  []string // serials, in the order of issuance, each once
	badBody []string // certificate downloads that held no certificate
}

func startACMERecorder(t *testing.T, pebbleDirURL, certPath, keyPath string, pebbleRoots *x509.CertPool) *acmeRecorder {
	t.Helper()
	target, err := url.Parse(pebbleDirURL)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		t.Fatal(err)
	}
	transport := &http.Transport{
		Proxy:           nil, // loopback, never through a proxy
		TLSClientConfig: &tls.Config{RootCAs: pebbleRoots, MinVersion: tls.VersionTLS12},
	}
	r := new(acmeRecorder)
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(&url.URL{Scheme: target.Scheme, Host: target.Host})
			pr.Out.Host = pr.In.Host
		},
		Transport:      transport,
		ModifyResponse: r.record,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:           proxy,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: ioTimeout,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ServeTLS(ln, "", "")
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
		transport.CloseIdleConnections()
	})
	r.dirURL = "https://" + ln.Addr().String() + target.Path
	return r
}

// record notes the certificate in a certificate download.
func (r *acmeRecorder) record(resp *http.Response) error {
	mediaType, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if resp.StatusCode != http.StatusOK || mediaType != "application/pem-certificate-chain" {
		return nil
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	r.mu.Lock()
	defer r.mu.Unlock()
	leaf, err := firstPEMCertificate(body)
	if err != nil {
		r.badBody = append(r.badBody, fmt.Sprintf("%v: %q", err, body))
		return nil
	}
	if s := serial(leaf); !slices.Contains(r.issued, s) {
		r.issued = append(r.issued, s)
	}
	return nil
}

// serials returns the serials of the certificates downloaded so far.
func (r *acmeRecorder) serials(t *testing.T) []string {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, b := range r.badBody {
		t.Errorf("a certificate download from pebble held no certificate: %s", b)
	}
	return slices.Clone(r.issued)
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
