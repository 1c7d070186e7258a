package l4smtp

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// testCert is a self-signed certificate for mail.test, made once.
var testCert = sync.OnceValues(func() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "mail.test"},
		DNSNames:     []string{"mail.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
})

// newTestHandler returns a handler set up as Provision would, but with a
// self-signed certificate in place of Caddy's TLS app, and a logger whose
// entries the test can read.
func newTestHandler(t testing.TB, configure func(*Handler)) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	// most tests relay mail without AUTH; require_auth has tests of its own
	// and the password guard's tables are the process's: its tests use their own
	h := &Handler{Hostnames: []string{"mail.test"}, RequireAuth: new(bool), AuthGuard: AuthGuard{Disabled: true}}
	if configure != nil {
		configure(h)
	}
	if _, err := h.setup(); err != nil {
		t.Fatal(err)
	}
	cert, err := testCert()
	if err != nil {
		t.Fatal(err)
	}
	h.setTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	core, logs := observer.New(zap.DebugLevel)
	h.logger = zap.New(core)
	h.accessLogger = h.logger.Named("access")
	return h, logs
}

func testClientTLS() *tls.Config {
	cert, _ := testCert()
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return &tls.Config{ServerName: "mail.test", RootCAs: pool}
}

// serveOne accepts one loopback connection and runs serve on it as the
// layer4 server would (a fresh layer4.Connection, closed when serve returns).
// It returns the client side and a channel that yields serve's result.
func serveOne[T any](t testing.TB, serve func(cx *layer4.Connection) T) (net.Conn, <-chan T) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan T, 1)
	go func() {
		defer ln.Close()
		conn, err := ln.Accept()
		if err != nil {
			var zero T
			done <- zero
			return
		}
		defer conn.Close()
		done <- serve(layer4.WrapConnection(conn, nil, zap.NewNop()))
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client, done
}

// readReplies reads n reply lines, without their CRLF.
func readReplies(t testing.TB, r *bufio.Reader, n int) []string {
	t.Helper()
	var lines []string
	for range n {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: reading a reply: %v", lines, err)
		}
		lines = append(lines, strings.TrimSuffix(line, "\r\n"))
	}
	return lines
}

// expectClosed checks that the server closed the connection without sending
// anything more.
func expectClosed(t *testing.T, r io.Reader) {
	t.Helper()
	rest, err := io.ReadAll(r)
	if err != nil && !errors.Is(err, net.ErrClosed) && !isReset(err) {
		t.Fatalf("waiting for the close: %v", err)
	}
	if len(rest) > 0 {
		t.Fatalf("unexpected bytes before the close: %q", rest)
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// newTestSession is a session outside the process-wide set, for tests that
// run one phase of a session.
func newTestSession(h *Handler, cx *layer4.Connection) *session { return newSession(h, cx) }

// implicitSession is a session in implicit TLS mode, outside the
// process-wide set.
func implicitSession(h *Handler, cx *layer4.Connection) *session {
	s := newSession(h, cx)
	s.implicit = true
	return s
}
