package l4smtp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4tls"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// provisionTLS fills in the defaults a mail port needs and builds the TLS
// configuration once, for all the handler's connections.
func (h *Handler) provisionTLS() error {
	if len(h.ConnectionPolicies) == 0 {
		h.ConnectionPolicies = caddytls.ConnectionPolicies{new(caddytls.ConnectionPolicy)}
	}
	for i, cp := range h.ConnectionPolicies {
		if cp.ALPN == nil {
			// Caddy's default is h2 and http/1.1, which a mail port must
			// never offer (ALPACA cross-protocol attacks)
			cp.ALPN = []string{}
		}
		for _, proto := range cp.ALPN {
			if proto == "h2" || proto == "http/1.1" || proto == "http/1.0" {
				h.logger.Warn("connection policy offers an HTTP ALPN protocol on a mail port",
					zap.Int("connection_policy", i),
					zap.String("alpn", proto))
			}
		}
		if cp.DefaultSNI == "" {
			cp.DefaultSNI = h.hostname
		}
		if cp.FallbackSNI == "" {
			// a name with no certificate (an alias pointing at the
			// edge, an IP address as the name) gets the first
			// hostname's, as Postfix and nginx serve theirs whatever
			// the SNI: a verifying client then reports a name
			// mismatch, one that does not verify connects, and
			// neither gets TLS alert 80 (internal error)
			cp.FallbackSNI = h.hostname
		}
	}
	if err := h.ConnectionPolicies.Provision(h.ctx); err != nil {
		return fmt.Errorf("smtp: setting up connection policies: %w", err)
	}
	for _, cp := range h.ConnectionPolicies {
		// a failed certificate lookup is the operator's to fix: the
		// session learns of it through the handshake's context
		if getCertificate := cp.TLSConfig.GetCertificate; getCertificate != nil {
			cp.TLSConfig.GetCertificate = func(chi *tls.ClientHelloInfo) (*tls.Certificate, error) {
				cert, err := getCertificate(chi)
				if info := handshakeInfoOf(chi); err != nil && info != nil {
					info.certErr = err
				}
				return cert, err
			}
		}
	}
	h.setTLSConfig(h.ConnectionPolicies.TLSConfig(h.ctx))
	return nil
}

// setTLSConfig makes cfg the TLS configuration of every connection of the
// handler. One configuration, not a copy per connection: a copy would make
// session ticket keys of its own, and no ticket would outlive its
// connection (the keys themselves come from sessiontickets.go). What is
// per connection, the ClientHello that later handlers and matchers may
// read and what the session learns of a failed handshake, is captured
// through the handshake's context (handshakeInfo).
func (h *Handler) setTLSConfig(cfg *tls.Config) {
	policyConfig := cfg.GetConfigForClient
	cfg.GetConfigForClient = func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		info := handshakeInfoOf(chi)
		if info != nil {
			info.hello.ClientHelloInfo = *chi
			info.helloSeen = true
			info.minVersion = cfg.MinVersion
		}
		if policyConfig == nil {
			return nil, nil
		}
		policy, err := policyConfig(chi)
		if info != nil && policy != nil {
			info.minVersion = policy.MinVersion
		}
		return policy, err
	}
	h.tlsConfig = cfg
}

// handshakeInfo is what one handshake's callbacks learn: the ClientHello,
// which later handlers and matchers may read, and what tells why a
// handshake failed.
type handshakeInfo struct {
	hello      l4tls.ClientHelloInfo
	helloSeen  bool   // a ClientHello was read
	minVersion uint16 // the lowest TLS version of the policy chosen for it
	certErr    error  // the certificate lookup failed
}

// handshakeInfoKey is the handshake context's key for its handshakeInfo.
type handshakeInfoKey struct{}

func handshakeInfoOf(chi *tls.ClientHelloInfo) *handshakeInfo {
	info, _ := chi.Context().Value(handshakeInfoKey{}).(*handshakeInfo)
	return info
}

// startTLS performs the server handshake over conn (cx behind the first
// byte of the ClientHello, which the STARTTLS dialogue or the detection of
// the client's mode read), within the handshake timeout. It records the negotiated state the way caddy-l4's tls
// handler does, so that later handlers and matchers can read it. It returns
// nil when the handshake failed; the connection is then closed by the caller's
// caller, and never used in plaintext.
func (h *Handler) startTLS(sess *session, conn net.Conn) *tls.Conn {
	cx := sess.cx
	info := new(handshakeInfo)
	ctx := context.WithValue(cx.Context, handshakeInfoKey{}, info)
	tlsConn := tls.Server(conn, h.tlsConfig)
	start := time.Now()
	_ = cx.SetDeadline(start.Add(h.timeout.handshake))
	// on a goroutine of its own: the handshake needs a deep stack, and a
	// goroutine keeps its stack's largest size for long after, while the
	// session's goroutine lives as long as the session (idle, mostly).
	// This saves about 8 KiB per idle session (docs/benchmarks.md).
	handshakeDone := make(chan error, 1)
	go func() { handshakeDone <- tlsConn.HandshakeContext(ctx) }()
	err := <-handshakeDone
	_ = cx.SetDeadline(time.Time{})
	if err != nil {
		metrics.handshake(sess.listener, time.Since(start), nil)
		why, detail := handshakeOutcome(err, info)
		sess.ended(why, detail)
		if why == outcomeNoCertificate {
			sess.log().Warn("no certificate to serve", zap.Error(info.certErr))
		} else {
			sess.log().Debug("TLS handshake failed",
				zap.Bool("implicit_tls", sess.implicit),
				zap.Error(err))
		}
		return nil
	}
	state := tlsConn.ConnectionState()
	metrics.handshake(sess.listener, time.Since(start), &state)
	sess.tls, sess.tlsConn = &state, tlsConn
	recordTLS(cx, &info.hello, &state)
	setTLSPlaceholders(cx.Replacer(), &state)
	// checked first: naming the cipher suite allocates, on every handshake
	if ce := h.logger.Check(zapcore.DebugLevel, "terminated TLS"); ce != nil {
		sess.log().Debug("terminated TLS",
			zap.String("server_name", state.ServerName),
			zap.String("tls_version", tls.VersionName(state.Version)),
			zap.String("cipher_suite", tls.CipherSuiteName(state.CipherSuite)),
			zap.Bool("resumed", state.DidResume),
			zap.Bool("implicit_tls", sess.implicit))
	}
	return tlsConn
}

// handshakeOutcome says why a handshake failed, from what its callbacks
// learnt and the error: the error's text alone is not the reason, since it
// is written for people.
func handshakeOutcome(err error, info *handshakeInfo) (outcome, string) {
	var alert *net.OpError
	var verification *tls.CertificateVerificationError
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return outcomeTimeout, "handshake"
	case info.certErr != nil:
		return outcomeNoCertificate, info.certErr.Error()
	case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, net.ErrClosed):
		return outcomeClientClosed, "during the TLS handshake"
	case !info.helloSeen:
		return outcomeHandshakeFailed, "not_tls"
	case !offersVersion(info.hello.SupportedVersions, info.minVersion):
		return outcomeTLSVersion, fmt.Sprintf("offered %s", versionNames(info.hello.SupportedVersions))
	case errors.As(err, &alert) && alert.Op == "remote error":
		// Go reports the client's alerts so, with the alert's name
		return outcomeHandshakeFailed, "client_alert: " + alert.Err.Error()
	case errors.As(err, &verification):
		return outcomeHandshakeFailed, "client_certificate: " + verification.Err.Error()
	}
	return outcomeHandshakeFailed, err.Error()
}

// offersVersion reports whether a client that offers versions can speak
// min or newer.
func offersVersion(versions []uint16, min uint16) bool {
	for _, v := range versions {
		if v >= min {
			return true
		}
	}
	return false
}

func versionNames(versions []uint16) string {
	names := make([]string, len(versions))
	for i, v := range versions {
		names[i] = tls.VersionName(v)
	}
	return strings.Join(names, ", ")
}

// recordTLS stores the handshake's ClientHello and connection state in the
// connection's variables under the keys caddy-l4's tls handler uses, so that
// l4tls.GetConnectionStates, l4tls.GetClientHelloInfos and the matchers that
// read them work after this handler as they do after tls.
func recordTLS(cx *layer4.Connection, hello *l4tls.ClientHelloInfo, state *tls.ConnectionState) {
	var hellos []l4tls.ClientHelloInfo
	if v, ok := cx.GetVar("tls_client_hellos").([]l4tls.ClientHelloInfo); ok {
		hellos = v
	}
	cx.SetVar("tls_client_hellos", append(hellos, *hello))

	var states []*tls.ConnectionState
	if v, ok := cx.GetVar("tls_connection_states").([]*tls.ConnectionState); ok {
		states = v
	}
	cx.SetVar("tls_connection_states", append(states, state))
}

// prefixedConn replays bytes already read from the connection before reading
// on from it: the first byte of the ClientHello, which the STARTTLS dialogue
// reads to tell a handshake from injected plaintext, and the detection of the
// client's mode to tell TLS from a client that waits.
type prefixedConn struct {
	net.Conn
	prefix []byte
}

// withPrefix is conn with prefix replayed first, or conn itself for none.
func withPrefix(conn net.Conn, prefix []byte) net.Conn {
	if len(prefix) == 0 {
		return conn
	}
	return &prefixedConn{Conn: conn, prefix: prefix}
}

func (c *prefixedConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}
