package l4smtp

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
)

// clientCertificate makes a self-signed client certificate with every name
// field and alternative name the placeholders read.
func clientCertificate(t *testing.T, key any, public any) *x509.Certificate {
	t.Helper()
	name := pkix.Name{
		CommonName:         "client.example",
		SerialNumber:       "S-42",
		Organization:       []string{"Example Org", "Second Org"},
		OrganizationalUnit: []string{"Mail"},
		Country:            []string{"DE"},
		Locality:           []string{"Berlin"},
		Province:           []string{"BE"},
		StreetAddress:      []string{"Example Street 1"},
		PostalCode:         []string{"10115"},
	}
	tmpl := &x509.Certificate{
		SerialNumber:   big.NewInt(4242),
		Subject:        name,
		DNSNames:       []string{"client.example", "alt.example"},
		EmailAddresses: []string{"postmaster@example.com"},
		IPAddresses:    []net.IP{net.ParseIP("192.0.2.7")},
		URIs:           []*url.URL{{Scheme: "spiffe", Host: "example.com", Path: "/client"}},
		NotBefore:      time.Now().Add(-time.Hour),
		NotAfter:       time.Now().Add(time.Hour),
		ExtKeyUsage:    []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, public, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// unknownPlaceholder stands for a placeholder that the replacer does not know.
const unknownPlaceholder = "(unknownPlaceholder)"

// placeholder renders {l4.tls.<field>} as a log format would.
func placeholder(repl *caddy.Replacer, field string) string {
	got, err := repl.ReplaceOrErr("{"+tlsPlaceholderPrefix+field+"}", false, true)
	if err != nil {
		return unknownPlaceholder
	}
	return got
}

func TestTLSPlaceholders(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert := clientCertificate(t, key, &key.PublicKey)
	state := &tls.ConnectionState{
		Version:          tls.VersionTLS13,
		CipherSuite:      tls.TLS_AES_256_GCM_SHA384,
		DidResume:        true,
		ServerName:       "mail.test",
		PeerCertificates: []*x509.Certificate{cert},
	}
	repl := caddy.NewReplacer()
	setTLSPlaceholders(repl, state)

	fingerprint := sha256.Sum256(cert.Raw)
	point, _ := key.PublicKey.ECDH()
	pointSum := sha256.Sum256(point.Bytes())
	for key, want := range map[string]string{
		"version":                               "tls1.3",
		"cipher_suite":                          "TLS_AES_256_GCM_SHA384",
		"resumed":                               "true",
		"server_name":                           "mail.test",
		"proto":                                 "",
		"proto_mutual":                          "true",
		"ech":                                   "false",
		"VERSION":                               "tls1.3", // field names are not case-sensitive
		"client.fingerprint":                    hex.EncodeToString(fingerprint[:]),
		"client.public_key":                     hex.EncodeToString(point.Bytes()),
		"client.public_key_sha256":              hex.EncodeToString(pointSum[:]),
		"client.serial":                         "4242",
		"client.subject":                        cert.Subject.String(),
		"client.issuer":                         cert.Issuer.String(),
		"client.certificate_pem":                string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})),
		"client.certificate_der_base64":         base64.StdEncoding.EncodeToString(cert.Raw),
		"client.subject.common_name":            "client.example",
		"client.subject.serial":                 "S-42",
		"client.subject.organization":           "[" + cert.Subject.Organization[0] + " " + cert.Subject.Organization[1] + "]",
		"client.subject.organization.1":         cert.Subject.Organization[1],
		"client.subject.organization.2":         "",
		"client.subject.organizational_unit.0":  "Mail",
		"client.subject.country.0":              "DE",
		"client.subject.locality.0":             "Berlin",
		"client.subject.province.0":             "BE",
		"client.subject.street_address.0":       "Example Street 1",
		"client.subject.postal_code.0":          "10115",
		"client.issuer.common_name":             "client.example",
		"client.issuer.organizational_unit":     "[Mail]",
		"client.san.dns_names":                  "[client.example alt.example]",
		"client.san.dns_names.1":                "alt.example",
		"client.san.dns_names.5":                "",
		"client.san.emails.0":                   "postmaster@example.com",
		"client.san.ips.0":                      "192.0.2.7",
		"client.san.uris.0":                     "spiffe://example.com/client",
		"nonsense":                              unknownPlaceholder,
		"client.nonsense":                       unknownPlaceholder,
		"client.san.dns_namesx":                 unknownPlaceholder,
		"client.san.dns_names.x":                unknownPlaceholder,
		"client.san.dns_names.-1":               unknownPlaceholder,
		"client.subject.common_name.0":          unknownPlaceholder,
		"client.subject.organization_x":         unknownPlaceholder,
		"client.subject.organizational_unit.x1": unknownPlaceholder,
	} {
		if got := placeholder(repl, key); got != want {
			t.Errorf("{l4.tls.%s} = %q, want %q", key, got, want)
		}
	}

	// no client certificate: no client placeholders
	repl = caddy.NewReplacer()
	setTLSPlaceholders(repl, &tls.ConnectionState{Version: tls.VersionTLS12})
	for key, want := range map[string]string{"version": "tls1.2", "client.subject": unknownPlaceholder, "client.fingerprint": unknownPlaceholder} {
		if got := placeholder(repl, key); got != want {
			t.Errorf("without a client certificate: {l4.tls.%s} = %q, want %q", key, got, want)
		}
	}
}

// The public key placeholders encode each kind of key: PKCS #1 for RSA,
// the raw key for Ed25519.
func TestTLSPlaceholderPublicKeys(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pkcs1, err := asn1.Marshal(rsaKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	edPublic, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		cert *x509.Certificate
		want []byte
	}{
		"RSA":     {clientCertificate(t, rsaKey, &rsaKey.PublicKey), pkcs1},
		"Ed25519": {clientCertificate(t, edKey, edPublic), edPublic},
	} {
		repl := caddy.NewReplacer()
		setTLSPlaceholders(repl, &tls.ConnectionState{PeerCertificates: []*x509.Certificate{tc.cert}})
		if got := placeholder(repl, "client.public_key"); got != hex.EncodeToString(tc.want) {
			t.Errorf("%s: public_key %q, want %x", name, got, tc.want)
		}
	}
}

// After the handshake the placeholders are on the connection's replacer,
// for the handlers after smtp.
func TestTLSPlaceholdersAfterHandshake(t *testing.T) {
	h, _ := newTestHandler(t, func(h *Handler) { h.ImplicitTLS = true })
	client, done := serveOne(t, func(cx *layer4.Connection) string {
		conn := h.startTLS(implicitSession(h, cx), cx)
		if conn == nil {
			return "handshake failed"
		}
		return cx.Replacer().ReplaceAll("{l4.tls.server_name} {l4.tls.version} {l4.tls.resumed}", "?")
	})
	cfg := testClientTLS()
	cfg.MaxVersion = tls.VersionTLS12
	conn := tls.Client(client, cfg)
	if err := conn.Handshake(); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	go io.Copy(io.Discard, conn)
	if got := <-done; got != "mail.test tls1.2 false" {
		t.Errorf("placeholders after the handshake: %q", got)
	}
}
