package main

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
	"io"
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// fixture is a go-smtp server in this process on three loopback listeners
// (STARTTLS, implicit TLS, plaintext) that counts and discards messages.
type fixture struct {
	ca       string // PEM file of its self-signed certificate
	addrs    map[string]string
	messages atomic.Int64
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{addrs: make(map[string]string)}
	cert, caFile := selfSigned(t, "mail.test")
	f.ca = caFile
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}

	be := smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &sinkSession{f}, nil })
	for _, mode := range []string{modeSTARTTLS, modeImplicit, modePlain} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f.addrs[mode] = ln.Addr().String()
		srv := smtp.NewServer(be)
		srv.Domain = "mail.test"
		srv.ErrorLog = quietLog{}
		switch mode {
		case modeSTARTTLS:
			srv.TLSConfig = cfg
		case modeImplicit:
			ln = tls.NewListener(ln, cfg)
		}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}
	return f
}

type sinkSession struct{ f *fixture }

func (s *sinkSession) Reset()                               {}
func (s *sinkSession) Logout() error                        { return nil }
func (s *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *sinkSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	s.f.messages.Add(1)
	return nil
}

type quietLog struct{}

func (quietLog) Printf(string, ...any) {}
func (quietLog) Println(...any)        {}

// selfSigned makes an ECDSA P-256 certificate for name and writes it to a
// PEM file that serves as the CA file.
func selfSigned(t *testing.T, name string) (tls.Certificate, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, file
}

// loadgen runs the command with args and decodes its JSON output into v.
func (f *fixture) loadgen(t *testing.T, v any, mode, tlsMode string, args ...string) {
	t.Helper()
	args = append([]string{mode, "-json", "-addr", f.addrs[tlsMode], "-tls", tlsMode, "-ca", f.ca, "-timeout", "5s"}, args...)
	var stdout, stderr bytes.Buffer
	if err := run(args, &stdout, &stderr); err != nil {
		t.Fatalf("loadgen %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	if err := json.Unmarshal(stdout.Bytes(), v); err != nil {
		t.Fatalf("loadgen %s: %v in %q", strings.Join(args, " "), err, stdout.String())
	}
	if stderr.Len() > 0 {
		t.Logf("loadgen %s, stderr:\n%s", mode, stderr.String())
	}
}

func TestModes(t *testing.T) {
	f := newFixture(t)
	for _, tlsMode := range []string{modeSTARTTLS, modeImplicit, modePlain} {
		t.Run(tlsMode, func(t *testing.T) {
			checkTLS := func(info *tlsInfo) {
				t.Helper()
				if (info != nil) != (tlsMode != modePlain) {
					t.Errorf("TLS info %v for %s", info, tlsMode)
				}
				if info != nil && (info.Version != "TLS 1.3" || info.Resumed) {
					t.Errorf("TLS %v, want TLS 1.3 with a full handshake", info)
				}
			}

			before := f.messages.Load()
			var r runResult
			f.loadgen(t, &r, "run", tlsMode, "-c", "4", "-d", "300ms", "-msgs", "2", "-size", "4k")
			if r.Sessions == 0 || r.Errors != 0 || r.Messages != 2*r.Sessions {
				t.Errorf("run: %d sessions, %d messages, errors %v", r.Sessions, r.Messages, r.ErrorKinds)
			}
			if got := f.messages.Load() - before; got != int64(r.Messages) {
				t.Errorf("run: server got %d messages, loadgen counted %d", got, r.Messages)
			}
			if r.P50ms <= 0 || r.P99ms < r.P50ms || r.SessionsPerSec <= 0 || r.BodyBytes != 4096 {
				t.Errorf("run: implausible report %+v", r)
			}
			checkTLS(r.TLS)

			var h holdResult
			f.loadgen(t, &h, "hold", tlsMode, "-n", "20", "-c", "5", "-hold", "50ms", "-check")
			if h.Held != 20 || h.NoopOK != 20 || h.Errors != 0 {
				t.Errorf("hold: %+v", h)
			}
			checkTLS(h.TLS)

			var b bulkResult
			f.loadgen(t, &b, "bulk", tlsMode, "-size", "1m", "-n", "2")
			if b.Bytes != 1<<20 || b.Messages != 2 || b.MiBPerSec <= 0 || b.BestMiBPerSec < b.MiBPerSec {
				t.Errorf("bulk: %+v", b)
			}
			checkTLS(b.TLS)

			var q rttResult
			f.loadgen(t, &q, "rtt", tlsMode, "-n", "50")
			if q.Count != 50 || q.P50us <= 0 || q.P99us < q.P50us || q.MinUs > q.P50us {
				t.Errorf("rtt: %+v", q)
			}
			checkTLS(q.TLS)
		})
	}
}

func TestResume(t *testing.T) {
	f := newFixture(t)
	for _, tlsMode := range []string{modeSTARTTLS, modeImplicit} {
		var r runResult
		f.loadgen(t, &r, "run", tlsMode, "-c", "1", "-d", "100ms", "-resume")
		if r.Sessions < 2 || r.Errors != 0 || r.TLS == nil || !r.TLS.Resumed || !r.Resume {
			t.Errorf("%s with -resume: %d sessions, TLS %v, resume %v; want the later ones resumed", tlsMode, r.Sessions, r.TLS, r.Resume)
		}
		// one worker: only the first session has no ticket to offer
		if h := r.HandshakeCount; h == nil || h.Handshakes != r.Sessions || h.Resumed != r.Sessions-1 ||
			!near(h.ResumedShare, float64(r.Sessions-1)/float64(r.Sessions)) {
			t.Errorf("%s with -resume: %d sessions, handshakes %+v; want all but the first resumed", tlsMode, r.Sessions, h)
		}

		r = runResult{}
		f.loadgen(t, &r, "run", tlsMode, "-c", "2", "-d", "100ms")
		if h := r.HandshakeCount; r.Resume || h == nil || h.Handshakes != r.Sessions || h.Resumed != 0 || h.ResumedShare != 0 {
			t.Errorf("%s without -resume: %d sessions, resume %v, handshakes %+v; want every one full", tlsMode, r.Sessions, r.Resume, h)
		}
	}

	// no TLS: no handshake figures at all
	var raw map[string]any
	f.loadgen(t, &raw, "run", modePlain, "-c", "1", "-d", "50ms", "-resume")
	for _, k := range []string{"handshakes", "resumed", "resumed_share"} {
		if _, ok := raw[k]; ok {
			t.Errorf("plain run reports %q: %v", k, raw)
		}
	}
}

// TestResumeRefused: a server that never resumes (each connection has ticket
// keys of its own, as with caddy-l4's tls handler) shows 0 resumed under
// -resume.
func TestResumeRefused(t *testing.T) {
	cert, ca := selfSigned(t, "mail.test")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln = freshTLSListener{ln, cert}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &sinkSession{&fixture{}}, nil }))
	srv.Domain, srv.ErrorLog = "mail.test", quietLog{}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	f := &fixture{ca: ca, addrs: map[string]string{modeImplicit: ln.Addr().String()}}
	var r runResult
	f.loadgen(t, &r, "run", modeImplicit, "-c", "2", "-d", "100ms", "-resume")
	if h := r.HandshakeCount; r.Sessions < 2 || h == nil || h.Handshakes != r.Sessions || h.Resumed != 0 || h.ResumedShare != 0 {
		t.Errorf("%d sessions, handshakes %+v; want none resumed", r.Sessions, h)
	}
}

// freshTLSListener starts TLS on each connection with a configuration of its
// own, so with ticket keys of its own.
type freshTLSListener struct {
	net.Listener
	cert tls.Certificate
}

func (l freshTLSListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return tls.Server(c, &tls.Config{Certificates: []tls.Certificate{l.cert}}), nil
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestHoldEndsOnSignal(t *testing.T) {
	f := newFixture(t)
	ready := filepath.Join(t.TempDir(), "ready")
	done := make(chan error, 1)
	var stdout bytes.Buffer
	go func() {
		done <- run([]string{"hold", "-addr", f.addrs[modePlain], "-tls", "plain", "-n", "3", "-ready-file", ready, "-hold", "1m"}, &stdout, io.Discard)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		data, err := os.ReadFile(ready)
		if err == nil {
			if string(data) != "3\n" {
				t.Fatalf("ready file says %q, want 3", data)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no ready file")
		}
		time.Sleep(10 * time.Millisecond)
	}
	p, _ := os.FindProcess(os.Getpid())
	p.Signal(sigRelease)
	select {
	case err := <-done:
		if err != nil || !strings.Contains(stdout.String(), "held 3 of 3") {
			t.Fatalf("hold: %v, %q", err, stdout.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("hold did not end on the signal")
	}
}

func TestErrorKinds(t *testing.T) {
	// a port nobody listens on
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var stdout, stderr bytes.Buffer
	if err := run([]string{"run", "-json", "-tls", "plain", "-addr", addr, "-c", "1", "-d", "50ms"}, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	var r runResult
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if r.Sessions != 0 || r.Errors == 0 || r.ErrorKinds["connect: refused"] != r.Errors {
		t.Errorf("errors %v, want only connect: refused", r.ErrorKinds)
	}

	// a server that refuses RCPT
	srv, cli := net.Pipe()
	go func() {
		defer srv.Close()
		io.WriteString(srv, "220 hi\r\n")
		buf := make([]byte, 512)
		for _, reply := range []string{"250 ok\r\n", "250 ok\r\n", "451 4.3.0 try later\r\n"} {
			if _, err := srv.Read(buf); err != nil {
				return
			}
			io.WriteString(srv, reply)
		}
	}()
	tg := target{mode: modePlain, ehlo: "c", from: "a@b", to: "c@d"}
	s := &session{conn: cli}
	s.r, s.w = newBuffers(cli)
	if err := tg.dialogue(s); err != nil {
		t.Fatal(err)
	}
	err = s.send(&tg, makeBody(100))
	if got := errorKind(err); got != "rcpt: reply 451" {
		t.Errorf("errorKind(%v) = %q", err, got)
	}
}

func TestMakeBody(t *testing.T) {
	header := len(makeBody(0))
	for size := range 400 {
		checkBody(t, size, header)
	}
	for _, size := range []int{4096, 25 << 20} {
		checkBody(t, size, header)
	}
}

func checkBody(t *testing.T, size, header int) {
	t.Helper()
	b := makeBody(size)
	if len(b) != size && !(size-header < 3 && len(b) == header) {
		t.Fatalf("makeBody(%d) has %d bytes", size, len(b))
	}
	if !bytes.HasSuffix(b, []byte("\r\n")) {
		t.Fatalf("makeBody(%d) does not end in CRLF", size)
	}
	for line := range bytes.SplitAfterSeq(b, []byte("\r\n")) {
		if len(line) > 78 || bytes.HasPrefix(line, []byte(".")) || bytes.Count(line, []byte("\n")) > 1 {
			t.Fatalf("makeBody(%d): bad line %q", size, line)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "4096": 4096, "4k": 4096, "4KB": 4096, "25m": 25 << 20, "25MiB": 25 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "k", "-1", "4g", "1.5m", "99999999999m"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) succeeded", in)
		}
	}
}
