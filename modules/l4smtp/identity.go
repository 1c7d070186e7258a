package l4smtp

import (
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
)

// Identity: what the edge tells the backend about the client, which the
// backend cannot see for itself since the edge is its peer.

// writeProxyHeader tells the backend who the client is, with a PROXY header
// of the given version (1 or 2). The addresses are
// those of the client connection, or those a proxy_protocol handler in front
// of this one has read. A v2 header also carries the TLS facts, the SNI and
// the session id as TLVs (proxyTLVs); v1 has no room for them.
func writeProxyHeader(version int, sess *session, up net.Conn, deadline time.Time) error {
	client := l4proxyprotocol.GetConn(sess.cx)
	header := proxyproto.HeaderProxyFromAddrs(byte(version), client.RemoteAddr(), client.LocalAddr())
	if version == 2 {
		tlvs, err := proxyTLVs(sess)
		if err == nil {
			err = header.SetTLVs(tlvs)
		}
		if err != nil {
			return fmt.Errorf("the PROXY header's TLVs: %w", err)
		}
	}
	_ = up.SetWriteDeadline(deadline)
	defer func() { _ = up.SetWriteDeadline(time.Time{}) }()
	if _, err := header.WriteTo(up); err != nil {
		return fmt.Errorf("writing the PROXY header to %s: %w", up.RemoteAddr(), err)
	}
	return nil
}

// proxyTLVs are the TLVs of the v2 header, as HAProxy writes them (in its
// order), so that a backend that reads HAProxy's reads the edge's:
//   - PP2_TYPE_AUTHORITY, the SNI the client sent, absent when it sent none;
//     Dovecot takes it as the connection's local name;
//   - PP2_TYPE_UNIQUE_ID, the session's id, the session_id of the access
//     line, so that the backend's log and the edge's can be joined;
//   - PP2_TYPE_SSL (sslTLV); Dovecot treats a connection whose TLV says the
//     client used TLS as secured, which is what lets its ssl = required
//     work behind the edge.
func proxyTLVs(sess *session) ([]proxyproto.TLV, error) {
	tlvs := make([]proxyproto.TLV, 0, 3)
	if sess.tls != nil && sess.tls.ServerName != "" {
		tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte(sess.tls.ServerName)})
	}
	tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte(sess.id)})
	ssl, err := sslTLV(sess.tls).Marshal()
	if err != nil {
		return nil, err
	}
	return append(tlvs, ssl), nil
}

// verifyNotVerified is the SSL TLV's verify field when no client
// certificate was verified: the spec asks for zero only when one was, and
// non-zero otherwise. HAProxy leaves it zero when the client sent no
// certificate, which go-proxyproto's Verified (and any reader that trusts
// the field alone) would take for a verified one. 1 is OpenSSL's
// X509_V_ERR_UNSPECIFIED: the edge has no OpenSSL error code to give.
const verifyNotVerified = 1

// sslTLV is the PP2_TYPE_SSL TLV of a session with the TLS state state
// (nil: no TLS). The client bits say that the client used TLS, and whether
// it sent a certificate on this connection (CERT_CONN) or in the TLS
// session it resumed (CERT_SESS, set with CERT_CONN as HAProxy does). The
// verify field is 0 only when crypto/tls verified the certificate's chain,
// which it does under client_auth's verify_if_given and
// require_and_verify (and with trusted CAs); a certificate that only
// client_auth's verifier modules accepted is reported as not verified,
// since the edge cannot tell what they checked. The sub-TLVs name the
// version and the cipher suite as OpenSSL does (HAProxy writes OpenSSL's
// names).
func sslTLV(state *tls.ConnectionState) tlvparse.PP2SSL {
	ssl := tlvparse.PP2SSL{Verify: verifyNotVerified}
	if state == nil {
		return ssl
	}
	ssl.Client = tlvparse.PP2_BITFIELD_CLIENT_SSL
	if len(state.PeerCertificates) > 0 {
		ssl.Client |= tlvparse.PP2_BITFIELD_CLIENT_CERT_SESS
		if !state.DidResume {
			ssl.Client |= tlvparse.PP2_BITFIELD_CLIENT_CERT_CONN
		}
		if len(state.VerifiedChains) > 0 {
			ssl.Verify = 0
		}
	}
	ssl.TLV = []proxyproto.TLV{
		{Type: proxyproto.PP2_SUBTYPE_SSL_VERSION, Value: []byte(openSSLVersion(state.Version))},
		{Type: proxyproto.PP2_SUBTYPE_SSL_CIPHER, Value: []byte(openSSLCipher(state.CipherSuite))},
	}
	return ssl
}

// openSSLVersion is a TLS version as OpenSSL's SSL_get_version names it.
func openSSLVersion(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "TLSv1.3"
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS11:
		return "TLSv1.1"
	case tls.VersionTLS10:
		return "TLSv1"
	}
	return tls.VersionName(v)
}

// openSSLCipher is a cipher suite as OpenSSL's SSL_CIPHER_get_name names
// it: for TLS 1.3 the IANA name, before it OpenSSL's own. A suite crypto/tls
// added after this table gets its IANA name.
func openSSLCipher(id uint16) string {
	if name, ok := openSSLCipherNames[id]; ok {
		return name
	}
	return tls.CipherSuiteName(id)
}

// openSSLCipherNames are OpenSSL's names of the TLS 1.2 suites crypto/tls
// implements, from openssl ciphers -stdname (TestOpenSSLCipherNames
// compares them with the installed openssl).
var openSSLCipherNames = map[uint16]string{
	tls.TLS_RSA_WITH_RC4_128_SHA:                      "RC4-SHA",
	tls.TLS_RSA_WITH_3DES_EDE_CBC_SHA:                 "DES-CBC3-SHA",
	tls.TLS_RSA_WITH_AES_128_CBC_SHA:                  "AES128-SHA",
	tls.TLS_RSA_WITH_AES_256_CBC_SHA:                  "AES256-SHA",
	tls.TLS_RSA_WITH_AES_128_CBC_SHA256:               "AES128-SHA256",
	tls.TLS_RSA_WITH_AES_128_GCM_SHA256:               "AES128-GCM-SHA256",
	tls.TLS_RSA_WITH_AES_256_GCM_SHA384:               "AES256-GCM-SHA384",
	tls.TLS_ECDHE_ECDSA_WITH_RC4_128_SHA:              "ECDHE-ECDSA-RC4-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA:          "ECDHE-ECDSA-AES128-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA:          "ECDHE-ECDSA-AES256-SHA",
	tls.TLS_ECDHE_RSA_WITH_RC4_128_SHA:                "ECDHE-RSA-RC4-SHA",
	tls.TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA:           "ECDHE-RSA-DES-CBC3-SHA",
	tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA:            "ECDHE-RSA-AES128-SHA",
	tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA:            "ECDHE-RSA-AES256-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256:       "ECDHE-ECDSA-AES128-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256:         "ECDHE-RSA-AES128-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256:         "ECDHE-RSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256:       "ECDHE-ECDSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384:         "ECDHE-RSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384:       "ECDHE-ECDSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256:   "ECDHE-RSA-CHACHA20-POLY1305",
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: "ECDHE-ECDSA-CHACHA20-POLY1305",
}
