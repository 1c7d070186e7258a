// Package integration runs the SMTP edge end to end: a real caddy process
// built from ./cmd/caddy, real TLS clients (crypto/tls, net/smtp, go-smtp,
// swaks, openssl, curl) on loopback listeners, and real backends (the
// smtp_sink handler, and an AUTH-requiring go-smtp server in this process).
package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/smtp"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"
)

const (
	// firstHost is the first hostname of every edge: the one in the
	// greeting, and the certificate a client without SNI gets.
	firstHost = "mail.localhost"
	// secondHost is a second name of the same edge, with its own
	// certificate.
	secondHost = "relay.localhost"

	// requireToolsEnv makes a missing swaks, openssl or curl a failure
	// instead of a skip; CI sets it.
	requireToolsEnv = "SMTP_EDGE_REQUIRE_TOOLS"

	// Bounds that keep a broken edge from hanging the suite. They are
	// upper limits for things that take milliseconds, never a way to wait.
	startupTimeout = 60 * time.Second
	stopTimeout    = 10 * time.Second
	ioTimeout      = 60 * time.Second
)

// caddyBinary is the caddy built from ./cmd/caddy by TestMain.
var caddyBinary string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "caddy-smtp-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	defer os.RemoveAll(dir)

	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	bin := filepath.Join(dir, "caddy")
	build := exec.Command("go", "build", "-o", bin, "./cmd/caddy")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: building ./cmd/caddy: %v\n%s", err, out)
		return 1
	}
	caddyBinary = bin
	return m.Run()
}

// moduleRoot finds the directory of go.mod above the working directory (the
// package directory, when run by go test).
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// freeAddr returns a loopback address with a port that nothing listens on
// right now and that no other test of this process has been given. The port
// is below (or above) the kernel's ephemeral range, so that no outgoing
// connection (of the clients, of caddy's proxy) can take it between now and
// the moment caddy binds it. Another process may still take it: startCaddy
// retries with new ports when caddy cannot bind.
func freeAddr(t testing.TB) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	lo, hi := ephemeralRange()
	for range 1000 {
		// candidates: 10000..lo-1 and hi+1..65535
		below, above := max(0, lo-10000), max(0, 65535-hi)
		if below+above == 0 {
			break
		}
		n := rand.IntN(below + above)
		port := 10000 + n
		if n >= below {
			port = hi + 1 + (n - below)
		}
		if portsGiven[port] {
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		if err := ln.Close(); err != nil {
			continue
		}
		portsGiven[port] = true
		return addr
	}
	t.Fatal("found no free loopback port outside the ephemeral range")
	return ""
}

var (
	portsMu    sync.Mutex
	portsGiven = make(map[int]bool)
)

// ephemeralRange is the kernel's range of ports for outgoing connections.
func ephemeralRange() (lo, hi int) {
	lo, hi = 32768, 60999 // Linux's default
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(data))
	if len(f) != 2 {
		return lo, hi
	}
	a, err1 := strconv.Atoi(f[0])
	b, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || a < 1024 || b < a || b > 65535 {
		return lo, hi
	}
	return a, b
}

// tlsMode is how a listener starts TLS.
type tlsMode int

const (
	implicitTLS tlsMode = iota // TLS from the first byte (port 465 style)
	startTLS                   // plaintext dialogue, then STARTTLS (587/2525 style)
)

func (m tlsMode) String() string {
	if m == implicitTLS {
		return "implicit TLS"
	}
	return "STARTTLS"
}

// listener is one address of an smtp edge route.
type listener struct {
	name string // for test names: "submissions", "submission", "alt"
	mode tlsMode
	addr string
}

func (l listener) port() string {
	_, port, _ := net.SplitHostPort(l.addr)
	return port
}

// edgeConfig is one layer4 server block with an smtp handler that relays
// to Backend with its own backend option (the recommended configuration),
// or, with Proxy, an smtp handler followed by caddy-l4's proxy.
type edgeConfig struct {
	Addrs       []string
	Hostnames   []string
	ImplicitTLS bool
	Options     []string // extra lines inside the smtp block
	Backend     string   // the mail server: smtp's backend (addresses separated by spaces), or the proxy's upstream
	Proxy       bool     // relay through caddy-l4's proxy instead of smtp's backend option
}

// sinkConfig is one layer4 server block with the smtp_sink handler.
type sinkConfig struct {
	Addr           string
	Dir            string
	MaxMessageSize int64
}

type caddyConfig struct {
	Edges []edgeConfig
	Sinks []sinkConfig
}

var caddyfileTemplate = template.Must(template.New("Caddyfile").Funcs(template.FuncMap{
	"join":  strings.Join,
	"quote": strconv.Quote,
}).Parse(`{
	admin off
	skip_install_trust
	debug

	layer4 {
{{- range .Edges}}
		{{join .Addrs " "}} {
			route {
				smtp {{join .Hostnames " "}}{{if or .ImplicitTLS .Options (not .Proxy)}} {
{{- if .ImplicitTLS}}
					implicit_tls
{{- end}}
{{- if not .Proxy}}
					backend {{.Backend}}
{{- end}}
{{- range .Options}}
					{{.}}
{{- end}}
				}{{end}}
{{- if .Proxy}}
				proxy {{.Backend}}
{{- end}}
			}
		}
{{- end}}
{{- range .Sinks}}
		{{.Addr}} {
			route {
				smtp_sink {
					directory {{quote .Dir}}
					hostname sink.localhost
					max_message_size {{.MaxMessageSize}}
				}
			}
		}
{{- end}}
	}
}
`))

// caddyProc is a running caddy.
type caddyProc struct {
	dir     string // the test's directory: Caddyfile, log, HOME
	dataDir string // XDG_DATA_HOME; Caddy's storage is dataDir/caddy
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	roots   *x509.CertPool
}

// caddySetup describes one caddy: its config, the addresses to wait for,
// a listener of one of its edges whose backend need not work (the readiness
// probe), and the hostnames that need certificates.
type caddySetup struct {
	config    caddyConfig
	caddyfile string // used as it is instead of config, when set
	// roots, when set, are the CA certificates clients trust instead of
	// Caddy's local CA (a test ACME CA's roots, say)
	roots *x509.CertPool
	// editJSON, when set, edits the JSON that the Caddyfile adapts to, and
	// caddy runs that JSON: for what the Caddyfile cannot say (the TLS
	// app's session_tickets, say)
	editJSON  func(config map[string]any)
	addrs     []string
	probe     listener
	hostnames []string
}

// startEdgePair starts a caddy with an implicit TLS and a STARTTLS listener
// for mail.localhost, both into one smtp_sink that stores into sinkDir, each
// smtp block with the extra option lines; adjust, when set, changes the
// setup further. It returns the caddy and the two listeners.
func startEdgePair(t *testing.T, sinkDir string, options []string, adjust func(*caddySetup)) (*caddyProc, []listener) {
	t.Helper()
	var listeners []listener
	proc := startCaddy(t, func() caddySetup {
		listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		sinkAddr := freeAddr(t)
		setup := caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{listeners[0].addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Options: options, Backend: sinkAddr},
					{Addrs: []string{listeners[1].addr}, Hostnames: []string{firstHost}, Options: options, Backend: sinkAddr},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{listeners[0].addr, listeners[1].addr, sinkAddr},
			probe:     listeners[0],
			hostnames: []string{firstHost},
		}
		if adjust != nil {
			adjust(&setup)
		}
		return setup
	})
	return proc, listeners
}

// startCaddy writes a Caddyfile into a temporary directory of t, starts
// caddy on it, and waits until every address of the setup accepts
// connections and the probe listener completes a verified TLS handshake for
// every hostname. setup is called for the config; it is called again, for
// new ports, if caddy could not bind one of them. caddy is stopped when t's
// cleanup runs; if t failed, caddy's output is printed.
func startCaddy(t *testing.T, setup func() caddySetup) *caddyProc {
	t.Helper()
	if caddyBinary == "" {
		t.Fatal("no caddy binary (TestMain did not build it)")
	}
	const attempts = 3
	for attempt := 1; ; attempt++ {
		p, err := startCaddyOnce(t, setup())
		if err == nil {
			return p
		}
		if attempt < attempts && p.portInUse() {
			t.Logf("caddy could not bind a port (attempt %d); retrying with new ports: %v", attempt, err)
			continue
		}
		t.Fatalf("caddy did not become ready: %v", err)
	}
}

func startCaddyOnce(t *testing.T, setup caddySetup) (*caddyProc, error) {
	t.Helper()
	dir := t.TempDir()
	p := &caddyProc{
		dir:     dir,
		dataDir: filepath.Join(dir, "data"),
		logPath: filepath.Join(dir, "caddy.log"),
		exited:  make(chan struct{}),
	}
	home := filepath.Join(dir, "home")
	configDir := filepath.Join(dir, "config")
	for _, d := range []string{home, p.dataDir, configDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}

	var caddyfile bytes.Buffer
	if setup.caddyfile != "" {
		caddyfile.WriteString(setup.caddyfile)
	} else if err := caddyfileTemplate.Execute(&caddyfile, setup.config); err != nil {
		t.Fatalf("writing the Caddyfile: %v", err)
	}
	caddyfilePath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(caddyfilePath, caddyfile.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}

	logFile, err := os.Create(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	env := append(environWithout("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"),
		"HOME="+home,
		"XDG_DATA_HOME="+p.dataDir,
		"XDG_CONFIG_HOME="+configDir,
		"XDG_CACHE_HOME="+filepath.Join(dir, "cache"),
	)
	args := []string{"run", "--config", caddyfilePath, "--adapter", "caddyfile"}
	if setup.editJSON != nil {
		jsonPath := filepath.Join(dir, "caddy.json")
		writeEditedJSON(t, caddyfilePath, jsonPath, setup.editJSON)
		args = []string{"run", "--config", jsonPath}
	}
	p.cmd = exec.Command(caddyBinary, args...)
	p.cmd.Dir = dir
	p.cmd.Env = env
	p.cmd.Stdout = logFile
	p.cmd.Stderr = logFile
	if err := p.cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("starting caddy: %v", err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		logFile.Close()
		close(p.exited)
	}()

	// registered after t.TempDir, so it runs before the directory goes
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			p.printLog(t, caddyfile.String())
		}
	})

	p.roots = setup.roots
	if err := p.waitReady(setup.addrs, setup.probe, setup.hostnames); err != nil {
		p.stop(t)
		return p, err
	}
	return p, nil
}

// writeEditedJSON adapts the Caddyfile with caddy adapt, edits the JSON and
// writes it to jsonPath.
func writeEditedJSON(t *testing.T, caddyfilePath, jsonPath string, edit func(map[string]any)) {
	t.Helper()
	out, err := exec.Command(caddyBinary, "adapt", "--config", caddyfilePath, "--adapter", "caddyfile").Output()
	if err != nil {
		t.Fatalf("caddy adapt: %v", err)
	}
	var config map[string]any
	if err := json.Unmarshal(out, &config); err != nil {
		t.Fatalf("caddy adapt's JSON: %v", err)
	}
	edit(config)
	data, err := json.MarshalIndent(config, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(jsonPath, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// portInUse reports whether caddy exited because an address was taken.
func (p *caddyProc) portInUse() bool {
	select {
	case <-p.exited:
	default:
		return false
	}
	out, _ := os.ReadFile(p.logPath)
	return bytes.Contains(out, []byte("address already in use"))
}

// environWithout is the test process's environment without the named
// variables.
func environWithout(names ...string) []string {
	var env []string
outer:
	for _, kv := range os.Environ() {
		for _, name := range names {
			if strings.HasPrefix(kv, name+"=") {
				continue outer
			}
		}
		env = append(env, kv)
	}
	return env
}

// waitReady polls, within startupTimeout, until caddy listens on every
// address, its local CA root exists, and probe completes a verified
// handshake for each hostname (certificates are issued in the background
// after the listeners open).
func (p *caddyProc) waitReady(addrs []string, probe listener, hostnames []string) error {
	deadline := time.Now().Add(startupTimeout)
	var lastErr error
	poll := func(what string, try func() error) error {
		for {
			select {
			case <-p.exited:
				return fmt.Errorf("caddy exited while waiting for %s: %v", what, p.waitErr)
			default:
			}
			err := try()
			if err == nil {
				return nil
			}
			lastErr = err
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: not ready after %s: %v", what, startupTimeout, lastErr)
			}
			time.Sleep(50 * time.Millisecond) // polling interval of a readiness check
		}
	}

	for _, addr := range addrs {
		err := poll("listener "+addr, func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				return err
			}
			return c.Close()
		})
		if err != nil {
			return err
		}
	}
	if p.roots == nil { // else the test trusts another CA, not Caddy's local one
		err := poll("the local CA root", func() error {
			pool, err := loadRoots(p.rootPath())
			if err == nil {
				p.roots = pool
			}
			return err
		})
		if err != nil {
			return err
		}
	}
	for _, name := range hostnames {
		err := poll("a certificate for "+name, func() error {
			conn, err := dialTLS(probe, p.tlsConfig(name))
			if err != nil {
				return err
			}
			return conn.Close()
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// stop ends caddy: SIGTERM, and SIGKILL if it has not exited within
// stopTimeout.
func (p *caddyProc) stop(t *testing.T) { stopProcess(t, "caddy", p.cmd, p.exited) }

// stopProcess ends a child process that closes exited when it has been
// waited for: SIGTERM, and SIGKILL if it has not exited within stopTimeout.
func stopProcess(t *testing.T, name string, cmd *exec.Cmd, exited <-chan struct{}) {
	select {
	case <-exited:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return
	case <-time.After(stopTimeout):
	}
	t.Errorf("%s did not exit within %s of SIGTERM; killing it", name, stopTimeout)
	_ = cmd.Process.Kill()
	<-exited
}

func (p *caddyProc) printLog(t *testing.T, caddyfile string) {
	const maxLog = 256 << 10
	out, err := os.ReadFile(p.logPath)
	if err != nil {
		t.Logf("reading caddy's log: %v", err)
		return
	}
	if len(out) > maxLog {
		out = append([]byte(fmt.Sprintf("[... first %d bytes left out ...]\n", len(out)-maxLog)), out[len(out)-maxLog:]...)
	}
	t.Logf("Caddyfile:\n%s\ncaddy output (%s):\n%s", caddyfile, p.logPath, out)
}

// logEntries returns the JSON entries of caddy's log so far (lines that
// are not JSON objects are left out).
func (p *caddyProc) logEntries(t *testing.T) []map[string]any {
	t.Helper()
	out, err := os.ReadFile(p.logPath)
	if err != nil {
		t.Fatalf("reading caddy's log: %v", err)
	}
	var entries []map[string]any
	for _, line := range bytes.Split(out, []byte("\n")) {
		var e map[string]any
		if json.Unmarshal(line, &e) == nil {
			entries = append(entries, e)
		}
	}
	return entries
}

// waitLogEntry polls caddy's log, within ioTimeout, for an entry that match
// accepts, and returns it. what names the entry in the failure.
func (p *caddyProc) waitLogEntry(t *testing.T, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		for _, e := range p.logEntries(t) {
			if match(e) {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy's log has no entry %s after %s", what, ioTimeout)
		}
		time.Sleep(20 * time.Millisecond) // polling interval of a log check
	}
}

// logField is an entry's field as a string ("" when it is missing or not a
// string).
func logField(e map[string]any, name string) string {
	s, _ := e[name].(string)
	return s
}

// rootPath is the certificate of Caddy's local CA root.
func (p *caddyProc) rootPath() string {
	return filepath.Join(p.dataDir, "caddy", "pki", "authorities", "local", "root.crt")
}

// rootPool returns Caddy's local CA root as a certificate pool.
func (p *caddyProc) rootPool() *x509.CertPool { return p.roots }

func loadRoots(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%s: no PEM certificate (yet)", path)
	}
	return pool, nil
}

// tlsConfig is a client configuration that verifies the edge's certificate
// for serverName (sent as SNI) against Caddy's local CA.
func (p *caddyProc) tlsConfig(serverName string) *tls.Config {
	return &tls.Config{
		ServerName: serverName,
		RootCAs:    p.rootPool(),
		MinVersion: tls.VersionTLS12,
	}
}

// verifyLeaf checks that chain (leaf first) is a certificate for host issued
// by Caddy's local CA.
func (p *caddyProc) verifyLeaf(chain []*x509.Certificate, host string) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	intermediates := x509.NewCertPool()
	for _, c := range chain[1:] {
		intermediates.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		DNSName:       host,
		Roots:         p.rootPool(),
		Intermediates: intermediates,
	})
	return err
}

// dialTLS connects to l and completes the TLS handshake, with the STARTTLS
// dialogue first on a STARTTLS listener. The connection has a deadline of
// ioTimeout.
func dialTLS(l listener, cfg *tls.Config) (*tls.Conn, error) { return dialTLSFrom(l, cfg, "") }

// dialTLSFrom is dialTLS from the loopback address localIP ("" for any).
func dialTLSFrom(l listener, cfg *tls.Config, localIP string) (*tls.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if localIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(localIP)}
	}
	conn, err := d.Dial("tcp", l.addr)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	return tlsOn(conn, l.mode, cfg)
}

// tlsOn starts TLS on conn as mode asks (after the STARTTLS dialogue, or at
// once), and closes conn when it fails.
func tlsOn(conn net.Conn, mode tlsMode, cfg *tls.Config) (*tls.Conn, error) {
	if mode == startTLS {
		if err := plaintextSTARTTLS(conn); err != nil {
			conn.Close()
			return nil, err
		}
	}
	tlsConn := tls.Client(conn, cfg)
	if err := tlsConn.Handshake(); err != nil {
		conn.Close()
		return nil, err
	}
	return tlsConn, nil
}

// plaintextSTARTTLS runs the dialogue before TLS on a STARTTLS listener:
// greeting, EHLO, STARTTLS. It reads byte by byte (no buffering past the
// 220) so the TLS handshake can follow on conn.
func plaintextSTARTTLS(conn net.Conn) error {
	r := &unbufferedLineReader{r: conn}
	if _, err := r.readReply(220); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if _, err := io.WriteString(conn, "EHLO client.localhost\r\n"); err != nil {
		return err
	}
	lines, err := r.readReply(250)
	if err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	if !hasExtension(lines, "STARTTLS") {
		return fmt.Errorf("EHLO reply does not offer STARTTLS: %q", lines)
	}
	if _, err := io.WriteString(conn, "STARTTLS\r\n"); err != nil {
		return err
	}
	if _, err := r.readReply(220); err != nil {
		return fmt.Errorf("STARTTLS: %w", err)
	}
	return nil
}

// unbufferedLineReader reads SMTP replies one byte at a time, so that
// nothing after the reply is consumed.
type unbufferedLineReader struct{ r io.Reader }

func (u *unbufferedLineReader) readLine() (string, error) {
	var line []byte
	var b [1]byte
	for {
		if _, err := io.ReadFull(u.r, b[:]); err != nil {
			return string(line), err
		}
		if b[0] == '\n' {
			return strings.TrimSuffix(string(line), "\r"), nil
		}
		line = append(line, b[0])
		if len(line) > 4096 {
			return "", errors.New("reply line too long")
		}
	}
}

// readReply reads one (possibly multi-line) reply and checks its code. It
// returns the lines' texts after the code and separator.
func (u *unbufferedLineReader) readReply(want int) ([]string, error) {
	var texts []string
	for {
		line, err := u.readLine()
		if err != nil {
			return texts, err
		}
		if len(line) < 3 || (len(line) > 3 && line[3] != '-' && line[3] != ' ') {
			return texts, fmt.Errorf("malformed reply line %q", line)
		}
		code, err := strconv.Atoi(line[:3])
		if err != nil || code != want {
			return texts, fmt.Errorf("got %q, want a %d reply", line, want)
		}
		if len(line) > 4 {
			texts = append(texts, line[4:])
		} else {
			texts = append(texts, "")
		}
		if len(line) == 3 || line[3] == ' ' {
			return texts, nil
		}
	}
}

// hasExtension reports whether the EHLO reply lines (the texts after
// "250-"/"250 ") list the extension keyword ext.
func hasExtension(lines []string, ext string) bool {
	for _, line := range lines[min(1, len(lines)):] {
		keyword, _, _ := strings.Cut(line, " ")
		if strings.EqualFold(keyword, ext) {
			return true
		}
	}
	return false
}

// smtpClient connects to l, completes TLS with cfg (implicit, or through
// net/smtp's STARTTLS), and returns a net/smtp client after the EHLO that
// follows TLS.
func smtpClient(t *testing.T, l listener, cfg *tls.Config) *smtp.Client {
	t.Helper()
	c, err := smtpClientErr(l, cfg)
	if err != nil {
		t.Fatalf("%s (%s): %v", l.name, l.addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func smtpClientErr(l listener, cfg *tls.Config) (*smtp.Client, error) {
	return smtpClientFrom(l, cfg, "")
}

// smtpClientFrom is smtpClientErr from the loopback address localIP (the
// system's choice when empty).
func smtpClientFrom(l listener, cfg *tls.Config, localIP string) (*smtp.Client, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if localIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(localIP)}
	}
	conn, err := d.Dial("tcp", l.addr)
	if err != nil {
		return nil, err
	}
	return smtpClientOn(conn, l.mode, cfg)
}

// smtpClientOn is smtpClientFrom on a connection the caller has made (and
// perhaps written a PROXY header on); it closes conn on failure.
func smtpClientOn(conn net.Conn, mode tlsMode, cfg *tls.Config) (*smtp.Client, error) {
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	var c *smtp.Client
	var err error
	if mode == implicitTLS {
		tlsConn := tls.Client(conn, cfg)
		if err := tlsConn.Handshake(); err != nil {
			conn.Close()
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		conn = tlsConn
	}
	if c, err = smtp.NewClient(conn, firstHost); err != nil {
		conn.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if err := c.Hello("client.localhost"); err != nil {
		c.Close()
		return nil, fmt.Errorf("EHLO: %w", err)
	}
	if mode == startTLS {
		// STARTTLS, the handshake, and EHLO again
		if err := c.StartTLS(cfg); err != nil {
			c.Close()
			return nil, fmt.Errorf("STARTTLS: %w", err)
		}
	}
	if _, ok := c.TLSConnectionState(); !ok {
		c.Close()
		return nil, errors.New("the session is not on TLS")
	}
	if ok, _ := c.Extension("ENHANCEDSTATUSCODES"); !ok {
		c.Close()
		return nil, errors.New("EHLO after TLS does not list ENHANCEDSTATUSCODES")
	}
	return c, nil
}

// rawSession is an SMTP session after TLS, driven by hand.
type rawSession struct {
	conn *tls.Conn
	tp   *textproto.Conn
}

// rawTLSSession connects to l and completes TLS, and returns the session at
// the point where the client speaks next (implicit TLS: before the backend's
// greeting has been read).
func rawTLSSession(t *testing.T, l listener, cfg *tls.Config) *rawSession {
	t.Helper()
	conn, err := dialTLS(l, cfg)
	if err != nil {
		t.Fatalf("%s (%s): %v", l.name, l.addr, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &rawSession{conn: conn, tp: textproto.NewConn(conn)}
}

// ehlo sends EHLO and returns the reply's lines (texts after the code).
func (s *rawSession) ehlo(t *testing.T) []string {
	t.Helper()
	if err := s.tp.PrintfLine("EHLO client.localhost"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	_, msg, err := s.tp.ReadResponse(250)
	if err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	return strings.Split(msg, "\n")
}

// authPlain runs AUTH PLAIN as sinkUser (see authenticate) and expects 235.
func (s *rawSession) authPlain(t *testing.T) {
	t.Helper()
	credentials := base64.StdEncoding.EncodeToString([]byte("\x00" + sinkUser + "\x00" + sinkPassword))
	if err := s.tp.PrintfLine("AUTH PLAIN %s", credentials); err != nil {
		t.Fatalf("AUTH PLAIN: %v", err)
	}
	if _, _, err := s.tp.ReadResponse(235); err != nil {
		t.Fatalf("AUTH PLAIN: %v", err)
	}
}

// expectClosed reads until the connection ends, and fails if it does not
// end (within ioTimeout) or if anything more arrives.
func expectClosed(t *testing.T, r io.Reader) {
	t.Helper()
	rest, err := io.ReadAll(r)
	if err != nil && isTimeout(err) {
		t.Fatalf("the connection stayed open (read %q before timing out)", rest)
	}
	if len(rest) > 0 {
		t.Errorf("read %q after the final reply, want the connection closed", rest)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// The account of AUTH PLAIN in front of the smtp_sink, which accepts any
// credentials: the edge (require_auth, on by default) answers MAIL, RCPT,
// DATA and BDAT with 530 until the backend has accepted an AUTH, as a
// submission server does, so a client that sends mail authenticates first.
const (
	sinkUser     = "user@example.com"
	sinkPassword = "any password"
)

// authenticate runs AUTH PLAIN as sinkUser in the client's session (after
// TLS: net/smtp sends PLAIN only over TLS, or to localhost).
func authenticate(c *smtp.Client) error {
	if err := c.Auth(smtp.PlainAuth("", sinkUser, sinkPassword, firstHost)); err != nil {
		return fmt.Errorf("AUTH PLAIN: %w", err)
	}
	return nil
}

// submit authenticates (AUTH PLAIN as sinkUser) and sends one message with
// deliver, in a session that has not authenticated yet.
func submit(c *smtp.Client, from string, to []string, msg []byte) error {
	if err := authenticate(c); err != nil {
		return err
	}
	return deliver(c, from, to, msg)
}

// deliver sends one message in a session that may send mail (it has
// authenticated, or its edge does not require it) and returns the error of
// the first step that failed (a *textproto.Error for an SMTP reply). A
// message that got 250 after its final dot returns nil.
func deliver(c *smtp.Client, from string, to []string, msg []byte) error {
	if err := c.Mail(from); err != nil {
		return err
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt); err != nil {
			return err
		}
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write(msg); err != nil {
		return err
	}
	return w.Close()
}

// replyCode is the SMTP reply code of err, or 0.
func replyCode(err error) int {
	var tpErr *textproto.Error
	if errors.As(err, &tpErr) {
		return tpErr.Code
	}
	return 0
}

// isReply reports whether err is the SMTP reply code with the enhanced
// status code enhanced ("5.7.0") at the start of its text.
func isReply(err error, code int, enhanced string) bool {
	var tpErr *textproto.Error
	return errors.As(err, &tpErr) && tpErr.Code == code && strings.HasPrefix(tpErr.Msg, enhanced+" ")
}

// testMessage is a small RFC 5322 message with token in its subject and
// body, CRLF line endings.
func testMessage(token, body string) []byte {
	return []byte("From: <sender@example.com>\r\n" +
		"To: <rcpt@example.com>\r\n" +
		"Subject: " + token + "\r\n" +
		"Message-ID: <" + token + "@client.localhost>\r\n" +
		"\r\n" +
		body + "\r\n" +
		"token " + token + "\r\n")
}

// uniqueToken returns a token that names the current test, for finding its
// message in a shared sink.
func uniqueToken(t *testing.T) string {
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, t.Name())
	return fmt.Sprintf("%s-%d", name, time.Now().UnixNano())
}

// requireTool returns the path of a command-line tool, or skips the test
// when it is not installed (fails, with SMTP_EDGE_REQUIRE_TOOLS=1).
func requireTool(t *testing.T, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	skipOrFail(t, fmt.Sprintf("%s is not installed (Debian: apt-get install %s)", name, pkg))
	return ""
}

// skipOrFail skips the test for a missing precondition of this machine, or
// fails it under SMTP_EDGE_REQUIRE_TOOLS=1, where CI has provided everything.
func skipOrFail(t *testing.T, msg string) {
	t.Helper()
	if os.Getenv(requireToolsEnv) == "1" {
		t.Fatalf("%s, and %s=1 requires it", msg, requireToolsEnv)
	}
	t.Skipf("%s; skipping (set %s=1 to make this a failure)", msg, requireToolsEnv)
}

// runTool runs a command with a bound on its runtime and returns its
// combined output.
func runTool(t *testing.T, stdin []byte, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Env = environWithout("SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE")
	out, err := cmd.CombinedOutput()
	t.Logf("$ %s %s\n%s", name, strings.Join(args, " "), out)
	if ctx.Err() != nil {
		t.Fatalf("%s did not finish within %s", name, ioTimeout)
	}
	return string(out), err
}

// firstPEMCertificate parses the first PEM certificate in text.
func firstPEMCertificate(text []byte) (*x509.Certificate, error) {
	for {
		var block *pem.Block
		block, text = pem.Decode(text)
		if block == nil {
			return nil, errors.New("no PEM certificate")
		}
		if block.Type == "CERTIFICATE" {
			return x509.ParseCertificate(block.Bytes)
		}
	}
}

// scanLines splits text into lines without their endings.
func scanLines(text string) []string {
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		lines = append(lines, strings.TrimSuffix(sc.Text(), "\r"))
	}
	return lines
}
