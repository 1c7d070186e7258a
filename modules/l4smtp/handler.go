// Package l4smtp is the SMTP edge for the Caddy layer4 app: the
// layer4.handlers.smtp handler, which terminates TLS for an SMTP listener
// (implicit TLS or STARTTLS) with certificates from Caddy's TLS app and
// relays the decrypted session to the backend MTA, itself or through the
// next handler (caddy-l4's proxy).
package l4smtp

import (
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// Handler puts an SMTP listener behind Caddy's TLS: it terminates TLS for a
// mail port with certificates that Caddy obtains and renews, and relays the
// decrypted session to the backend MTA: itself, with the backend option, or
// through the next handler (caddy-l4's proxy).
//
// With implicit_tls (port 465, RFC 8314) the TLS handshake comes first and the
// backend's greeting is the first thing the client reads, inside TLS.
//
// Without it (ports 587 and 2525) the handler speaks the plaintext part of the
// dialogue itself and never contacts the backend before TLS: it greets,
// answers EHLO with ENHANCEDSTATUSCODES and STARTTLS only (never AUTH),
// answers HELO, NOOP, RSET and QUIT, refuses mail commands with 530, and on
// STARTTLS (RFC 3207) replies 220 and performs the handshake. A client that
// sends anything after its STARTTLS line before the handshake (the STARTTLS
// command injection attack, CVE-2011-0411) is disconnected without TLS, and
// nothing it sent before TLS ever reaches the backend. After the handshake the
// backend's own greeting is swallowed, since the client was already greeted and
// now sends EHLO.
//
// In both modes the edge reads the session after TLS as the backend will
// (tracker.go) and relays it, with the backend's replies in command order
// (RFC 2920), except that: STARTTLS, XCLIENT and XFORWARD are removed from the
// backend's EHLO replies, so that the client sees the backend's real
// capabilities (PIPELINING, CHUNKING, SMTPUTF8, AUTH, ...) and nothing it
// must not use; a bare CR or LF from the client reaches the backend as CRLF
// (bare_line_ends), so that no backend ends a message where the edge does not
// (SMTP smuggling); MAIL, RCPT, DATA and BDAT before a successful AUTH get 530
// from the edge (require_auth); a client's XCLIENT or XFORWARD gets 502, and
// STARTTLS 503, from the edge; a failed AUTH's 535 waits for the password
// guard's delay (auth_guard). With xclient the backend learns who the client
// is inside the session (xclient.go); with proxy_protocol, from a header. A
// backend that cannot be reached or does not greet in time gets the client a
// 421.
//
// Every listener can serve both kinds of client (detect_tls): a client that
// starts with a TLS ClientHello gets implicit TLS, a client that waits for a
// greeting gets the STARTTLS dialogue. It is on by default on implicit TLS
// listeners, where a client that stays silent for a second is greeted in
// plaintext (tlsmode.go).
//
// TLS sessions resume (TLS 1.2 tickets, TLS 1.3 pre-shared keys) with keys
// from Caddy's session ticket key service (sessiontickets.go); after the
// handshake the handler sets caddy-l4's {l4.tls.*} placeholders
// (placeholders.go).
//
// When Caddy exits, sessions between mail transactions get "421 4.3.2" and
// are closed, and sessions in a transaction get it as soon as the
// transaction is over, within the shutdown timeout (see shutdown.go).
//
// Every hostname gets a certificate from Caddy's TLS app, with the Caddyfile's
// global TLS options; internal names (localhost, *.localhost, *.internal, IP
// addresses) get one from Caddy's local CA. A client that asks for a name
// without a certificate gets the first hostname's.
//
// Caddyfile, inside the layer4 global option; routes with an smtp handler must
// have no byte-reading matchers in front, because SMTP clients wait for the
// server to speak first:
//
//	{
//		layer4 {
//			:465 {
//				route {
//					smtp mail.example.com {
//						implicit_tls
//						backend 127.0.0.1:10587
//						proxy_protocol v2
//					}
//				}
//			}
//			:587 :2525 {
//				route {
//					smtp mail.example.com {
//						backend 127.0.0.1:10587
//						proxy_protocol v2
//					}
//				}
//			}
//		}
//	}
//
// Several mail servers, balanced and health-checked (upstreams.go,
// loadbalancing.go, healthchecks.go):
//
//	smtp mail.example.com {
//		backend {
//			to 10.0.0.21:10587 weight 2
//			to 10.0.0.22:10587
//			lb_policy round_robin
//			health_interval 10s
//			fail_duration 30s
//		}
//		proxy_protocol v2
//	}
//
// or, without backend, a proxy handler after smtp in the route.
type Handler struct {
	// The names this edge answers for. The first is the name in the greeting
	// and the EHLO reply, and the certificate that clients which send no SNI
	// get. Caddy obtains and renews a certificate for each one. Required.
	Hostnames []string `json:"hostnames,omitempty"`

	// Start TLS with the first byte (port 465, "submissions"), instead of the
	// plaintext dialogue that leads to STARTTLS. Default: false.
	ImplicitTLS bool `json:"implicit_tls,omitempty"`

	// Where the session goes after TLS, and how the backend learns who the
	// client is: backends or upstreams, proxy_protocol, xclient. Clients
	// that ask for a name of sni_routes by SNI go where that route says
	// instead.
	BackendOptions

	// Backends of their own for some of the hostnames: a client that asks
	// for one of a route's names by SNI (with implicit TLS, or in its
	// STARTTLS handshake) is relayed to that route's backends, with its
	// proxy_protocol or xclient; every other client (no SNI, another
	// hostname, a name the edge has no certificate for) goes to the
	// handler's own backend options. A route's names must be hostnames of
	// the handler, each in one route at most, and a route needs backends
	// or upstreams. Default: none.
	SNIRoutes []*SNIRoute `json:"sni_routes,omitempty"`

	// Answer MAIL, RCPT, DATA and BDAT with "530 5.7.0 Authentication
	// required" until the client has authenticated (the backend's 235 to
	// AUTH, or a client certificate verified under client_auth), so that
	// no backend that trusts the edge's address can be made an open relay
	// through it. Turn it off only for backends that authenticate clients
	// by other means. Default: true.
	RequireAuth *bool `json:"require_auth,omitempty"`

	// What the backend gets for a bare CR or bare LF that the client sends
	// after TLS, in a command line or in message content: "normalize" sends
	// CRLF, and keeps a "." line that is not CRLF "." CRLF as content, so
	// that every backend ends a message where the edge and RFC 5321 do
	// (no SMTP smuggling, CVE-2023-51764/5/6); "pass" sends the bytes as the
	// client sent them, and a backend that accepts another end of data than
	// CRLF "." CRLF can then be made to take a second message the edge
	// never saw. BDAT chunks always pass unchanged. Default: "normalize".
	BareLineEnds string `json:"bare_line_ends,omitempty"`

	// The text after "220 <first hostname> " in the greeting before STARTTLS.
	// Default: "ESMTP".
	Greeting string `json:"greeting,omitempty"`

	// The TLS connection policies, as in caddy-l4's tls handler. Default: one
	// policy with TLS 1.2 as the minimum, no ALPN (mail ports never offer
	// h2 or http/1.1; an explicit alpn list is used as given), and
	// default_sni and fallback_sni set to the first hostname, so that clients
	// that send no SNI, or a name with no certificate (an alias, an IP
	// address), still get its certificate. A policy's own default_sni and
	// fallback_sni win.
	ConnectionPolicies caddytls.ConnectionPolicies `json:"connection_policies,omitempty"`

	// How long to wait for each step. Every field has its default when unset.
	Timeouts Timeouts `json:"timeouts,omitzero"`

	// How many protocol errors (unknown or refused commands, syntax errors,
	// over-long lines) a client may make before TLS, until it gets 421 and is
	// disconnected. Default: 5.
	MaxErrors int `json:"max_errors,omitempty"`

	// How many sessions this handler serves at once, over all the
	// addresses of its server. A client over the limit gets "421 4.7.0
	// Too many connections" in plaintext and is closed before any TLS work.
	// The count starts afresh with each config load. Default: 0, no limit.
	MaxConnections int `json:"max_connections,omitempty"`

	// How many sessions one client IP address may have at once; over it,
	// as for max_connections. Clients behind one NAT share an address.
	// Default: 0, no limit.
	MaxConnectionsPerIP int `json:"max_connections_per_ip,omitempty"`

	// What to do with a client that sends before the greeting is complete,
	// as spam bots do and real clients never do (Postfix postscreen's
	// pregreet test): "reject" sends the first line of a multi-line
	// greeting, listens until the pregreet timeout is over, and disconnects
	// a client that talks with "521 5.5.1 Protocol error"; "off" greets at
	// once. It applies to the STARTTLS dialogue only (with implicit TLS the
	// client speaks first). A client whose first bytes are a TLS
	// ClientHello gets implicit TLS instead, when it sends them within
	// detect_tls, which with reject is the start of the pregreet wait.
	// Default: "off", because the wait delays every session by the
	// pregreet timeout.
	EarlyTalker string `json:"early_talker,omitempty"`

	// Serve both kinds of client on this listener, whatever its mode: the
	// edge waits this long for the client's first bytes. A client that
	// starts with a TLS ClientHello (configured for implicit TLS) gets
	// implicit TLS; a client that stays silent (it waits for a greeting:
	// configured for STARTTLS, or for no TLS) gets the plaintext greeting
	// and the STARTTLS dialogue, with all its rules. Other first bytes are
	// treated as the listener's mode treats them. No client ever gets a
	// plaintext reply to TLS bytes, or TLS to plaintext. A negative value
	// (off in the Caddyfile) turns detection off. Default: 1s with
	// implicit_tls, where TLS clients pay nothing (their ClientHello ends
	// the wait) and a client that waits for a greeting gets it after the
	// wait; off without implicit_tls, because the wait would delay every
	// greeting (200ms is enough for TLS clients on most networks), except
	// with early_talker reject, which waits anyway: there the first 200ms
	// of the pregreet wait (at most half of it), before the first greeting
	// line.
	DetectTLS caddy.Duration `json:"detect_tls,omitempty"`

	// Slow down and ban password guessers (authguard.go): each failed
	// AUTH delays its reply more, and an address with too many failures
	// is turned away at connect for a while. Default: on, with the
	// defaults of its fields.
	AuthGuard AuthGuard  `json:"auth_guard,omitzero"`
	guard     *authGuard // nil when the guard is off

	hostname  string // the first of Hostnames, after placeholders
	greeting  []byte
	replies   replies
	timeout   timeouts
	maxErrors int
	detectTLS time.Duration // zero: detect_tls is off
	limits    *connLimits
	tlsConfig *tls.Config // shared by all connections: see setTLSConfig

	route        *backendRoute            // where sessions go after TLS
	routes       map[string]*backendRoute // by SNI: sni_routes
	sniRoutes    []*backendRoute          // the same, each once
	requireAuth  bool
	passLineEnds bool

	app          *App
	ctx          caddy.Context
	logger       *zap.Logger
	accessLogger *zap.Logger // one line per session: access.go
}

// Timeouts are the timeouts of an SMTP session at the edge.
type Timeouts struct {
	// Before TLS: how long to wait for each line from the client (and for
	// the client to take each reply). Default: 1m.
	Command caddy.Duration `json:"command,omitempty"`

	// How long the TLS handshake may take. Default: 10s.
	Handshake caddy.Duration `json:"handshake,omitempty"`

	// After TLS: how long to wait for the backend to be dialled and to send
	// its greeting. Default: 30s.
	Backend caddy.Duration `json:"backend,omitempty"`

	// With early_talker reject: how long to listen for a client that talks
	// before the greeting is complete. Default: 1s.
	Pregreet caddy.Duration `json:"pregreet,omitempty"`

	// After TLS: how long the session may go without a byte in either
	// direction before it is closed. RFC 5321 asks servers to wait up to 10
	// minutes for the reply to the end of a message. Default: 10m.
	Idle caddy.Duration `json:"idle,omitempty"`

	// When Caddy exits (caddy stop, SIGTERM, SIGINT): how long a session in
	// the middle of a mail transaction may go on to finish it. Sessions
	// between transactions get "421 4.3.2" at once, and a session in a
	// transaction as soon as the transaction is over; at the end of this
	// time every session left gets it. A reload does not end sessions.
	// Keep it below the time a service manager waits before it kills Caddy
	// (systemd's TimeoutStopSec, 5s in Caddy's own unit file). Default: 30s.
	Shutdown caddy.Duration `json:"shutdown,omitempty"`
}

// timeouts are the handler's Timeouts with the defaults filled in.
type timeouts struct {
	command, handshake, backend, idle, shutdown time.Duration
	pregreet                                    time.Duration // zero unless early_talker is reject
}

const (
	defaultGreeting  = "ESMTP"
	defaultCommand   = time.Minute
	defaultHandshake = 10 * time.Second
	defaultBackend   = 30 * time.Second
	defaultIdle      = 10 * time.Minute
	defaultMaxErrors = 5
	defaultPregreet  = time.Second
	defaultShutdown  = 30 * time.Second
)

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.smtp",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler, registers its hostnames for certificates
// and its TLS configuration for session ticket keys.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.ctx = ctx
	h.logger = ctx.Logger()
	h.accessLogger = h.logger.Named("access")
	names, err := h.setup()
	if err != nil {
		return err
	}
	if err := h.provisionTLS(); err != nil {
		return err
	}
	if h.app, err = smtpApp(ctx); err != nil {
		return err
	}
	if err := metrics.register(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("smtp: registering metrics: %w", err)
	}
	if err := h.app.register(names); err != nil {
		return err
	}
	h.app.tickets.register(h.tlsConfig)
	h.route.start(h.logger.Named("upstreams"))
	for _, r := range h.sniRoutes {
		r.start(h.logger.Named("upstreams"))
	}
	return nil
}

// Cleanup stops the session ticket key updates of the handler's TLS
// configuration and its upstreams' health checks.
func (h *Handler) Cleanup() error {
	if h.app != nil {
		h.app.tickets.unregister(h.tlsConfig)
	}
	if h.route != nil {
		h.route.close()
	}
	for _, r := range h.sniRoutes {
		r.close()
	}
	return nil
}

// setup checks the configuration and fills in the defaults. It returns the
// hostnames, cleaned up, for certificate management.
func (h *Handler) setup() ([]string, error) {
	repl := caddy.NewReplacer()
	if len(h.Hostnames) == 0 {
		return nil, errors.New("smtp: at least one hostname is required")
	}
	names := make([]string, 0, len(h.Hostnames))
	for _, raw := range h.Hostnames {
		name := strings.ToLower(strings.TrimSuffix(repl.ReplaceKnown(raw, ""), "."))
		if err := checkHostname(name); err != nil {
			return nil, fmt.Errorf("smtp: hostname %q: %w", raw, err)
		}
		names = append(names, name)
	}
	h.hostname = names[0]

	greeting := defaultGreeting
	if h.Greeting != "" {
		greeting = repl.ReplaceKnown(h.Greeting, "")
	}
	if strings.ContainsAny(greeting, "\r\n\x00") {
		return nil, errors.New("smtp: greeting must be a single line of text")
	}
	h.greeting = []byte("220 " + h.hostname + " " + greeting + "\r\n")
	h.replies = newReplies(h.hostname)

	for what, d := range map[string]caddy.Duration{
		"command": h.Timeouts.Command, "handshake": h.Timeouts.Handshake,
		"backend": h.Timeouts.Backend, "idle": h.Timeouts.Idle,
		"pregreet": h.Timeouts.Pregreet, "shutdown": h.Timeouts.Shutdown,
	} {
		if d < 0 {
			return nil, fmt.Errorf("smtp: timeouts: %s must not be negative, got %s", what, time.Duration(d))
		}
	}
	h.timeout.command = durationOr(h.Timeouts.Command, defaultCommand)
	h.timeout.handshake = durationOr(h.Timeouts.Handshake, defaultHandshake)
	h.timeout.backend = durationOr(h.Timeouts.Backend, defaultBackend)
	h.timeout.idle = durationOr(h.Timeouts.Idle, defaultIdle)
	h.timeout.shutdown = durationOr(h.Timeouts.Shutdown, defaultShutdown)

	if h.MaxConnections < 0 || h.MaxConnectionsPerIP < 0 {
		return nil, fmt.Errorf("smtp: connection limits must not be negative, got max_connections %d, max_connections_per_ip %d",
			h.MaxConnections, h.MaxConnectionsPerIP)
	}
	h.limits = &connLimits{max: h.MaxConnections, maxPerIP: h.MaxConnectionsPerIP}

	if err := h.setupBackends(names); err != nil {
		return nil, err
	}
	if err := h.setupReading(); err != nil {
		return nil, err
	}

	switch h.EarlyTalker {
	case "", "off":
		h.timeout.pregreet = 0
	case "reject":
		h.timeout.pregreet = durationOr(h.Timeouts.Pregreet, defaultPregreet)
		if h.ImplicitTLS {
			return nil, errors.New("smtp: early_talker applies to the STARTTLS dialogue, not to implicit_tls, where the client speaks first")
		}
	default:
		return nil, fmt.Errorf("smtp: early_talker must be reject or off, got %q", h.EarlyTalker)
	}

	switch {
	case h.DetectTLS < 0:
		h.detectTLS = 0
	case h.DetectTLS > 0:
		h.detectTLS = time.Duration(h.DetectTLS)
	case h.ImplicitTLS:
		h.detectTLS = defaultDetectImplicit
	case h.timeout.pregreet > 0:
		h.detectTLS = min(defaultDetectEarlyTalker, h.timeout.pregreet/2)
	default:
		h.detectTLS = 0
	}
	if h.timeout.pregreet > 0 {
		if err := detectWithinPregreet(h.detectTLS, h.timeout.pregreet); err != nil {
			return nil, fmt.Errorf("smtp: %w", err)
		}
	}

	switch {
	case h.MaxErrors < 0:
		return nil, fmt.Errorf("smtp: max_errors must not be negative, got %d", h.MaxErrors)
	case h.MaxErrors == 0:
		h.maxErrors = defaultMaxErrors
	default:
		h.maxErrors = h.MaxErrors
	}

	guard, err := h.AuthGuard.build()
	if err != nil {
		return nil, err
	}
	h.guard = guard
	return names, nil
}

// Handle runs the SMTP edge on one client connection.
func (h *Handler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	sess := liveSessions.add(h, cx)
	defer liveSessions.remove(sess)
	metrics.activeSessions.WithLabelValues(sess.listener).Inc()
	defer h.endSession(sess)

	if limit := h.limits.acquire(cx.RemoteAddr()); limit != limitNone {
		sess.ended(outcomeConnectionLimit, string(limit))
		sess.log().Debug("connection limit reached; turning the client away",
			zap.String("limit", string(limit)))
		_ = cx.SetWriteDeadline(time.Now().Add(finalReplyTimeout))
		_, _ = cx.Write(h.replies.tooManyConns)
		return nil
	}
	defer h.limits.release(cx.RemoteAddr())
	if h.refuseBanned(sess, cx) {
		return nil
	}

	implicit, first, alive := h.openingMode(cx)
	if !alive {
		sess.ended(outcomeClientClosed, "before the greeting")
		return nil
	}
	sess.implicit = implicit
	if implicit {
		tlsConn := h.startTLS(sess, withPrefix(cx, first))
		if tlsConn == nil {
			return nil
		}
		return h.relay(sess, tlsConn, next)
	}

	handshakeConn := h.plaintextDialogue(sess, first)
	if handshakeConn == nil {
		return nil
	}
	tlsConn := h.startTLS(sess, handshakeConn)
	if tlsConn == nil {
		return nil
	}
	return h.relay(sess, tlsConn, next)
}

func durationOr(d caddy.Duration, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return time.Duration(d)
}

// checkHostname accepts what can stand in an SMTP greeting and in a
// certificate: a domain name or an IP address, without wildcards.
func checkHostname(name string) error {
	if name == "" {
		return errors.New("empty hostname")
	}
	if strings.Contains(name, "*") {
		return errors.New("wildcards cannot be greeted with; name the host itself")
	}
	for _, r := range name {
		ok := r == '.' || r == '-' || r == ':' || r == '_' ||
			(r >= 'a' && r <= 'z') || (r >= '0' && r <= '9')
		if !ok {
			return fmt.Errorf("invalid character %q (write internationalised names in their xn-- form)", r)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner  = (*Handler)(nil)
	_ caddy.CleanerUpper = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
