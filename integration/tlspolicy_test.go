package integration

import (
	"context"
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
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// The tests in this file judge the edge's TLS policy with tools we did not
// write: testssl.sh (Debian package testssl.sh, command testssl) and openssl
// s_client, plus Go's crypto/tls as a client with a certificate. Each skips
// when its tool is missing, and fails instead under SMTP_EDGE_REQUIRE_TOOLS=1.

// testsslTimeout bounds one testssl.sh run. A run takes 10 to 30 seconds
// on a 2-core machine (more when other tests share it); this is only a bound
// against a hang.
const testsslTimeout = 4 * time.Minute

// testsslChecks are the only checks the tests ask testssl.sh for:
// -p protocols (SSLv2 to TLS 1.3, and ALPN on a non-STARTTLS port), -E every
// cipher suite per protocol, -f forward secrecy (testssl's own list of the
// suites it counts as forward secret), -S server defaults (certificate, chain
// of trust, name match). No --fast: with it testssl tests cipher suites
// through the local openssl only, and Debian's OpenSSL 3 cannot speak RC4,
// 3DES or export suites, so a server offering them would go unnoticed.
var testsslChecks = []string{"-p", "-E", "-f", "-S"}

// testsslArgs is the testssl.sh command line for a listener (without the
// JSON file): no DNS (--ip, -n none), the name mail.localhost (SNI, and the
// name the chain is judged for), Caddy's local CA root added to the trust
// stores, batch mode, no colour, no banner.
func testsslArgs(l listener, rootPath string) []string {
	args := []string{
		"--quiet", "--color", "0", "--warnings", "batch",
		"--nodns", "none", "--ip", "127.0.0.1",
		"--connect-timeout", "10", "--openssl-timeout", "10",
		"--add-ca", rootPath,
	}
	if l.mode == startTLS {
		args = append(args, "--starttls", "smtp")
	}
	args = append(args, testsslChecks...)
	return args
}

// requireTestssl returns the testssl.sh command: "testssl" in Debian's
// package, "testssl.sh" from upstream.
func requireTestssl(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"testssl", "testssl.sh"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	skipOrFail(t, "testssl.sh is not installed (Debian: apt-get install testssl.sh)")
	return ""
}

// TestTLSPolicyTestssl runs testssl.sh against an implicit-TLS and a STARTTLS
// listener with the default policy and judges its JSON findings.
func TestTLSPolicyTestssl(t *testing.T) {
	t.Parallel()
	testssl := requireTestssl(t)
	openssl := requireTool(t, "openssl", "openssl")

	proc, listeners := startEdgePair(t, filepath.Join(t.TempDir(), "mail"), nil, nil)

	for _, l := range listeners {
		t.Run("testssl/"+l.name, func(t *testing.T) {
			t.Parallel()
			findings := runTestssl(t, testssl, l, proc.rootPath())
			for _, problem := range judgeTestssl(findings, l.mode == implicitTLS) {
				t.Error(problem)
			}
			t.Logf("testssl.sh summary for %s (%s):\n%s", l.name, l.mode, testsslSummary(findings))
		})
		// testssl.sh does not test ALPN over STARTTLS; offer HTTP ALPN
		// with openssl on both kinds of listener, and read the protocol
		// selected from the session openssl writes
		t.Run("openssl-ALPN/"+l.name, func(t *testing.T) {
			t.Parallel()
			sessPath := filepath.Join(t.TempDir(), "session.pem")
			out, err := tpOpenSSL(t, openssl, proc, l, "-alpn", "h2,http/1.1", "-sess_out", sessPath)
			if err != nil {
				t.Fatalf("openssl s_client -verify_return_error failed: %v", err)
			}
			if !tpSessionThrough(out) {
				t.Errorf("no 221 from the backend: the session did not get through")
			}
			if sess := readOpenSSLSession(t, sessPath); sess.alpn != "" {
				t.Errorf("the server selected ALPN protocol %q (%s), want none on a mail port", sess.alpn, tls.VersionName(sess.version))
			}
		})
	}
}

// testsslFinding is one entry of testssl.sh's flat JSON file (--jsonfile).
type testsslFinding struct {
	ID       string `json:"id"`
	Severity string `json:"severity"`
	Finding  string `json:"finding"`
}

// runTestssl runs testssl.sh against l and returns its findings.
func runTestssl(t *testing.T, testssl string, l listener, rootPath string) []testsslFinding {
	t.Helper()
	dir := t.TempDir()
	jsonPath := filepath.Join(dir, "testssl.json")
	args := append(testsslArgs(l, rootPath), "--jsonfile", jsonPath, firstHost+":"+l.port())

	ctx, cancel := context.WithTimeout(context.Background(), testsslTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, testssl, args...)
	cmd.Dir = dir
	cmd.Env = append(environWithout("HOME", "SSL_CERT_FILE", "SSL_CERT_DIR"), "HOME="+dir)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	elapsed := time.Since(start)
	t.Logf("$ testssl %s\n(%s, exit %v)\n%s", strings.Join(args, " "), elapsed.Round(100*time.Millisecond), err, out)
	if ctx.Err() != nil {
		t.Fatalf("testssl.sh did not finish within %s", testsslTimeout)
	}
	data, rerr := os.ReadFile(jsonPath)
	if rerr != nil {
		t.Fatalf("testssl.sh wrote no JSON file (exit: %v): %v", err, rerr)
	}
	findings, perr := parseTestssl(data)
	if perr != nil {
		t.Fatalf("testssl.sh's JSON: %v", perr)
	}
	if err != nil {
		// testssl.sh's exit status is not a verdict (it has been non-zero
		// for findings unrelated to the policy); the JSON is judged instead
		t.Logf("testssl.sh exited with %v", err)
	}
	return findings
}

func parseTestssl(data []byte) ([]testsslFinding, error) {
	var findings []testsslFinding
	if err := json.Unmarshal(data, &findings); err != nil {
		return nil, err
	}
	if !slices.ContainsFunc(findings, func(f testsslFinding) bool { return f.ID == "scanTime" }) {
		return findings, errors.New("no scanTime entry: the scan did not finish")
	}
	return findings, nil
}

// testsslCipher is one line of testssl.sh's -E output, as in the finding
// "TLS 1.2   xc02b   ECDHE-ECDSA-AES128-GCM-SHA256   ECDH 253   AESGCM   128
// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" of the id cipher-tls1_2_xc02b.
type testsslCipher struct {
	protocol string // from the id: ssl2, ssl3, tls1, tls1_1, tls1_2, tls1_3
	hexcode  string
	openssl  string // OpenSSL's name
	iana     string // the RFC name
}

var testsslCipherID = regexp.MustCompile(`^cipher-(ssl2|ssl3|tls1|tls1_1|tls1_2|tls1_3)_(x[0-9a-f]+)$`)

func testsslCiphers(findings []testsslFinding) ([]testsslCipher, []string) {
	var ciphers []testsslCipher
	var problems []string
	for _, f := range findings {
		m := testsslCipherID.FindStringSubmatch(f.ID)
		if m == nil {
			continue
		}
		fields := strings.Fields(f.Finding)
		// "TLS 1.2 xc02b NAME KX [BITS] ENC BITS IANA"; SSLv3 is one word
		i := slices.Index(fields, m[2])
		if i < 0 || i+1 >= len(fields) {
			problems = append(problems, fmt.Sprintf("testssl.sh: cannot read cipher finding %s: %q", f.ID, f.Finding))
			continue
		}
		ciphers = append(ciphers, testsslCipher{
			protocol: m[1],
			hexcode:  m[2],
			openssl:  fields[i+1],
			iana:     fields[len(fields)-1],
		})
	}
	return ciphers, problems
}

// weakCipher says why a suite is not acceptable on a mail port, or "".
func weakCipher(c testsslCipher) string {
	names := strings.ToUpper(c.openssl + " " + c.iana)
	switch {
	case strings.Contains(names, "NULL"):
		return "NULL encryption or authentication"
	case strings.Contains(names, "EXP"):
		return "export grade"
	case strings.Contains(names, "_ANON_") || strings.HasPrefix(names, "ADH") || strings.HasPrefix(names, "AECDH"):
		return "anonymous"
	case strings.Contains(names, "RC4") || strings.Contains(names, "RC2"):
		return "RC4/RC2"
	case strings.Contains(names, "DES") || strings.Contains(names, "IDEA"):
		return "DES/3DES/IDEA (64-bit block)"
	case strings.HasSuffix(c.iana, "_CBC_SHA"):
		return "CBC with SHA-1 only"
	}
	return ""
}

// testsslMachineWarnings are the ids of the warnings testssl.sh inserts
// about the machine it runs on, before it scans anything (its
// fileout_insert_warning calls): they say nothing about the server, and
// their text changes with the local OpenSSL (Debian 12's OpenSSL 3.0.22
// made testssl.sh 3.0.8 print engine_problem). They are tolerated by id,
// never by wording; every policy assertion below still holds, so a scan
// that such a machine could not carry out still fails on what it missed.
var testsslMachineWarnings = map[string]bool{
	"engine_problem":  true, // no GOST engine in the local OpenSSL (GOST suites are never offered by the edge)
	"old_fart":        true, // the local OpenSSL is too old to scan with
	"too_old_openssl": true, // the same, for somewhat newer versions
}

// judgeTestssl returns what is wrong with the TLS policy testssl.sh saw:
// anything below TLS 1.2, TLS 1.2 or 1.3 missing, a weak suite, a suite
// without forward secrecy, ALPN offered (implicit TLS only: testssl.sh does
// not test ALPN over STARTTLS), or a certificate not trusted for the name.
// It reads testssl.sh's JSON file (--jsonfile), its output for programs:
// findings by id, whose values ("offered", "not offered", "passed", "Ok via
// SAN", the cipher lines) are what its own CSV and HTML writers and CI
// integrations consume; a value it does not know is a problem, never a pass.
func judgeTestssl(findings []testsslFinding, checkALPN bool) []string {
	var problems []string
	byID := make(map[string]testsslFinding)
	for _, f := range findings {
		byID[f.ID] = f
		switch strings.ToUpper(f.Severity) {
		case "WARN", "FATAL", "ERROR":
			if testsslMachineWarnings[f.ID] && strings.EqualFold(f.Severity, "WARN") {
				continue
			}
			problems = append(problems, fmt.Sprintf("testssl.sh reported a scan problem: %s %s: %s", f.Severity, f.ID, f.Finding))
		}
	}
	find := func(id string) (string, bool) {
		f, ok := byID[id]
		if !ok {
			problems = append(problems, fmt.Sprintf("testssl.sh reported no %q finding", id))
		}
		return f.Finding, ok
	}

	for _, id := range []string{"SSLv2", "SSLv3", "TLS1", "TLS1_1"} {
		if v, ok := find(id); ok && !strings.HasPrefix(v, "not offered") {
			problems = append(problems, fmt.Sprintf("%s: %q, want not offered", id, v))
		}
	}
	for _, id := range []string{"TLS1_2", "TLS1_3"} {
		if v, ok := find(id); ok && !strings.HasPrefix(v, "offered") {
			problems = append(problems, fmt.Sprintf("%s: %q, want offered", id, v))
		}
	}
	if checkALPN {
		if v, ok := find("ALPN"); ok && v != "not offered" {
			problems = append(problems, fmt.Sprintf("ALPN: %q, want not offered (no h2/http/1.1 on a mail port)", v))
		}
		if v, ok := byID["ALPN_HTTP2"]; ok && !strings.HasPrefix(v.Finding, "not offered") {
			problems = append(problems, fmt.Sprintf("ALPN_HTTP2: %q, want not offered", v.Finding))
		}
	}

	ciphers, cipherProblems := testsslCiphers(findings)
	problems = append(problems, cipherProblems...)
	if len(ciphers) == 0 {
		problems = append(problems, "testssl.sh found no cipher suite at all (-E did not run?)")
	}
	var fs []string
	if v, ok := find("PFS_ciphers"); ok {
		fs = strings.Fields(v)
	}
	if v, ok := find("PFS"); ok && v != "offered" {
		problems = append(problems, fmt.Sprintf("PFS: %q, want offered", v))
	}
	for _, c := range ciphers {
		if c.protocol != "tls1_2" && c.protocol != "tls1_3" {
			problems = append(problems, fmt.Sprintf("cipher %s (%s) offered with %s", c.iana, c.hexcode, c.protocol))
		}
		if why := weakCipher(c); why != "" {
			problems = append(problems, fmt.Sprintf("weak cipher %s (%s) offered with %s: %s", c.iana, c.hexcode, c.protocol, why))
		}
		if !slices.Contains(fs, c.openssl) && !slices.Contains(fs, c.iana) {
			problems = append(problems, fmt.Sprintf("cipher %s (%s) offered with %s has no forward secrecy (not in testssl.sh's PFS list %q)", c.iana, c.hexcode, c.protocol, fs))
		}
	}

	if v, ok := find("cert_trust"); ok && !strings.HasPrefix(v, "Ok via SAN") {
		problems = append(problems, fmt.Sprintf("cert_trust: %q, want the name in the SAN", v))
	}
	if v, ok := find("cert_chain_of_trust"); ok && !strings.HasPrefix(v, "passed") {
		problems = append(problems, fmt.Sprintf("cert_chain_of_trust: %q, want passed", v))
	}
	if v, ok := find("cert_subjectAltName"); ok && !slices.Contains(strings.Fields(v), firstHost) {
		problems = append(problems, fmt.Sprintf("cert_subjectAltName: %q, want %s", v, firstHost))
	}
	return problems
}

// testsslSummary is the part of the findings the docs table shows.
func testsslSummary(findings []testsslFinding) string {
	var b strings.Builder
	for _, f := range findings {
		switch {
		case slices.Contains([]string{"SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "ALPN",
			"PFS", "PFS_ciphers", "PFS_ECDHE_curves", "cert_trust", "cert_chain_of_trust",
			"cert_subjectAltName", "cert_signatureAlgorithm", "cert_keySize", "scanTime"}, f.ID),
			testsslCipherID.MatchString(f.ID):
			fmt.Fprintf(&b, "%-28s %-8s %s\n", f.ID, f.Severity, f.Finding)
		}
	}
	return b.String()
}

// TestTestsslJudge shows that judgeTestssl fails on each regression the
// policy test exists for, starting from the findings of a good scan.
func TestTestsslJudge(t *testing.T) {
	t.Parallel()
	good := []testsslFinding{
		{"SSLv2", "OK", "not offered"},
		{"SSLv3", "OK", "not offered"},
		{"TLS1", "INFO", "not offered"},
		{"TLS1_1", "INFO", "not offered"},
		{"TLS1_2", "OK", "offered"},
		{"TLS1_3", "OK", "offered with final"},
		{"ALPN", "INFO", "not offered"},
		{"cipher-tls1_2_xc02b", "INFO", "TLS 1.2   xc02b   ECDHE-ECDSA-AES128-GCM-SHA256     ECDH 253   AESGCM      128      TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"},
		{"cipher-tls1_3_x1301", "INFO", "TLS 1.3   x1301   TLS_AES_128_GCM_SHA256            ECDH 253   AESGCM      128      TLS_AES_128_GCM_SHA256"},
		{"PFS", "OK", "offered"},
		{"PFS_ciphers", "INFO", "TLS_AES_128_GCM_SHA256 ECDHE-ECDSA-AES128-GCM-SHA256"},
		{"cert_subjectAltName", "INFO", "mail.localhost"},
		{"cert_trust", "OK", "Ok via SAN (same w/o SNI)"},
		{"cert_chain_of_trust", "OK", "passed."},
		{"scanTime", "INFO", "10"},
	}
	if problems := judgeTestssl(good, true); len(problems) > 0 {
		t.Fatalf("a good scan was judged bad: %q", problems)
	}
	set := func(id, finding string) func([]testsslFinding) []testsslFinding {
		return func(f []testsslFinding) []testsslFinding {
			for i := range f {
				if f[i].ID == id {
					f[i].Finding = finding
					return f
				}
			}
			return append(f, testsslFinding{id, "INFO", finding})
		}
	}
	for name, mutate := range map[string]func([]testsslFinding) []testsslFinding{
		"SSLv3 offered":   set("SSLv3", "offered (NOT ok)"),
		"TLS 1.0 offered": set("TLS1", "offered (deprecated)"),
		"TLS 1.1 offered": set("TLS1_1", "offered (deprecated)"),
		"TLS 1.3 missing": set("TLS1_3", "not offered"),
		"ALPN h2":         set("ALPN", "h2"),
		"CBC-SHA1 suite": set("cipher-tls1_2_xc009",
			"TLS 1.2   xc009   ECDHE-ECDSA-AES128-SHA            ECDH 253   AES         128      TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"),
		"3DES suite": set("cipher-tls1_2_xc008",
			"TLS 1.2   xc008   ECDHE-ECDSA-DES-CBC3-SHA          ECDH 253   3DES        168      TLS_ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA"),
		"RC4 suite": set("cipher-tls1_2_xc007",
			"TLS 1.2   xc007   ECDHE-ECDSA-RC4-SHA               ECDH 253   RC4         128      TLS_ECDHE_ECDSA_WITH_RC4_128_SHA"),
		"no forward secrecy": set("cipher-tls1_2_x9c",
			"TLS 1.2   x9c     AES128-GCM-SHA256                 RSA        AESGCM      128      TLS_RSA_WITH_AES_128_GCM_SHA256"),
		"suite on TLS 1.0": set("cipher-tls1_xc02b",
			"TLS 1   xc02b   ECDHE-ECDSA-AES128-GCM-SHA256     ECDH 253   AESGCM      128      TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
		"untrusted chain": set("cert_chain_of_trust", "NOT ok (self signed)"),
		"wrong name":      set("cert_trust", "certificate does not match supplied URI"),
		"scan aborted": func(f []testsslFinding) []testsslFinding {
			return slices.DeleteFunc(f, func(x testsslFinding) bool { return x.ID == "TLS1_3" })
		},
	} {
		if problems := judgeTestssl(mutate(slices.Clone(good)), true); len(problems) == 0 {
			t.Errorf("%s: judged good", name)
		}
	}
	// a warning about the scanning machine is not a finding about the
	// server; a warning about the server still is, and so is an error
	// under a machine warning's id
	machine := append(slices.Clone(good), testsslFinding{"engine_problem", "WARN", "No engine or GOST support via engine with your /usr/bin/openssl"})
	if problems := judgeTestssl(machine, true); len(problems) > 0 {
		t.Errorf("a scan with a warning about the scanning machine was judged bad: %q", problems)
	}
	for _, f := range []testsslFinding{
		{"scanProblem", "WARN", "TLS downgraded to STARTTLS plaintext"},
		{"TLS1_3", "WARN", "received 4xx/5xx after STARTTLS handshake"},
		{"engine_problem", "FATAL", "anything"},
	} {
		if problems := judgeTestssl(append(slices.Clone(good), f), true); len(problems) == 0 {
			t.Errorf("%s %s: judged good", f.Severity, f.ID)
		}
	}
	if _, err := parseTestssl([]byte(`[{"id":"SSLv2","severity":"OK","finding":"not offered"}]`)); err == nil {
		t.Errorf("a JSON file without scanTime was accepted")
	}
}

// tpOpenSSL runs openssl s_client against l (STARTTLS dialogue first on a
// STARTTLS listener), verifying the edge's certificate, with extra
// arguments; it sends QUIT and waits for the server to close (-ign_eof).
// With -verify_return_error a certificate that does not verify for
// mail.localhost against Caddy's local CA fails the handshake, and openssl
// exits non-zero: the exit status says the server was verified.
func tpOpenSSL(t *testing.T, openssl string, p *caddyProc, l listener, extra ...string) (string, error) {
	t.Helper()
	args := []string{"s_client", "-connect", l.addr, "-servername", firstHost,
		"-CAfile", p.rootPath(), "-verify_hostname", firstHost, "-verify_return_error",
		"-crlf", "-ign_eof"}
	if l.mode == startTLS {
		args = append(args, "-starttls", "smtp")
	}
	return runTool(t, []byte("QUIT\n"), openssl, append(args, extra...)...)
}

// tpSessionThrough reports whether openssl's output shows an SMTP session
// after TLS: the backend's 221 to QUIT (an SMTP reply, which s_client
// passes through as it came).
func tpSessionThrough(out string) bool {
	return strings.Contains(out, "\n221 ")
}

// TestTLSPolicyTLS13Only: connection_policy { protocols tls1.3 } in the smtp
// block refuses TLS 1.2 clients (openssl, Go) and serves TLS 1.3 ones.
func TestTLSPolicyTLS13Only(t *testing.T) {
	t.Parallel()
	sinkDir := filepath.Join(t.TempDir(), "mail")
	proc, listeners := startEdgePair(t, sinkDir, []string{"connection_policy {", "\tprotocols tls1.3", "}"}, nil)

	for _, l := range listeners {
		t.Run("openssl-TLS1.2-refused/"+l.name, func(t *testing.T) {
			t.Parallel()
			openssl := requireTool(t, "openssl", "openssl")
			// through a tap: the client offered TLS 1.2 at most, and
			// the server answered with a protocol_version alert
			tap := startTap(t, l.addr)
			tapped := l
			tapped.addr = tap.addr
			out, err := tpOpenSSL(t, openssl, proc, tapped, "-tls1_2")
			if err == nil {
				t.Errorf("openssl s_client -tls1_2 succeeded")
			}
			checkVersionRefused(t, tap, tls.VersionTLS12)
			if strings.Contains(out, "-----BEGIN CERTIFICATE-----") || tpSessionThrough(out) {
				t.Errorf("a TLS 1.2 client got a certificate or a session")
			}
		})
		t.Run("openssl-TLS1.3/"+l.name, func(t *testing.T) {
			t.Parallel()
			openssl := requireTool(t, "openssl", "openssl")
			// -tls1_3 offers TLS 1.3 alone, so a handshake that
			// succeeds (verified: -verify_return_error) is TLS 1.3
			out, err := tpOpenSSL(t, openssl, proc, l, "-tls1_3")
			if err != nil {
				t.Fatalf("openssl s_client -tls1_3 -verify_return_error failed: %v", err)
			}
			if !tpSessionThrough(out) {
				t.Errorf("no 221 from the backend after TLS 1.3")
			}
		})
		t.Run("Go-TLS1.2-refused/"+l.name, func(t *testing.T) {
			t.Parallel()
			cfg := proc.tlsConfig(firstHost)
			cfg.MaxVersion = tls.VersionTLS12
			conn, err := dialTLS(l, cfg)
			if err == nil {
				conn.Close()
				t.Fatalf("a TLS 1.2 handshake succeeded")
			}
			if !strings.Contains(err.Error(), "protocol version") {
				t.Errorf("handshake error %q, want a protocol version alert", err)
			}
		})
		t.Run("Go-TLS1.3-delivery/"+l.name, func(t *testing.T) {
			t.Parallel()
			c := smtpClient(t, l, proc.tlsConfig(firstHost))
			if state, _ := c.TLSConnectionState(); state.Version != tls.VersionTLS13 {
				t.Errorf("negotiated %s, want TLS 1.3", tls.VersionName(state.Version))
			}
			token := uniqueToken(t)
			if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "TLS 1.3 only")); err != nil {
				t.Fatalf("delivery: %v", err)
			}
			sinkMessage(t, sinkDir, token)
		})
	}
}

// tpClientPKI is a client CA and certificates the tests make for client_auth.
type tpClientPKI struct {
	caPath            string          // the trusted client CA (PEM), for trust_pool file
	certPath, keyPath string          // a client certificate issued by it, for openssl
	cert              tls.Certificate // the same, for Go
	strangerCert      tls.Certificate // a client certificate from another CA
	strangerCertPath  string
	strangerKeyPath   string
}

// newClientPKI makes a client CA, a client certificate from it and one from
// an unrelated CA, and writes them as PEM files into dir.
func newClientPKI(t *testing.T, dir string) *tpClientPKI {
	t.Helper()
	pki := new(tpClientPKI)
	caCert, caKey := tpMakeCA(t, "Edge Test Client CA")
	pki.caPath = filepath.Join(dir, "client-ca.pem")
	tpWritePEM(t, pki.caPath, "CERTIFICATE", caCert.Raw)
	pki.cert, pki.certPath, pki.keyPath = tpMakeClient(t, dir, "client", caCert, caKey)

	otherCert, otherKey := tpMakeCA(t, "Some Other CA")
	pki.strangerCert, pki.strangerCertPath, pki.strangerKeyPath = tpMakeClient(t, dir, "stranger", otherCert, otherKey)
	return pki
}

func tpMakeCA(t *testing.T, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          tpSerial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func tpMakeClient(t *testing.T, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey) (tls.Certificate, string, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: tpSerial(t),
		Subject:      pkix.Name{CommonName: name + ".client.localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	tpWritePEM(t, certPath, "CERTIFICATE", der)
	tpWritePEM(t, keyPath, "PRIVATE KEY", keyDER)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, certPath, keyPath
}

func tpSerial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func tpWritePEM(t *testing.T, path, blockType string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTLSPolicyClientAuth: a connection policy with client_auth { mode
// require_and_verify; trust_pool file <ca> } refuses clients without a
// certificate or with one from another CA (openssl and Go), and serves
// clients with a certificate from the trusted CA, through to the backend,
// where the certificate stands in for AUTH (require_auth).
func TestTLSPolicyClientAuth(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	pki := newClientPKI(t, dir)
	sinkDir := filepath.Join(dir, "mail")
	var listeners []listener
	proc := startCaddy(t, func() caddySetup {
		listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		probe := listener{name: "probe", mode: implicitTLS, addr: freeAddr(t)}
		sinkAddr := freeAddr(t)
		policy := []string{
			"connection_policy {",
			"\tclient_auth {",
			"\t\tmode require_and_verify",
			"\t\ttrust_pool file " + pki.caPath,
			"\t}",
			"}",
		}
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{listeners[0].addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Options: policy, Backend: sinkAddr},
					{Addrs: []string{listeners[1].addr}, Hostnames: []string{firstHost}, Options: policy, Backend: sinkAddr},
					// the readiness probe has no client certificate
					{Addrs: []string{probe.addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Backend: sinkAddr},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{listeners[0].addr, listeners[1].addr, probe.addr, sinkAddr},
			probe:     probe,
			hostnames: []string{firstHost},
		}
	})

	for _, l := range listeners {
		t.Run("openssl-no-certificate-refused/"+l.name, func(t *testing.T) {
			t.Parallel()
			openssl := requireTool(t, "openssl", "openssl")
			// the same command as openssl-certificate below but for
			// -cert and -key: a failure here and a session there is the
			// server refusing for the certificate (which alert it sends
			// is checked with Go below: in TLS 1.3 it is encrypted)
			out, err := tpOpenSSL(t, openssl, proc, l)
			if err == nil {
				t.Errorf("openssl s_client without a client certificate exited 0")
			}
			if tpSessionThrough(out) {
				t.Errorf("a client without a certificate got an SMTP session after TLS")
			}
		})
		t.Run("openssl-stranger-certificate-refused/"+l.name, func(t *testing.T) {
			t.Parallel()
			openssl := requireTool(t, "openssl", "openssl")
			out, err := tpOpenSSL(t, openssl, proc, l, "-cert", pki.strangerCertPath, "-key", pki.strangerKeyPath)
			if err == nil {
				t.Errorf("openssl s_client with another CA's certificate exited 0")
			}
			if tpSessionThrough(out) {
				t.Errorf("a client with another CA's certificate got an SMTP session after TLS")
			}
		})
		t.Run("openssl-certificate/"+l.name, func(t *testing.T) {
			t.Parallel()
			openssl := requireTool(t, "openssl", "openssl")
			out, err := tpOpenSSL(t, openssl, proc, l, "-cert", pki.certPath, "-key", pki.keyPath)
			if err != nil {
				t.Fatalf("openssl s_client -verify_return_error with the client certificate failed: %v", err)
			}
			if !tpSessionThrough(out) {
				t.Errorf("no 221 from the backend: the session did not get through")
			}
		})
		t.Run("Go-no-certificate-refused/"+l.name, func(t *testing.T) {
			t.Parallel()
			err := tpGoSession(proc, l, nil)
			if err == nil {
				t.Fatalf("a Go client without a certificate got a session")
			}
			if !strings.Contains(err.Error(), "certificate required") && !strings.Contains(err.Error(), "handshake failure") {
				t.Errorf("error %q, want the server's certificate-required alert", err)
			}
		})
		t.Run("Go-stranger-certificate-refused/"+l.name, func(t *testing.T) {
			t.Parallel()
			err := tpGoSession(proc, l, &pki.strangerCert)
			if err == nil {
				t.Fatalf("a Go client with another CA's certificate got a session")
			}
			if !strings.Contains(err.Error(), "unknown certificate authority") && !strings.Contains(err.Error(), "bad certificate") {
				t.Errorf("error %q, want the server's unknown-CA alert", err)
			}
		})
		t.Run("Go-certificate-delivery/"+l.name, func(t *testing.T) {
			t.Parallel()
			cfg := proc.tlsConfig(firstHost)
			cfg.Certificates = []tls.Certificate{pki.cert}
			c := smtpClient(t, l, cfg)
			token := uniqueToken(t)
			// no AUTH: a certificate verified under client_auth counts
			// as authenticated for require_auth
			if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "with a client certificate")); err != nil {
				t.Fatalf("delivery: %v", err)
			}
			sinkMessage(t, sinkDir, token)
		})
		t.Run("Go-no-resumption/"+l.name, func(t *testing.T) {
			t.Parallel()
			// a ticket must never stand in for the client certificate:
			// with client_auth no session resumes
			cfg := proc.tlsConfig(firstHost)
			cfg.Certificates = []tls.Certificate{pki.cert}
			cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
			for i := range 2 {
				c := smtpClient(t, l, cfg)
				if state, _ := c.TLSConnectionState(); state.DidResume {
					t.Errorf("session %d resumed under client_auth", i+1)
				}
				if err := c.Quit(); err != nil {
					t.Errorf("QUIT: %v", err)
				}
			}
		})
	}
}

// tpGoSession opens an SMTP session through l with crypto/tls and the given
// client certificate (none when nil), sent whatever CAs the server asks
// for, and returns the first error up to the
// EHLO after TLS. In TLS 1.3 the server checks the client certificate after
// the client's handshake is done, so a refusal may surface at the first read.
func tpGoSession(p *caddyProc, l listener, cert *tls.Certificate) error {
	cfg := p.tlsConfig(firstHost)
	if cert != nil {
		// sent even when the server's list of acceptable CAs does not
		// name its issuer (crypto/tls would otherwise send none)
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, nil
		}
	}
	c, err := smtpClientErr(l, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Noop()
}
