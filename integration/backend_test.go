package integration

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

const (
	backendUser     = "alice"
	backendPassword = "secret"
	backendDomain   = "backend.localhost"
	// backendMaxSize is the backend's SIZE limit, which the edge must
	// relay unchanged.
	backendMaxSize = 20 << 20
)

// authBackend is an SMTP server in the test process, on a loopback port,
// that requires AUTH PLAIN (alice/secret) before MAIL and records what it
// receives. It advertises PIPELINING, 8BITMIME, SMTPUTF8, CHUNKING and SIZE,
// and also STARTTLS (it has a certificate of its own), which the edge must
// never pass on to its clients.
type authBackend struct {
	addr  string
	conns atomic.Int64 // connections accepted

	mu         sync.Mutex
	messages   []receivedMessage
	passwords  []string // every password an AUTH PLAIN presented
	transcript bytes.Buffer
}

type receivedMessage struct {
	user string
	from string
	to   []string
	data []byte
}

func startAuthBackend(t *testing.T) *authBackend {
	t.Helper()
	b := new(authBackend)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = ln.Addr().String()

	srv := smtp.NewServer(b)
	srv.Domain = backendDomain
	srv.MaxMessageBytes = backendMaxSize
	srv.MaxRecipients = 0
	srv.EnableSMTPUTF8 = true
	srv.AllowInsecureAuth = true // it sits behind the TLS-terminating edge
	srv.ReadTimeout = ioTimeout
	srv.WriteTimeout = ioTimeout
	srv.TLSConfig = selfSignedTLS(t, backendDomain)
	srv.Debug = lockedWriter{mu: &b.mu, w: &b.transcript}

	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(countingListener{Listener: ln, n: &b.conns})
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return b
}

// NewSession implements smtp.Backend.
func (b *authBackend) NewSession(*smtp.Conn) (smtp.Session, error) {
	return &authSession{b: b}, nil
}

// message returns the message whose data contains token.
func (b *authBackend) message(token string) (receivedMessage, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.messages {
		if bytes.Contains(m.data, []byte(token)) {
			return m, true
		}
	}
	return receivedMessage{}, false
}

// sawPassword reports whether any AUTH PLAIN presented password.
func (b *authBackend) sawPassword(password string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.passwords {
		if p == password {
			return true
		}
	}
	return false
}

// transcriptContains reports whether s appeared anywhere in the server's
// traffic (both directions, all connections).
func (b *authBackend) transcriptContains(s string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Contains(b.transcript.Bytes(), []byte(s))
}

type authSession struct {
	b    *authBackend
	user string
	from string
	to   []string
}

var errAuthRequired = &smtp.SMTPError{
	Code:         530,
	EnhancedCode: smtp.EnhancedCode{5, 7, 0},
	Message:      "Authentication required",
}

func (s *authSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (s *authSession) Auth(mech string) (sasl.Server, error) {
	if mech != sasl.Plain {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return sasl.NewPlainServer(func(identity, username, password string) error {
		s.b.mu.Lock()
		s.b.passwords = append(s.b.passwords, password)
		s.b.mu.Unlock()
		if username != backendUser || password != backendPassword || (identity != "" && identity != username) {
			return smtp.ErrAuthFailed
		}
		s.user = username
		return nil
	}), nil
}

func (s *authSession) Mail(from string, _ *smtp.MailOptions) error {
	if s.user == "" {
		return errAuthRequired
	}
	s.from = from
	return nil
}

func (s *authSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if s.user == "" {
		return errAuthRequired
	}
	s.to = append(s.to, to)
	return nil
}

func (s *authSession) Data(r io.Reader) error {
	if s.user == "" {
		return errAuthRequired
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.b.mu.Lock()
	s.b.messages = append(s.b.messages, receivedMessage{
		user: s.user, from: s.from, to: append([]string(nil), s.to...), data: data,
	})
	s.b.mu.Unlock()
	return nil
}

func (s *authSession) Reset() {
	s.from = ""
	s.to = nil
}

func (s *authSession) Logout() error { return nil }

var _ smtp.AuthSession = (*authSession)(nil)

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.w.Write(p)
}

// selfSignedTLS is a server configuration with a throwaway self-signed
// certificate for name.
func selfSignedTLS(t *testing.T, name string) *tls.Config {
	t.Helper()
	return &tls.Config{
		Certificates: []tls.Certificate{selfSignedCert(t, name)},
		MinVersion:   tls.VersionTLS12,
	}
}

// selfSignedCert is a throwaway self-signed ECDSA P-256 certificate for name.
func selfSignedCert(t *testing.T, name string) tls.Certificate {
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
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
