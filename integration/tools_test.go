package integration

import (
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The tests in this file drive the edge with real mail and TLS tools. Each
// is skipped when its tool is not installed, unless SMTP_EDGE_REQUIRE_TOOLS=1
// (as in CI), which makes a missing tool a failure.

// exitCode is the exit status of a command that ran and exited (0 for a nil
// error), or -1 when it did not run or was killed.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// swaksPrerequisiteError is swaks' documented exit status for "error in
// prerequisites (needed module not available)": for TLS, Net::SSLeay.
const swaksPrerequisiteError = 10

// testSwaks sends a message with swaks, verifying the certificate against
// Caddy's local CA root (--tls-verify --tls-ca-path): STARTTLS (--tls) on
// the STARTTLS listeners, implicit TLS (--tlsc) on the other.
func testSwaks(t *testing.T, env *sinkEnv, l listener) {
	swaks := requireTool(t, "swaks", "swaks")
	token := uniqueToken(t)
	peerCert := filepath.Join(t.TempDir(), "peer.pem")
	args := []string{
		"--server", "127.0.0.1",
		"--port", l.port(),
		"--ehlo", "client.localhost",
		"--from", "sender@example.com",
		"--to", "rcpt@example.com",
		"--header", "Subject: " + token,
		"--body", "sent by swaks through " + l.name + " " + token,
		"--tls-verify",
		"--tls-ca-path", env.proc.rootPath(),
		"--tls-sni", firstHost,
		"--tls-get-peer-cert", peerCert,
		"--timeout", "30",
	}
	if l.mode == implicitTLS {
		args = append(args, "--tlsc")
	} else {
		args = append(args, "--tls")
	}
	// swaks' exit status is the verdict: --tls requires STARTTLS ("exit if
	// TLS not available for any reason"), --tlsc is TLS from the first
	// byte, --tls-verify fails the negotiation on a certificate that does
	// not verify against the CA (exit 29, "error in TLS transaction"), and 0
	// means the whole transaction succeeded.
	_, err := runTool(t, nil, swaks, args...)
	switch code := exitCode(err); code {
	case 0:
	case swaksPrerequisiteError:
		skipOrFail(t, "swaks cannot do TLS on this machine: it exited 10, \"error in prerequisites\" "+
			"(its TLS needs the Perl module Net::SSLeay; Debian: apt-get install libnet-ssleay-perl)")
	default:
		t.Fatalf("swaks exited %d (%v); see EXIT CODES in swaks(1): 29 is an error in TLS, a certificate that does not verify included", code, err)
	}
	data := sinkMessage(t, env.sinkDir, token)
	if !strings.Contains(string(data), "Subject: "+token+"\r\n") {
		t.Errorf("the stored message lacks the subject line: %q", head(data))
	}

	// swaks verifies the chain but not the name: check the name here
	pemData, err := os.ReadFile(peerCert)
	if err != nil {
		t.Fatalf("swaks saved no peer certificate: %v", err)
	}
	leaf, err := firstPEMCertificate(pemData)
	if err != nil {
		t.Fatalf("swaks' peer certificate: %v", err)
	}
	checkLeafFromLocalCA(t, env.proc, leaf, firstHost)
}

// checkLeafFromLocalCA checks that leaf is for host and issued through
// Caddy's local intermediate to its root.
func checkLeafFromLocalCA(t *testing.T, p *caddyProc, leaf *x509.Certificate, host string) {
	t.Helper()
	interPEM, err := os.ReadFile(filepath.Join(filepath.Dir(p.rootPath()), "intermediate.crt"))
	if err != nil {
		t.Fatal(err)
	}
	inter, err := firstPEMCertificate(interPEM)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.verifyLeaf([]*x509.Certificate{leaf, inter}, host); err != nil {
		t.Errorf("the certificate the tool got: %v (names %q)", err, leaf.DNSNames)
	}
}

// openSSLArgs are the s_client arguments to reach l, with STARTTLS on a
// STARTTLS listener.
func openSSLArgs(env *sinkEnv, l listener) []string {
	args := []string{"s_client", "-connect", l.addr, "-servername", firstHost, "-CAfile", env.proc.rootPath(), "-crlf"}
	if l.mode == startTLS {
		args = append(args, "-starttls", "smtp")
	}
	return args
}

// testOpenSSL12: openssl s_client -tls1_2 completes a verified handshake and
// gets mail.localhost's certificate.
func testOpenSSL12(t *testing.T, env *sinkEnv, l listener) {
	openssl := requireTool(t, "openssl", "openssl")
	args := append(openSSLArgs(env, l), "-tls1_2", "-verify_hostname", firstHost, "-verify_return_error", "-alpn", "h2,http/1.1")
	out, err := runTool(t, []byte("QUIT\n"), openssl, args...)
	if err != nil {
		t.Fatalf("openssl s_client -tls1_2 failed: %v", err)
	}
	for _, want := range []string{
		"Verify return code: 0 (ok)",
		"Verified peername: " + firstHost,
		"New, TLSv1.2, Cipher is ",
		"No ALPN negotiated",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("openssl output lacks %q", want)
		}
	}
	// Caddy's local CA puts the name in the SAN only (empty subject);
	// check it on the certificate openssl printed
	leaf, err := firstPEMCertificate([]byte(out))
	if err != nil {
		t.Fatalf("openssl printed no server certificate: %v", err)
	}
	if !slices.Equal(leaf.DNSNames, []string{firstHost}) {
		t.Errorf("server certificate names %q, want [%s]", leaf.DNSNames, firstHost)
	}
	checkLeafFromLocalCA(t, env.proc, leaf, firstHost)
}

// testOpenSSL11: openssl s_client -tls1_1 is refused by the server. The
// cipher string lowers OpenSSL's own security level, so that the client
// really offers TLS 1.1 and the refusal observed is the server's alert.
func testOpenSSL11(t *testing.T, env *sinkEnv, l listener) {
	openssl := requireTool(t, "openssl", "openssl")
	args := append(openSSLArgs(env, l), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
	out, err := runTool(t, []byte("QUIT\n"), openssl, args...)
	if err == nil {
		t.Fatalf("openssl s_client -tls1_1 succeeded")
	}
	if strings.Contains(out, "no protocols available") {
		t.Fatalf("OpenSSL refused TLS 1.1 itself; the server was not tested")
	}
	if !strings.Contains(out, "alert protocol version") {
		t.Errorf("openssl output lacks the server's protocol version alert")
	}
	if strings.Contains(out, "BEGIN CERTIFICATE") {
		t.Errorf("the server sent its certificate to a TLS 1.1 client")
	}
}

// testCurl sends a message with curl: smtp:// with --ssl-reqd (STARTTLS) on
// the STARTTLS listeners, smtps:// on the implicit one, verifying against
// the local CA root (--cacert).
func testCurl(t *testing.T, env *sinkEnv, l listener) {
	curl := requireTool(t, "curl", "curl")
	token := uniqueToken(t)
	msg := testMessage(token, "sent by curl through "+l.name)
	msgFile := filepath.Join(t.TempDir(), "message.eml")
	if err := os.WriteFile(msgFile, msg, 0o600); err != nil {
		t.Fatal(err)
	}
	scheme := "smtp"
	if l.mode == implicitTLS {
		scheme = "smtps"
	}
	// curl's exit status is the verdict: with --ssl-reqd it ends the
	// transfer unless the connection is upgraded to TLS, STARTTLS for
	// smtp:// (exit 64, CURLE_USE_SSL_FAILED); a certificate that does not
	// verify for the name against --cacert is exit 60.
	_, err := runTool(t, nil, curl,
		"--silent", "--show-error", "--verbose",
		"--noproxy", "*",
		"--max-time", "30",
		"--ssl-reqd",
		"--cacert", env.proc.rootPath(),
		"--resolve", firstHost+":"+l.port()+":127.0.0.1",
		"--url", scheme+"://"+firstHost+":"+l.port(),
		"--mail-from", "sender@example.com",
		"--mail-rcpt", "rcpt@example.com",
		"--upload-file", msgFile,
	)
	if err != nil {
		t.Fatalf("curl exited %d (%v); see EXIT CODES in curl(1): 64 is TLS not negotiated, 60 a certificate that does not verify", exitCode(err), err)
	}
	assertSameBytes(t, "the stored message", sinkMessage(t, env.sinkDir, token), msg)
}
