package integration

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Certificates from a real ACME server: Pebble on loopback (see
// pebble_helpers_test.go) is the CA of the Caddyfile's global acme_ca, and
// the smtp handler's names get their certificates from it with no HTTP site
// block.

const (
	// names that qualify for a public certificate, so no internal issuer
	// takes them: they go to the acme_ca
	acmeHost   = "mail.test"
	acmeHostMX = "mx.test"

	// renewalTimeout bounds the wait for a renewed certificate; with the
	// settings of TestACMERenewal it comes after about 15 s.
	renewalTimeout = 90 * time.Second
)

// acmeEdge is a caddy whose edge gets its certificates from pebble: an
// implicit-TLS and a STARTTLS listener with the same smtp hostnames, in
// front of an in-process sink (which has no AUTH: require_auth off).
type acmeEdge struct {
	pebble    *pebbleCA
	proc      *caddyProc
	implicit  listener
	starttls  listener
	httpsAddr string // Caddy's https_port, on 127.0.0.1 (used by a site block, if any)
	sink      *mtaSink
}

// acmeEdgeOptions change the Caddyfile of startACMEEdge.
type acmeEdgeOptions struct {
	globals []string // more global options
	// site, when set, is Caddyfile text after the global block (site
	// blocks); it gets the HTTPS address
	site func(httpsAddr string) string
}

// startACMEEdge starts caddy with `smtp <hostnames>` on both listeners and
// pebble as its ACME CA (global acme_ca and acme_ca_root). Caddy's ACME
// challenge solvers would bind the HTTP and HTTPS ports (80 and 443, on
// every interface, by default): http_port, https_port and default_bind put
// them on free loopback ports. startCaddy waits until the probe listener
// serves a certificate from pebble for every hostname.
func startACMEEdge(t *testing.T, pebble *pebbleCA, hostnames []string, opts acmeEdgeOptions) *acmeEdge {
	t.Helper()
	e := &acmeEdge{pebble: pebble, sink: startMTASink(t)}
	e.proc = startCaddy(t, func() caddySetup {
		e.implicit = listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
		e.starttls = listener{name: "submission", mode: startTLS, addr: freeAddr(t)}
		e.httpsAddr = freeAddr(t)
		_, httpPort, _ := net.SplitHostPort(freeAddr(t))
		_, httpsPort, _ := net.SplitHostPort(e.httpsAddr)
		globals := append([]string{
			"admin off",
			"skip_install_trust",
			"debug",
			// An email, as a production Caddyfile has one (examples/Caddyfile).
			// Without it, certmagic v0.25.6 can race when it obtains two names
			// at once with no ACME account stored yet: one obtain registers
			// the account under users/default/, the other lists that directory
			// (mostRecentAccountEmail), takes its placeholder name "default"
			// for an address and registers "mailto:default", which the CA
			// refuses (invalidContact); that name then waits 60 s for a retry.
			"email postmaster@mail.test",
			"acme_ca " + pebble.dirURL,
			"acme_ca_root " + pebble.tlsCertPath,
			"http_port " + httpPort,
			"https_port " + httpsPort,
			"default_bind 127.0.0.1",
		}, opts.globals...)
		var site string
		if opts.site != nil {
			site = opts.site(e.httpsAddr)
		}
		names := strings.Join(hostnames, " ")
		addrs := []string{e.implicit.addr, e.starttls.addr}
		if site != "" {
			addrs = append(addrs, e.httpsAddr)
		}
		return caddySetup{
			caddyfile: fmt.Sprintf(`{
	%s
	layer4 {
		%s {
			route {
				smtp %s {
					implicit_tls
					backend %s
					# the test's sink has no AUTH; these tests are about certificates
					require_auth off
				}
			}
		}
		%s {
			route {
				smtp %s {
					backend %s
					require_auth off
				}
			}
		}
	}
}
%s`, strings.Join(globals, "\n\t"),
				e.implicit.addr, names, e.sink.addr,
				e.starttls.addr, names, e.sink.addr,
				site),
			addrs:     addrs,
			probe:     e.implicit,
			hostnames: hostnames,
			roots:     pebble.roots,
		}
	})
	return e
}

// leafChain connects to l with SNI serverName ("" for none) and returns
// the chain the server sent; the caller verifies it.
func leafChain(t *testing.T, l listener, serverName string) []*x509.Certificate {
	t.Helper()
	conn, err := dialTLS(l, &tls.Config{
		ServerName:         serverName,
		InsecureSkipVerify: true, // verified by the caller, against pebble's root
		MinVersion:         tls.VersionTLS12,
	})
	if err != nil {
		t.Fatalf("%s (%s), SNI %q: %v", l.name, l.addr, serverName, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates
}

// checkPebbleLeaf fails t unless chain is pebble's certificate for host
// and for nothing else.
func checkPebbleLeaf(t *testing.T, pebble *pebbleCA, what string, chain []*x509.Certificate, host string) {
	t.Helper()
	if err := pebble.verifyFromPebble(chain, host); err != nil {
		t.Errorf("%s: not pebble's certificate for %s: %v", what, host, err)
		return
	}
	if got := chain[0].DNSNames; len(got) != 1 || got[0] != host {
		t.Errorf("%s: the leaf's names are %q, want [%s]", what, got, host)
	}
}

// obtainedCount is how many times caddy obtained a certificate for host:
// its cert_obtained events (logged at debug level, which the tests'
// Caddyfiles set), by the event's name and identifier, which are Caddy's
// documented events API, rather than by a log message's wording.
func obtainedCount(t *testing.T, proc *caddyProc, host string) int {
	t.Helper()
	n := 0
	for _, e := range proc.logEntries(t) {
		data, _ := e["data"].(map[string]any)
		if logField(e, "logger") == "events" && logField(e, "name") == "cert_obtained" && logField(data, "identifier") == host {
			n++
		}
	}
	return n
}

// serial is a certificate's serial in lowercase hex without leading zeros,
// for comparing the certificates served with those issued.
func serial(cert *x509.Certificate) string { return cert.SerialNumber.Text(16) }

// TestACMECertificates: `smtp mail.test` alone, with Pebble as the global
// acme_ca and no HTTP site block, gets one certificate issued by Pebble for
// mail.test, served on the implicit-TLS and the STARTTLS listener, and mail
// goes through both with a client that verifies it.
func TestACMECertificates(t *testing.T) {
	t.Parallel()
	pebble := startPebble(t, pebbleOptions{})
	e := startACMEEdge(t, pebble, []string{acmeHost}, acmeEdgeOptions{})

	var served string
	for _, l := range []listener{e.implicit, e.starttls} {
		chain := leafChain(t, l, acmeHost)
		checkPebbleLeaf(t, pebble, l.name, chain, acmeHost)
		if s := serial(chain[0]); served == "" {
			served = s
		} else if s != served {
			t.Errorf("%s: serial %s, but the implicit-TLS listener served %s", l.name, s, served)
		}

		// a whole session, verified by the client against pebble's root
		c := smtpClient(t, l, e.proc.tlsConfig(acmeHost))
		token := uniqueToken(t) + "-" + l.name
		if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "via "+l.name)); err != nil {
			t.Fatalf("%s: delivery: %v", l.name, err)
		}
		e.sink.wait(t, token)
	}
	if issued := pebble.issuedSerials(t); len(issued) != 1 || issued[0] != served {
		t.Errorf("pebble issued %q, want exactly the served certificate %s", issued, served)
	}
	if n := obtainedCount(t, e.proc, acmeHost); n != 1 {
		t.Errorf("caddy obtained a certificate for %s %d times, want once", acmeHost, n)
	}
}

// TestACMETwoHostnames: `smtp mail.test mx.test` on one listener gets a
// certificate from Pebble for each name; each SNI gets its own, and a
// client that sends no SNI gets the first name's.
func TestACMETwoHostnames(t *testing.T) {
	t.Parallel()
	pebble := startPebble(t, pebbleOptions{})
	e := startACMEEdge(t, pebble, []string{acmeHost, acmeHostMX}, acmeEdgeOptions{})

	for _, l := range []listener{e.implicit, e.starttls} {
		bySNI := make(map[string]string)
		for _, host := range []string{acmeHost, acmeHostMX} {
			chain := leafChain(t, l, host)
			checkPebbleLeaf(t, pebble, l.name+", SNI "+host, chain, host)
			bySNI[host] = serial(chain[0])
		}
		if bySNI[acmeHost] == bySNI[acmeHostMX] {
			t.Errorf("%s: both names got the certificate %s", l.name, bySNI[acmeHost])
		}
		chain := leafChain(t, l, "")
		checkPebbleLeaf(t, pebble, l.name+", no SNI", chain, acmeHost)
		if s := serial(chain[0]); s != bySNI[acmeHost] {
			t.Errorf("%s: without SNI the serial is %s, want %s's %s", l.name, s, acmeHost, bySNI[acmeHost])
		}
	}
	if n := len(pebble.issuedSerials(t)); n != 2 {
		t.Errorf("pebble issued %d certificates, want 2", n)
	}
}

// TestACMESharedWithHTTPSSite: an HTTPS site block for mail.test in the
// same Caddyfile serves the very certificate the edge serves, issued by
// Pebble once.
func TestACMESharedWithHTTPSSite(t *testing.T) {
	t.Parallel()
	pebble := startPebble(t, pebbleOptions{})
	e := startACMEEdge(t, pebble, []string{acmeHost}, acmeEdgeOptions{
		site: func(string) string {
			return acmeHost + " {\n\trespond \"web\"\n}\n"
		},
	})

	edge := leafChain(t, e.implicit, acmeHost)
	checkPebbleLeaf(t, pebble, "edge", edge, acmeHost)
	site, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", e.httpsAddr, e.proc.tlsConfig(acmeHost))
	if err != nil {
		t.Fatalf("the HTTPS site (%s): %v", e.httpsAddr, err)
	}
	siteChain := site.ConnectionState().PeerCertificates
	site.Close()
	checkPebbleLeaf(t, pebble, "HTTPS site", siteChain, acmeHost)
	if !bytes.Equal(edge[0].Raw, siteChain[0].Raw) {
		t.Errorf("the edge and the HTTPS site serve different certificates (serials %s and %s)",
			serial(edge[0]), serial(siteChain[0]))
	}
	if issued := pebble.issuedSerials(t); len(issued) != 1 {
		t.Errorf("pebble issued %d certificates (%q), want 1", len(issued), issued)
	}
	if n := obtainedCount(t, e.proc, acmeHost); n != 1 {
		t.Errorf("caddy obtained a certificate for %s %d times, want once", acmeHost, n)
	}
}

// TestACMERenewal: Pebble issues certificates valid for 30 s; with Caddy's
// renewal window at half the lifetime and its maintenance running every
// second, caddy renews after about 15 s, and new connections on both
// listeners get the renewed certificate from the same caddy process.
func TestACMERenewal(t *testing.T) {
	t.Parallel()
	const validity = 30 * time.Second
	pebble := startPebble(t, pebbleOptions{validity: validity})
	e := startACMEEdge(t, pebble, []string{acmeHost}, acmeEdgeOptions{
		globals: []string{"renew_interval 1s", "renewal_window_ratio 0.5"},
	})
	pid := e.proc.cmd.Process.Pid

	first := leafChain(t, e.implicit, acmeHost)
	checkPebbleLeaf(t, pebble, "first certificate", first, acmeHost)
	if life := first[0].NotAfter.Sub(first[0].NotBefore); life > 2*validity {
		t.Fatalf("pebble issued a certificate valid for %s, want about %s", life, validity)
	}
	old := serial(first[0])
	start := time.Now()

	// poll with new connections until one gets a new serial
	var renewed []*x509.Certificate
	deadline := start.Add(renewalTimeout)
	for {
		select {
		case <-e.proc.exited:
			t.Fatalf("caddy exited: %v", e.proc.waitErr)
		default:
		}
		chain := leafChain(t, e.implicit, acmeHost)
		if serial(chain[0]) != old {
			renewed = chain
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still the certificate %s after %s (it expires at %s)", old, renewalTimeout, first[0].NotAfter)
		}
		time.Sleep(250 * time.Millisecond) // polling interval for the renewal
	}
	t.Logf("renewed certificate served %s after the first one was seen (serial %s -> %s)",
		time.Since(start).Round(100*time.Millisecond), old, serial(renewed[0]))
	checkPebbleLeaf(t, pebble, "renewed certificate", renewed, acmeHost)
	if !renewed[0].NotBefore.After(first[0].NotBefore) && !renewed[0].NotAfter.After(first[0].NotAfter) {
		t.Errorf("the new certificate (%s..%s) is not newer than the first (%s..%s)",
			renewed[0].NotBefore, renewed[0].NotAfter, first[0].NotBefore, first[0].NotAfter)
	}

	// the STARTTLS listener has it too (or a later renewal), and a whole
	// session verifies against pebble's root
	chain := leafChain(t, e.starttls, acmeHost)
	checkPebbleLeaf(t, pebble, "STARTTLS after renewal", chain, acmeHost)
	if serial(chain[0]) == old {
		t.Errorf("the STARTTLS listener still serves the first certificate %s", old)
	}
	c := smtpClient(t, e.starttls, e.proc.tlsConfig(acmeHost))
	token := uniqueToken(t)
	if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "after renewal")); err != nil {
		t.Fatalf("delivery after renewal: %v", err)
	}
	e.sink.wait(t, token)

	select {
	case <-e.proc.exited:
		t.Fatalf("caddy exited: %v", e.proc.waitErr)
	default:
	}
	if e.proc.cmd.Process.Pid != pid {
		t.Errorf("caddy's pid changed from %d to %d", pid, e.proc.cmd.Process.Pid)
	}
	if issued := pebble.issuedSerials(t); len(issued) < 2 || issued[0] != old {
		t.Errorf("pebble issued %q, want the first certificate %s and then at least one more", issued, old)
	}
}

// TestExampleCaddyfileACME: examples/Caddyfile (production: 465, 587,
// 2525, ACME with an email, Postfix as the smtp handler's backend with PROXY
// v2) adapts to what it says, and `caddy validate` accepts it without
// contacting any CA: caddy runs with HTTPS_PROXY and HTTP_PROXY pointed at a
// recorder in this test, which sees no connection during validate. That the recorder would see a CA
// contact is shown by running the example itself (its listeners moved to
// loopback ports): caddy then asks the proxy for a public ACME CA.
func TestExampleCaddyfileACME(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	example := filepath.Join(examplesDir(t), "Caddyfile")
	env := func(proxy *connectRecorder) []string {
		return append(environWithout("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
			"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"),
			"HOME="+filepath.Join(dir, "home"),
			"XDG_DATA_HOME="+filepath.Join(dir, "data"),
			"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
			"XDG_CACHE_HOME="+filepath.Join(dir, "cache"),
			"HTTPS_PROXY=http://"+proxy.addr,
			"HTTP_PROXY=http://"+proxy.addr,
		)
	}
	proxy := startConnectRecorder(t)

	// adapt
	cmd := exec.Command(caddyBinary, "adapt", "--config", example, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Env = env(proxy)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("caddy adapt %s: %v\n%s", example, err, stderr.Bytes())
	}
	if bytes.Contains(stderr.Bytes(), []byte(`"level":"warn"`)) {
		t.Errorf("caddy adapt warns:\n%s", stderr.Bytes())
	}
	checkAdaptedExample(t, out)

	// validate
	cmd = exec.Command(caddyBinary, "validate", "--config", example, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Env = env(proxy)
	vout, err := cmd.CombinedOutput()
	// the exit status says whether the configuration is valid
	if err != nil {
		t.Fatalf("caddy validate %s: %v\n%s", example, err, vout)
	}
	// a negative check on a log message, which a change of wording could
	// only weaken; what decides is below: no request through the proxy, and
	// nothing stored
	if bytes.Contains(vout, []byte("obtaining certificate")) {
		t.Errorf("caddy validate started obtaining a certificate:\n%s", vout)
	}
	if got := proxy.requests(); len(got) != 0 {
		t.Errorf("caddy validate made network requests through the proxy: %q", got)
	}
	for _, sub := range []string{"certificates", "acme"} {
		if _, err := os.Stat(filepath.Join(dir, "data", "caddy", sub)); !os.IsNotExist(err) {
			t.Errorf("caddy validate stored data/caddy/%s (stat: %v)", sub, err)
		}
	}

	// the control: the example, run, does try to reach a public CA, and
	// the recorder sees it
	t.Run("run reaches for a CA", func(t *testing.T) {
		runExampleUntilCAContact(t, dir, env(proxy), proxy)
	})
}

// checkAdaptedExample checks the JSON of the adapted production example.
func checkAdaptedExample(t *testing.T, adapted []byte) {
	t.Helper()
	type handler struct {
		Handler       string   `json:"handler"`
		Hostnames     []string `json:"hostnames"`
		ImplicitTLS   bool     `json:"implicit_tls"`
		Backends      []string `json:"backends"`
		ProxyProtocol string   `json:"proxy_protocol"`
	}
	var cfg struct {
		Apps struct {
			Layer4 struct {
				Servers map[string]struct {
					Listen []string `json:"listen"`
					Routes []struct {
						Handle []handler `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"layer4"`
			TLS struct {
				Automation struct {
					Policies []struct {
						Subjects []string `json:"subjects"`
						Issuers  []struct {
							Module string `json:"module"`
							CA     string `json:"ca"`
							Email  string `json:"email"`
						} `json:"issuers"`
					} `json:"policies"`
				} `json:"automation"`
			} `json:"tls"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatalf("the adapted example: %v\n%s", err, adapted)
	}
	want := map[string]bool{":465": true, ":587 :2525": false} // listen -> implicit TLS
	seen := map[string]bool{}
	for name, srv := range cfg.Apps.Layer4.Servers {
		listen := strings.Join(srv.Listen, " ")
		implicit, ok := want[listen]
		if !ok {
			t.Errorf("server %s listens on %q, which the example does not have", name, listen)
			continue
		}
		seen[listen] = true
		// the smtp handler relays to Postfix itself: it is the route's
		// only handler
		if len(srv.Routes) != 1 || len(srv.Routes[0].Handle) != 1 {
			t.Errorf("%s: want one route with the smtp handler alone: %+v", listen, srv.Routes)
			continue
		}
		smtpH := srv.Routes[0].Handle[0]
		if smtpH.Handler != "smtp" || strings.Join(smtpH.Hostnames, " ") != "mail.example.com" || smtpH.ImplicitTLS != implicit {
			t.Errorf("%s: smtp handler %+v, want hostnames [mail.example.com], implicit_tls %v", listen, smtpH, implicit)
		}
		if strings.Join(smtpH.Backends, " ") != "127.0.0.1:10587" || smtpH.ProxyProtocol != "v2" {
			t.Errorf("%s: smtp handler %+v, want backends [127.0.0.1:10587] with proxy_protocol v2", listen, smtpH)
		}
	}
	for listen := range want {
		if !seen[listen] {
			t.Errorf("no layer4 server listens on %s", listen)
		}
	}
	policies := cfg.Apps.TLS.Automation.Policies
	if len(policies) != 1 || len(policies[0].Subjects) != 0 || len(policies[0].Issuers) == 0 {
		t.Fatalf("want one catch-all automation policy with issuers: %+v", policies)
	}
	// Caddy's default issuers: Let's Encrypt (the ACME module's default CA),
	// then ZeroSSL; both with the example's email
	issuers := policies[0].Issuers
	if issuers[0].Module != "acme" || issuers[0].CA != "" {
		t.Errorf("the first issuer is %+v, want ACME with Caddy's default CA (Let's Encrypt)", issuers[0])
	}
	for _, iss := range issuers {
		if iss.Module != "acme" || iss.Email != "postmaster@example.com" ||
			(iss.CA != "" && !strings.HasPrefix(iss.CA, "https://acme.zerossl.com/")) {
			t.Errorf("issuer %+v: want ACME (Let's Encrypt or ZeroSSL) with the email postmaster@example.com", iss)
		}
	}
}

// runExampleUntilCAContact runs examples/Caddyfile with its listeners and
// its admin endpoint moved to free loopback ports, and waits until caddy
// asks the recorder for a connection to a CA.
func runExampleUntilCAContact(t *testing.T, dir string, env []string, proxy *connectRecorder) {
	implicit, submission, alt := freeAddr(t), freeAddr(t), freeAddr(t)
	text := readExample(t, "Caddyfile", map[string]string{
		"\t\t:465 {":       "\t\t" + implicit + " {",
		"\t\t:587 :2525 {": "\t\t" + submission + " " + alt + " {",
		// the admin endpoint (localhost:2019 by default) on a free port
		"\temail postmaster@example.com\n": "\tadmin " + freeAddr(t) + "\n\temail postmaster@example.com\n",
	})
	// nothing else in the example may listen on a non-loopback address
	for _, line := range scanLines(text) {
		if f := strings.Fields(line); len(f) == 2 && f[1] == "{" && strings.HasPrefix(f[0], ":") {
			t.Fatalf("the example has a listener the test did not move to loopback: %q", line)
		}
	}
	path := filepath.Join(dir, "Caddyfile.loopback")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "run.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(caddyBinary, "run", "--config", path, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		logFile.Close()
		close(exited)
	}()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			t.Errorf("caddy did not exit within %s of SIGTERM; killing it", stopTimeout)
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("caddy output:\n%s", out)
		}
	}()

	deadline := time.Now().Add(startupTimeout)
	for {
		if got := proxy.requests(); len(got) > 0 {
			t.Logf("caddy asked the proxy for: %q", got)
			if !strings.Contains(strings.Join(got, "\n"), "acme") {
				t.Errorf("the requests name no ACME CA: %q", got)
			}
			return
		}
		select {
		case <-exited:
			t.Fatalf("caddy exited: %v", waitErr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy made no request through the proxy within %s", startupTimeout)
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
}

// connectRecorder is an HTTP proxy on loopback that forwards nothing: it
// records the request line of every connection (CONNECT host:port, or a
// plain-HTTP request) and answers 403.
type connectRecorder struct {
	addr string
	mu   sync.Mutex
	seen []string
}

func startConnectRecorder(t *testing.T) *connectRecorder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &connectRecorder{addr: ln.Addr().String()}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(ioTimeout))
				line, _ := bufio.NewReader(conn).ReadString('\n')
				r.mu.Lock()
				r.seen = append(r.seen, strings.TrimSpace(line))
				r.mu.Unlock()
				_, _ = conn.Write([]byte("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return r
}

func (r *connectRecorder) requests() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.seen...)
}
