package integration

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// The tests in this file drive the edge with real mail and TLS tools. Each
// is skipped when its tool is not installed, unless SMTP_EDGE_REQUIRE_TOOLS=1
// (as in CI), which makes a missing tool a failure.
//
// They judge a tool's run by what does not change with the tool's version or
// the machine: its documented exit status, the files it writes (a peer
// certificate, an OpenSSL session), the message stored in the sink, the SMTP
// replies of the edge and the backend, and the TLS records on the wire (a tap
// in the test process). Never by the wording of what the tool prints.

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

// testSwaks sends a message with swaks after AUTH PLAIN (--auth, as
// sinkUser), verifying the certificate against Caddy's local CA root
// (--tls-verify --tls-ca-path): STARTTLS (--tls) on the STARTTLS listeners,
// implicit TLS (--tlsc) on the other.
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
		"--auth", "PLAIN", "--auth-user", sinkUser, "--auth-password", sinkPassword,
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
	// not verify against the CA (exit 29, "error in TLS transaction"),
	// --auth fails the run unless the AUTH succeeds (exit 28, "error in
	// AUTH transaction"), and 0 means the whole transaction succeeded.
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
	if !bytes.Contains(data, []byte("Subject: "+token+"\r\n")) {
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

// openSSLArgs are the s_client arguments to reach l at addr (l's own
// address, or a tap in front of it), with STARTTLS on a STARTTLS listener.
func openSSLArgs(env *sinkEnv, l listener, addr string) []string {
	args := []string{"s_client", "-connect", addr, "-servername", firstHost, "-CAfile", env.proc.rootPath(), "-crlf"}
	if l.mode == startTLS {
		args = append(args, "-starttls", "smtp")
	}
	return args
}

// testOpenSSL12: openssl s_client -tls1_2 completes a verified handshake,
// gets mail.localhost's certificate, no ALPN although it offers h2 and
// http/1.1, and an SMTP session through to the backend. -verify_return_error
// makes a certificate that does not verify for the name against the local CA
// fail the handshake (and the exit status); the session openssl writes
// (-sess_out, after the backend's 221 and close: -ign_eof) has the protocol,
// the ALPN protocol selected and the server's certificate.
func testOpenSSL12(t *testing.T, env *sinkEnv, l listener) {
	openssl := requireTool(t, "openssl", "openssl")
	sessPath := filepath.Join(t.TempDir(), "session.pem")
	args := append(openSSLArgs(env, l, l.addr), "-tls1_2", "-verify_hostname", firstHost, "-verify_return_error",
		"-alpn", "h2,http/1.1", "-ign_eof", "-sess_out", sessPath)
	out, err := runTool(t, []byte("QUIT\n"), openssl, args...)
	if err != nil {
		t.Fatalf("openssl s_client -tls1_2 -verify_return_error failed: %v", err)
	}
	if !tpSessionThrough(out) {
		t.Errorf("no 221 from the backend: the session did not get through")
	}
	sess := readOpenSSLSession(t, sessPath)
	if sess.version != tls.VersionTLS12 {
		t.Errorf("openssl's session is %s, want TLS 1.2", tls.VersionName(sess.version))
	}
	if sess.verifyResult != 0 {
		t.Errorf("openssl's session has verify result %d, want 0 (X509_V_OK)", sess.verifyResult)
	}
	if sess.alpn != "" {
		t.Errorf("the server selected ALPN protocol %q, want none on a mail port", sess.alpn)
	}
	// Caddy's local CA puts the name in the SAN only (empty subject)
	if sess.peer == nil {
		t.Fatalf("openssl's session has no server certificate")
	}
	if !slices.Equal(sess.peer.DNSNames, []string{firstHost}) {
		t.Errorf("server certificate names %q, want [%s]", sess.peer.DNSNames, firstHost)
	}
	checkLeafFromLocalCA(t, env.proc, sess.peer, firstHost)
}

// testOpenSSL11: openssl s_client -tls1_1 is refused by the server. The
// cipher string lowers OpenSSL's own security level, so that the client
// really offers TLS 1.1; a tap between the two shows that it did, and that
// the server answered with a protocol_version alert.
func testOpenSSL11(t *testing.T, env *sinkEnv, l listener) {
	openssl := requireTool(t, "openssl", "openssl")
	tap := startTap(t, l.addr)
	args := append(openSSLArgs(env, l, tap.addr), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
	out, err := runTool(t, []byte("QUIT\n"), openssl, args...)
	if err == nil {
		t.Errorf("openssl s_client -tls1_1 succeeded")
	}
	checkVersionRefused(t, tap, tls.VersionTLS11)
	if bytes.Contains([]byte(out), []byte("-----BEGIN CERTIFICATE-----")) {
		t.Errorf("openssl printed a server certificate for a TLS 1.1 client")
	}
}

// testCurl sends a message with curl after AUTH PLAIN (--user as sinkUser,
// --login-options AUTH=PLAIN): smtp:// with --ssl-reqd (STARTTLS) on the
// STARTTLS listeners, smtps:// on the implicit one, verifying against the
// local CA root (--cacert).
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
		"--user", sinkUser+":"+sinkPassword,
		"--login-options", "AUTH=PLAIN",
		"--mail-from", "sender@example.com",
		"--mail-rcpt", "rcpt@example.com",
		"--upload-file", msgFile,
	)
	if err != nil {
		t.Fatalf("curl exited %d (%v); see EXIT CODES in curl(1): 64 is TLS not negotiated, 60 a certificate that does not verify", exitCode(err), err)
	}
	assertSameBytes(t, "the stored message", sinkMessage(t, env.sinkDir, token), msg)
}

// openSSLSession is what the tests read from the session openssl s_client
// writes with -sess_out: a PEM "SSL SESSION PARAMETERS" block holding
// OpenSSL's DER encoding of SSL_SESSION (ssl/ssl_asn1.c), the format
// sessions are stored and resumed in across OpenSSL versions.
type openSSLSession struct {
	version      uint16            // ssl_version: tls.VersionTLS12, ...
	cipherSuite  uint16            // the IANA number
	verifyResult int64             // the X509_V_* result; 0 (X509_V_OK) when absent
	peer         *x509.Certificate // the server's certificate
	alpn         string            // the ALPN protocol selected, "" for none
}

// readOpenSSLSession reads the session file openssl s_client wrote with
// -sess_out. s_client writes it when the server hands out a session (a
// ticket: the edge sends one in TLS 1.2 and 1.3).
func readOpenSSLSession(t *testing.T, path string) *openSSLSession {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("openssl wrote no session file (-sess_out; it writes one when the server issues a session ticket): %v", err)
	}
	s, err := parseOpenSSLSession(data)
	if err != nil {
		t.Fatalf("openssl's session file %s: %v\n%s", path, err, data)
	}
	t.Logf("openssl's session: %s, %s, verify result %d, ALPN %q", tls.VersionName(s.version),
		tls.CipherSuiteName(s.cipherSuite), s.verifyResult, s.alpn)
	return s
}

func parseOpenSSLSession(data []byte) (*openSSLSession, error) {
	var block *pem.Block
	for {
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no SSL SESSION PARAMETERS block")
		}
		if block.Type == "SSL SESSION PARAMETERS" {
			break
		}
	}
	var seq asn1.RawValue
	if rest, err := asn1.Unmarshal(block.Bytes, &seq); err != nil || len(rest) > 0 ||
		seq.Class != asn1.ClassUniversal || seq.Tag != asn1.TagSequence {
		return nil, fmt.Errorf("not a DER SEQUENCE (%v)", err)
	}
	// SEQUENCE { version INTEGER, ssl_version INTEGER, cipher OCTET STRING,
	// session_id OCTET STRING, master_key OCTET STRING, then optional
	// fields with explicit context tags: [3] peer Certificate, [5]
	// verify_result INTEGER, [16] alpn_selected OCTET STRING, ... }
	s := new(openSSLSession)
	var universal int
	for rest := seq.Bytes; len(rest) > 0; {
		var f asn1.RawValue
		var err error
		if rest, err = asn1.Unmarshal(rest, &f); err != nil {
			return nil, err
		}
		if f.Class == asn1.ClassUniversal {
			switch universal {
			case 1:
				var v int
				if _, err := asn1.Unmarshal(f.FullBytes, &v); err != nil {
					return nil, fmt.Errorf("ssl_version: %v", err)
				}
				s.version = uint16(v)
			case 2:
				var id []byte
				if _, err := asn1.Unmarshal(f.FullBytes, &id); err != nil || len(id) != 2 {
					return nil, fmt.Errorf("cipher: %x (%v)", id, err)
				}
				s.cipherSuite = uint16(id[0])<<8 | uint16(id[1])
			}
			universal++
			continue
		}
		if f.Class != asn1.ClassContextSpecific {
			continue
		}
		switch f.Tag {
		case 3:
			cert, err := x509.ParseCertificate(f.Bytes)
			if err != nil {
				return nil, fmt.Errorf("peer: %v", err)
			}
			s.peer = cert
		case 5:
			if _, err := asn1.Unmarshal(f.Bytes, &s.verifyResult); err != nil {
				return nil, fmt.Errorf("verify_result: %v", err)
			}
		case 16:
			var alpn []byte
			if _, err := asn1.Unmarshal(f.Bytes, &alpn); err != nil {
				return nil, fmt.Errorf("alpn_selected: %v", err)
			}
			s.alpn = string(alpn)
		}
	}
	if universal < 3 || s.version == 0 {
		return nil, errors.New("no ssl_version and cipher")
	}
	return s, nil
}

// tcpTap is a TCP relay on a loopback port of the test process, in front
// of a listener, that records the bytes each side sends. A test reads the
// TLS records a tool and the edge exchanged from it.
type tcpTap struct {
	addr       string
	ln         net.Listener
	wg         sync.WaitGroup
	fromClient lockedBuffer
	fromServer lockedBuffer
}

// startTap starts a tap in front of target. It is closed at t's cleanup.
func startTap(t *testing.T, target string) *tcpTap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tap := &tcpTap{
		addr:       ln.Addr().String(),
		ln:         ln,
		fromClient: lockedBuffer{b: new(bytes.Buffer)},
		fromServer: lockedBuffer{b: new(bytes.Buffer)},
	}
	tap.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tap.wg.Go(func() { tap.relay(c, target) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		tap.wg.Wait()
	})
	return tap
}

// relay copies between client and a new connection to target, recording
// each direction before passing it on; when one side stops sending, the
// other gets an end of stream after everything that came before it.
func (tap *tcpTap) relay(client net.Conn, target string) {
	defer client.Close()
	server, err := net.DialTimeout("tcp", target, 10*time.Second)
	if err != nil {
		return
	}
	defer server.Close()
	deadline := time.Now().Add(ioTimeout)
	_ = client.SetDeadline(deadline)
	_ = server.SetDeadline(deadline)
	pipe := func(dst, src net.Conn, record io.Writer) {
		_, _ = io.Copy(dst, io.TeeReader(src, record))
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() { pipe(server, client, &tap.fromClient) })
	pipe(client, server, &tap.fromServer)
	wg.Wait()
}

// streams returns what the clients and the server sent through the tap.
// Call it after the client has exited: it waits until every relayed
// connection has ended.
func (tap *tcpTap) streams() (fromClient, fromServer []byte) {
	tap.ln.Close()
	tap.wg.Wait()
	return bytes.Clone(tap.fromClient.b.Bytes()), bytes.Clone(tap.fromServer.b.Bytes())
}

// TLS record content types and alerts (RFC 8446 5.1, 6).
const (
	recordAlert            = 21
	recordHandshake        = 22
	alertFatal             = 2
	alertProtocolVersion   = 70
	handshakeClientHello   = 1
	extensionSupportedVers = 43
)

// tlsRecord is one TLS record of a recorded stream.
type tlsRecord struct {
	typ  byte
	body []byte
}

// tlsRecords parses the TLS records of a recorded stream, from its first
// handshake or alert record on: the bytes before it are the plaintext SMTP
// dialogue of a STARTTLS listener, text in which the bytes 21 and 22 never
// occur. A truncated last record is left out.
func tlsRecords(stream []byte) []tlsRecord {
	i := bytes.IndexAny(stream, string([]byte{recordAlert, recordHandshake}))
	if i < 0 {
		return nil
	}
	var records []tlsRecord
	for s := stream[i:]; len(s) >= 5; {
		n := int(s[3])<<8 | int(s[4])
		if len(s) < 5+n {
			break
		}
		records = append(records, tlsRecord{typ: s[0], body: s[5 : 5+n]})
		s = s[5+n:]
	}
	return records
}

// offeredVersions returns the TLS versions a ClientHello record offers:
// those of its supported_versions extension (RFC 8446 4.2.1), or, without
// one, its legacy_version (RFC 5246 7.4.1.2: the highest version the client
// supports).
func offeredVersions(r tlsRecord) ([]uint16, error) {
	b := r.body
	if r.typ != recordHandshake || len(b) < 4 || b[0] != handshakeClientHello {
		return nil, fmt.Errorf("not a ClientHello: record type %d, % x", r.typ, b[:min(len(b), 8)])
	}
	b = b[4:] // handshake type and length
	if len(b) < 2+32+1 {
		return nil, errors.New("ClientHello too short")
	}
	legacy := uint16(b[0])<<8 | uint16(b[1])
	b = b[2+32:] // legacy_version, random
	skip := func(lenBytes int) bool {
		if len(b) < lenBytes {
			return false
		}
		n := 0
		for _, c := range b[:lenBytes] {
			n = n<<8 | int(c)
		}
		if len(b) < lenBytes+n {
			return false
		}
		b = b[lenBytes+n:]
		return true
	}
	if !skip(1) || !skip(2) || !skip(1) { // session id, cipher suites, compression methods
		return nil, errors.New("ClientHello truncated")
	}
	if len(b) >= 2 {
		exts := b[2:]
		for len(exts) >= 4 {
			typ, n := int(exts[0])<<8|int(exts[1]), int(exts[2])<<8|int(exts[3])
			if len(exts) < 4+n {
				return nil, errors.New("ClientHello extension truncated")
			}
			data := exts[4 : 4+n]
			exts = exts[4+n:]
			if typ != extensionSupportedVers {
				continue
			}
			if len(data) < 1 || len(data) != 1+int(data[0]) || data[0]%2 != 0 {
				return nil, fmt.Errorf("malformed supported_versions % x", data)
			}
			var versions []uint16
			for v := data[1:]; len(v) >= 2; v = v[2:] {
				versions = append(versions, uint16(v[0])<<8|uint16(v[1]))
			}
			return versions, nil
		}
	}
	return []uint16{legacy}, nil
}

// checkVersionRefused checks the records of a tap that one handshake went
// through: the client offered no version above maxOffered (so the refusal
// was not the client's own), and the server answered the ClientHello with
// a fatal protocol_version alert and nothing else: no certificate, no
// session.
func checkVersionRefused(t *testing.T, tap *tcpTap, maxOffered uint16) {
	t.Helper()
	fromClient, fromServer := tap.streams()
	client := tlsRecords(fromClient)
	if len(client) == 0 {
		t.Fatalf("the client sent no ClientHello (it refused the version itself?): the server was not tested")
	}
	versions, err := offeredVersions(client[0])
	if err != nil {
		t.Fatalf("the client's first TLS record: %v", err)
	}
	for _, v := range versions {
		if v > maxOffered && v&0x0f0f != 0x0a0a { // GREASE values are not versions
			t.Fatalf("the client offered %s (versions %x), want none above %s: the test did not test what it says",
				tls.VersionName(v), versions, tls.VersionName(maxOffered))
		}
	}
	server := tlsRecords(fromServer)
	if len(server) == 0 {
		t.Fatalf("the server sent no TLS record (no alert) in answer to the ClientHello")
	}
	r := server[0]
	t.Logf("the client offered versions %x; the server's first TLS record: type %d, % x", versions, r.typ, r.body[:min(len(r.body), 16)])
	if r.typ != recordAlert || !bytes.Equal(r.body, []byte{alertFatal, alertProtocolVersion}) {
		t.Errorf("the server's first TLS record is type %d, % x..., want a fatal protocol_version alert (21: 02 46)", r.typ, r.body[:min(len(r.body), 16)])
	}
	for _, r := range server {
		if r.typ == recordHandshake {
			t.Errorf("the server sent a handshake message (ServerHello, certificate) to a client offering only %x", versions)
			break
		}
	}
}

// TestTLSRecordParsing shows that the tap's record parsing reads what
// checkVersionRefused relies on: the versions of real ClientHellos (Go's,
// with and without supported_versions), and an alert after the plaintext
// of a STARTTLS dialogue.
func TestTLSRecordParsing(t *testing.T) {
	t.Parallel()
	clientHello := func(minV, maxV uint16) []byte {
		c, s := net.Pipe()
		defer s.Close()
		go func() {
			defer c.Close()
			_ = tls.Client(c, &tls.Config{ServerName: firstHost, MinVersion: minV, MaxVersion: maxV}).Handshake()
		}()
		_ = s.SetDeadline(time.Now().Add(ioTimeout))
		hdr := make([]byte, 5)
		if _, err := io.ReadFull(s, hdr); err != nil {
			t.Fatal(err)
		}
		body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
		if _, err := io.ReadFull(s, body); err != nil {
			t.Fatal(err)
		}
		return append(hdr, body...)
	}
	for _, c := range []struct{ minV, maxV, want uint16 }{
		{tls.VersionTLS10, tls.VersionTLS11, tls.VersionTLS11},
		{tls.VersionTLS12, tls.VersionTLS12, tls.VersionTLS12},
		{tls.VersionTLS12, tls.VersionTLS13, tls.VersionTLS13},
	} {
		stream := append([]byte("EHLO client.localhost\r\nSTARTTLS\r\n"), clientHello(c.minV, c.maxV)...)
		records := tlsRecords(stream)
		if len(records) != 1 {
			t.Fatalf("%d records in a stream with one ClientHello", len(records))
		}
		versions, err := offeredVersions(records[0])
		if err != nil {
			t.Fatal(err)
		}
		if got := slices.Max(versions); got != c.want {
			t.Errorf("a ClientHello for %s..%s offers up to %x (%x), want %x", tls.VersionName(c.minV), tls.VersionName(c.maxV), got, versions, c.want)
		}
	}
	alert := tlsRecords([]byte("220 mail.localhost ESMTP\r\n250 ok\r\n220 2.0.0 Ready to start TLS\r\n\x15\x03\x03\x00\x02\x02\x46"))
	if len(alert) != 1 || alert[0].typ != recordAlert || !bytes.Equal(alert[0].body, []byte{alertFatal, alertProtocolVersion}) {
		t.Fatalf("the alert after a STARTTLS dialogue parsed as %v", alert)
	}
	if _, err := offeredVersions(alert[0]); err == nil {
		t.Errorf("an alert was read as a ClientHello")
	}
}
