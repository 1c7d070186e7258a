package l4smtp

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/layer4"
)

// The TLS placeholders: after its handshake the handler sets the same
// {l4.tls.*} placeholders as caddy-l4's tls handler, with the same values,
// so that a log format, a matcher (vars, vars_regexp) or a handler after
// smtp can use them as it would after tls:
//
//	{l4.tls.version}       tls1.2 or tls1.3
//	{l4.tls.cipher_suite}  e.g. TLS_AES_128_GCM_SHA256
//	{l4.tls.resumed}       whether the session was resumed
//	{l4.tls.server_name}   the SNI the client sent
//	{l4.tls.proto}         the negotiated ALPN protocol (none on mail ports)
//	{l4.tls.proto_mutual}  always true
//	{l4.tls.ech}           whether Encrypted ClientHello was accepted
//
// and, for a client that presented a certificate (client_auth),
// {l4.tls.client.*}: fingerprint, public_key, public_key_sha256, issuer,
// serial, subject, certificate_pem, certificate_der_base64, the subject
// and issuer name fields (subject.common_name, subject.serial,
// subject.organization, subject.organizational_unit, subject.country,
// subject.locality, subject.province, subject.street_address,
// subject.postal_code, and issuer.*), and the subject alternative names
// (san.dns_names, san.emails, san.ips, san.uris). A list field is the
// whole list, or with a suffix .N its element N (empty past the end).

const tlsPlaceholderPrefix = layer4.AppReplPrefix + "tls."

// setTLSPlaceholders makes the placeholders of state known to repl.
func setTLSPlaceholders(repl *caddy.Replacer, state *tls.ConnectionState) {
	repl.Map(func(key string) (any, bool) {
		field, ok := strings.CutPrefix(key, tlsPlaceholderPrefix)
		if !ok {
			return nil, false
		}
		return tlsPlaceholder(state, strings.ToLower(field))
	})
}

// tlsPlaceholder is the value of {l4.tls.<field>}.
func tlsPlaceholder(state *tls.ConnectionState, field string) (any, bool) {
	if certField, ok := strings.CutPrefix(field, "client."); ok {
		if len(state.PeerCertificates) == 0 {
			return nil, false
		}
		return clientCertPlaceholder(state.PeerCertificates[0], certField)
	}
	switch field {
	case "version":
		return caddytls.ProtocolName(state.Version), true
	case "cipher_suite":
		return tls.CipherSuiteName(state.CipherSuite), true
	case "resumed":
		return state.DidResume, true
	case "proto":
		return state.NegotiatedProtocol, true
	case "proto_mutual":
		return true, true
	case "server_name":
		return state.ServerName, true
	case "ech":
		return state.ECHAccepted, true
	}
	return nil, false
}

// clientCertPlaceholder is the value of {l4.tls.client.<field>}.
func clientCertPlaceholder(cert *x509.Certificate, field string) (any, bool) {
	if san, ok := strings.CutPrefix(field, "san."); ok {
		name, index, _ := strings.Cut(san, ".")
		switch name {
		case "dns_names":
			return listElement(cert.DNSNames, san, index)
		case "emails":
			return listElement(cert.EmailAddresses, san, index)
		case "ips":
			return listElement(cert.IPAddresses, san, index)
		case "uris":
			return listElement(cert.URIs, san, index)
		}
		return nil, false
	}
	if nameField, ok := strings.CutPrefix(field, "subject."); ok {
		return distinguishedNameField(&cert.Subject, nameField)
	}
	if nameField, ok := strings.CutPrefix(field, "issuer."); ok {
		return distinguishedNameField(&cert.Issuer, nameField)
	}
	switch field {
	case "fingerprint":
		sum := sha256.Sum256(cert.Raw)
		return hex.EncodeToString(sum[:]), true
	case "public_key", "public_key_sha256":
		der, err := publicKeyBytes(cert.PublicKey)
		if err != nil {
			return nil, true
		}
		if field == "public_key_sha256" {
			sum := sha256.Sum256(der)
			return hex.EncodeToString(sum[:]), true
		}
		return hex.EncodeToString(der), true
	case "issuer":
		return cert.Issuer, true
	case "serial":
		return cert.SerialNumber, true
	case "subject":
		return cert.Subject, true
	case "certificate_pem":
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), true
	case "certificate_der_base64":
		return base64.StdEncoding.EncodeToString(cert.Raw), true
	}
	return nil, false
}

// distinguishedNameField is a field of a subject or issuer name.
func distinguishedNameField(dn *pkix.Name, field string) (any, bool) {
	name, index, _ := strings.Cut(field, ".")
	switch name {
	case "common_name", "serial":
		if index != "" || field != name {
			return nil, false // there is only one
		}
		if name == "serial" {
			return dn.SerialNumber, true
		}
		return dn.CommonName, true
	case "organization":
		return listElement(dn.Organization, field, index)
	case "organizational_unit":
		return listElement(dn.OrganizationalUnit, field, index)
	case "country":
		return listElement(dn.Country, field, index)
	case "locality":
		return listElement(dn.Locality, field, index)
	case "province":
		return listElement(dn.Province, field, index)
	case "street_address":
		return listElement(dn.StreetAddress, field, index)
	case "postal_code":
		return listElement(dn.PostalCode, field, index)
	}
	return nil, false
}

// listElement is the whole list when field has no index, else the element
// the index names: nil past the end, unknown for an index that is not a
// number.
func listElement[T any](list []T, field, index string) (any, bool) {
	if !strings.Contains(field, ".") {
		return list, true
	}
	i, err := strconv.Atoi(index)
	if err != nil || i < 0 {
		return nil, false
	}
	if i >= len(list) {
		return nil, true
	}
	return list[i], true
}

// publicKeyBytes encodes a certificate's public key as caddy-l4's tls
// handler does: PKCS #1 for RSA, the uncompressed point for ECDSA, the raw
// key for Ed25519.
func publicKeyBytes(key any) ([]byte, error) {
	switch k := key.(type) {
	case *rsa.PublicKey:
		return asn1.Marshal(*k)
	case *ecdsa.PublicKey:
		ecdhKey, err := k.ECDH()
		if err != nil {
			return nil, err
		}
		return ecdhKey.Bytes(), nil
	case ed25519.PublicKey:
		return k, nil
	}
	return nil, fmt.Errorf("unsupported public key type %T", key)
}
