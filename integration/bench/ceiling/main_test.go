package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/smtp"
	"strings"
	"testing"
	"time"
)

// start runs a ceiling server on two loopback listeners and returns their
// addresses and a client TLS config that trusts it.
func start(t *testing.T) (implicit, starttls string, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "mail.test"},
		DNSNames:     []string{"mail.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	roots := x509.NewCertPool()
	roots.AddCert(cert)

	s := &server{
		tls:      &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12},
		hostname: "mail.test",
		timeout:  5 * time.Second,
	}
	var addrs [2]string
	for i, isImplicit := range []bool{true, false} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go s.serve(ln, isImplicit)
		addrs[i] = ln.Addr().String()
	}
	return addrs[0], addrs[1], &tls.Config{RootCAs: roots, ServerName: "mail.test"}
}

func send(t *testing.T, c *smtp.Client, body string) {
	t.Helper()
	if err := c.Mail("a@client.test"); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("b@mail.test"); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, body); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestSessions(t *testing.T) {
	implicit, starttls, cfg := start(t)
	long := strings.Repeat("x", 10000) + "\r\n.dot-stuffed\r\n" + strings.Repeat("y\r\n", 100000)

	t.Run("starttls", func(t *testing.T) {
		c, err := smtp.Dial(starttls)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Hello("client.test"); err != nil {
			t.Fatal(err)
		}
		if err := c.Mail("a@client.test"); err == nil || !strings.HasPrefix(err.Error(), "530") {
			t.Fatalf("MAIL before TLS: %v, want 530", err)
		}
		if ok, _ := c.Extension("STARTTLS"); !ok {
			t.Fatal("no STARTTLS offered")
		}
		if err := c.StartTLS(cfg); err != nil {
			t.Fatal(err)
		}
		if ok, _ := c.Extension("STARTTLS"); ok {
			t.Error("STARTTLS offered again after TLS")
		}
		send(t, c, "Subject: one\r\n\r\nhi\r\n")
		send(t, c, long)
		if err := c.Noop(); err != nil {
			t.Fatal(err)
		}
		if err := c.Quit(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("implicit", func(t *testing.T) {
		conn, err := tls.Dial("tcp", implicit, cfg)
		if err != nil {
			t.Fatal(err)
		}
		c, err := smtp.NewClient(conn, "mail.test")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Hello("client.test"); err != nil {
			t.Fatal(err)
		}
		send(t, c, long)
		if err := c.Reset(); err != nil {
			t.Fatal(err)
		}
		if err := c.Quit(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("injection", func(t *testing.T) {
		// bytes pipelined after STARTTLS must never reach the TLS session
		conn, err := net.Dial("tcp", starttls)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(conn)
		r.ReadString('\n') // greeting
		io.WriteString(conn, "STARTTLS\r\nRSET\r\n")
		if line, _ := r.ReadString('\n'); !strings.HasPrefix(line, "220 ") {
			t.Fatalf("STARTTLS: %q", line)
		}
		if _, err := r.ReadString('\n'); err != io.EOF {
			t.Fatalf("connection not closed after injected plaintext: %v", err)
		}
	})
}
