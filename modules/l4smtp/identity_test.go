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
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
)

// caSignedClientCert is a CA and a client certificate it signed.
func caSignedClientCert(t *testing.T) (*x509.CertPool, tls.Certificate) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test client CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "client.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pool, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// proxyHeaderOf runs one implicit TLS session through the backend option
// with proxy_protocol v2, the edge's TLS config changed by server and the
// client's config client, and returns the PROXY header the backend read,
// the session's id and the client's view of the TLS state.
func proxyHeaderOf(t *testing.T, server func(*tls.Config), client *tls.Config) (*proxyproto.Header, string, tls.ConnectionState) {
	t.Helper()
	via := viaBackend(t)
	h, _ := newTestHandler(t, func(h *Handler) {
		via.configure(h)
		h.ProxyProtocol = "v2"
	})
	if server != nil {
		cert, _ := testCert()
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		server(cfg)
		h.setTLSConfig(cfg)
	}
	headers := make(chan *proxyproto.Header, 1)
	go func() {
		up, err := via.ln.Accept()
		if err != nil {
			headers <- nil
			return
		}
		defer up.Close()
		b := &backend{t: t, conn: up, r: bufio.NewReader(up)}
		header, err := proxyproto.Read(b.r)
		if err != nil {
			t.Errorf("reading the PROXY header: %v", err)
		}
		headers <- header
		b.send("220 backend ESMTP\r\n")
		b.expect("QUIT")
		b.send("221 2.0.0 Bye\r\n")
	}()
	sess := newTestSession(h, nil)
	raw, done := serveOne(t, func(cx *layer4.Connection) error {
		sess.cx, sess.implicit = cx, true
		tlsConn := h.startTLS(sess, cx)
		if tlsConn == nil {
			return errors.New("handshake failed")
		}
		return h.relay(sess, tlsConn, nil)
	})
	conn := tls.Client(raw, client)
	if err := conn.Handshake(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	if got := readReplies(t, r, 1)[0]; got != "220 backend ESMTP" {
		t.Fatalf("greeting %q", got)
	}
	_, _ = io.WriteString(conn, "QUIT\r\n")
	readReplies(t, r, 1)
	<-done
	header := <-headers
	if header == nil {
		t.FailNow()
	}
	return header, sess.id, conn.ConnectionState()
}

// TestProxyHeaderTLVs: the v2 header carries the SNI, the session id and
// the TLS facts as HAProxy writes them, read back with go-proxyproto's
// reader and its SSL TLV parser.
func TestProxyHeaderTLVs(t *testing.T) {
	cas, clientCert := caSignedClientCert(t)
	verify := func(cfg *tls.Config) {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = cas
	}
	withCert := testClientTLS()
	withCert.Certificates = []tls.Certificate{clientCert}
	noSNI := &tls.Config{InsecureSkipVerify: true}
	tls12 := testClientTLS()
	tls12.MaxVersion = tls.VersionTLS12
	tls12.CipherSuites = []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384}

	tests := []struct {
		name      string
		server    func(*tls.Config)
		client    *tls.Config
		authority string // "": no PP2_TYPE_AUTHORITY
		bits      uint8
		verified  bool
		version   string
		cipher    string // "": the IANA name of the TLS 1.3 suite the client got
	}{
		{"client_auth, verified certificate", verify, withCert, "mail.test",
			tlvparse.PP2_BITFIELD_CLIENT_SSL | tlvparse.PP2_BITFIELD_CLIENT_CERT_CONN | tlvparse.PP2_BITFIELD_CLIENT_CERT_SESS,
			true, "TLSv1.3", ""},
		{"certificate requested, not verified", func(cfg *tls.Config) { cfg.ClientAuth = tls.RequestClientCert }, withCert, "mail.test",
			tlvparse.PP2_BITFIELD_CLIENT_SSL | tlvparse.PP2_BITFIELD_CLIENT_CERT_CONN | tlvparse.PP2_BITFIELD_CLIENT_CERT_SESS,
			false, "TLSv1.3", ""},
		{"no certificate", nil, testClientTLS(), "mail.test",
			tlvparse.PP2_BITFIELD_CLIENT_SSL, false, "TLSv1.3", ""},
		{"no certificate, no SNI", nil, noSNI, "",
			tlvparse.PP2_BITFIELD_CLIENT_SSL, false, "TLSv1.3", ""},
		{"TLS 1.2", nil, tls12, "mail.test",
			tlvparse.PP2_BITFIELD_CLIENT_SSL, false, "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			header, id, state := proxyHeaderOf(t, tt.server, tt.client)
			tlvs, err := header.TLVs()
			if err != nil {
				t.Fatalf("TLVs: %v", err)
			}
			want := []proxyproto.PP2Type{proxyproto.PP2_TYPE_UNIQUE_ID, proxyproto.PP2_TYPE_SSL}
			if tt.authority != "" {
				want = append([]proxyproto.PP2Type{proxyproto.PP2_TYPE_AUTHORITY}, want...)
			}
			var types []proxyproto.PP2Type
			for _, tlv := range tlvs {
				types = append(types, tlv.Type)
				switch tlv.Type {
				case proxyproto.PP2_TYPE_AUTHORITY:
					if string(tlv.Value) != tt.authority {
						t.Errorf("PP2_TYPE_AUTHORITY %q, want %q", tlv.Value, tt.authority)
					}
				case proxyproto.PP2_TYPE_UNIQUE_ID:
					if string(tlv.Value) != id || id == "" {
						t.Errorf("PP2_TYPE_UNIQUE_ID %q, want the session id %q", tlv.Value, id)
					}
				}
			}
			if len(types) != len(want) || !equalTypes(types, want) {
				t.Errorf("TLVs of types %x, want %x", types, want)
			}
			ssl, ok := tlvparse.FindSSL(tlvs)
			if !ok {
				t.Fatalf("no well-formed PP2_TYPE_SSL in %+v", tlvs)
			}
			if ssl.Client != tt.bits {
				t.Errorf("client bits %03b, want %03b", ssl.Client, tt.bits)
			}
			if ssl.Verified() != tt.verified {
				t.Errorf("verify field %d: Verified() = %v, want %v", ssl.Verify, ssl.Verified(), tt.verified)
			}
			if v, _ := ssl.SSLVersion(); v != tt.version {
				t.Errorf("PP2_SUBTYPE_SSL_VERSION %q, want %q", v, tt.version)
			}
			wantCipher := tt.cipher
			if wantCipher == "" {
				wantCipher = tls.CipherSuiteName(state.CipherSuite)
			}
			if c, _ := ssl.SSLCipher(); c != wantCipher {
				t.Errorf("PP2_SUBTYPE_SSL_CIPHER %q, want %q", c, wantCipher)
			}
			if len(ssl.TLV) != 2 {
				t.Errorf("sub-TLVs %+v, want the version and the cipher", ssl.TLV)
			}
		})
	}
}

func equalTypes(a, b []proxyproto.PP2Type) bool {
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestOpenSSLCipherNames: the names of the SSL TLV are OpenSSL's, as the
// installed openssl maps IANA names to them, for every TLS 1.2 suite
// crypto/tls implements that this openssl knows.
func TestOpenSSLCipherNames(t *testing.T) {
	path, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl is not installed (Debian: openssl): the table is not compared")
	}
	out, err := exec.Command(path, "ciphers", "-stdname", "ALL:COMPLEMENTOFALL:@SECLEVEL=0").Output()
	if err != nil {
		t.Fatalf("openssl ciphers: %v", err)
	}
	openssl := map[string]string{} // IANA name: OpenSSL name
	for _, line := range strings.Split(string(out), "\n") {
		// "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 - ECDHE-RSA-AES128-GCM-SHA256 TLSv1.2 ..."
		if f := strings.Fields(line); len(f) >= 3 && f[1] == "-" {
			openssl[f[0]] = f[2]
		}
	}
	compared := 0
	for _, suites := range [][]*tls.CipherSuite{tls.CipherSuites(), tls.InsecureCipherSuites()} {
		for _, s := range suites {
			want, known := openssl[s.Name]
			if !known {
				continue
			}
			compared++
			if got := openSSLCipher(s.ID); got != want {
				t.Errorf("%s is %q, openssl names it %q", s.Name, got, want)
			}
		}
	}
	if compared < 15 {
		t.Fatalf("compared %d suites only; openssl's list:\n%s", compared, out)
	}
}
