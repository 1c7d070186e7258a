package l4smtp

import (
	"crypto/tls"
	"errors"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/prometheus/client_golang/prometheus"
)

// The edge's Prometheus metrics, caddy_layer4_smtp_*. The collectors are
// process-wide, so that a config reload does not reset the counts, and are
// registered in the metrics registry of every config that has an smtp
// handler, which Caddy's admin /metrics endpoint and its metrics handler
// serve. Their labels take only configured values: the listener address a
// client connected to, the mode, the outcome and other fixed sets, the
// backend's configured address; never a client's address or anything a
// client sent.
var metrics = newMetrics()

type edgeMetrics struct {
	sessions          *prometheus.CounterVec   // listener, mode, outcome
	activeSessions    *prometheus.GaugeVec     // listener
	sessionDuration   *prometheus.HistogramVec // listener, mode
	handshakes        *prometheus.CounterVec   // listener, version, result
	handshakeDuration *prometheus.HistogramVec // listener
	auth              *prometheus.CounterVec   // listener, result
	messages          *prometheus.CounterVec   // listener
	recipients        *prometheus.CounterVec   // listener
	bytes             *prometheus.CounterVec   // listener, direction
	backendDial       *prometheus.HistogramVec // backend
	backendFailures   *prometheus.CounterVec   // backend
	turnedAway        *prometheus.CounterVec   // listener, reason
	refused           *prometheus.CounterVec   // listener, reason
	bareLineEnds      *prometheus.CounterVec   // listener
	authBans          prometheus.Counter       // the AUTH guard's, process-wide
	authGuardEntries  []prometheus.Collector   // the AUTH guard's tables, by table
	upstreams         *upstreamCollector       // upstream; read from the upstreams' states
}

func newMetrics() *edgeMetrics {
	const ns, sub = "caddy", "layer4_smtp"
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels)
	}
	histogram := func(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
		return prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help, Buckets: buckets}, labels)
	}
	return &edgeMetrics{
		sessions: counter("sessions_total",
			"SMTP sessions that ended, by listener, mode (implicit or starttls) and outcome.", "listener", "mode", "outcome"),
		activeSessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "active_sessions",
			Help: "SMTP sessions open now, by listener."}, []string{"listener"}),
		sessionDuration: histogram("session_duration_seconds",
			"How long SMTP sessions lasted, from the accept to the close.",
			prometheus.ExponentialBuckets(0.01, 4, 9), "listener", "mode"),
		handshakes: counter("tls_handshakes_total",
			"TLS handshakes, by listener, TLS version (none when it failed) and result (full, resumed or failed).",
			"listener", "version", "result"),
		handshakeDuration: histogram("tls_handshake_duration_seconds",
			"How long TLS handshakes took, failed ones included.", prometheus.DefBuckets, "listener"),
		auth: counter("auth_total",
			"AUTH exchanges after TLS, by result (success or failure).", "listener", "result"),
		messages: counter("messages_total",
			"Messages the backend accepted.", "listener"),
		recipients: counter("recipients_total",
			"Recipients the backend accepted.", "listener"),
		bytes: counter("bytes_total",
			"Bytes relayed after TLS, by direction (from_client or to_client).", "listener", "direction"),
		backendDial: histogram("backend_dial_duration_seconds",
			"How long dialling a backend address took (the backend option), failed dials included.",
			prometheus.DefBuckets, "backend"),
		backendFailures: counter("backend_dial_failures_total",
			"Attempts to use a backend address (the backend option) that failed: no connection, no greeting, or a greeting other than 2xx.", "backend"),
		turnedAway: counter("turned_away_total",
			"Clients turned away, by reason: max_connections, max_connections_per_ip, early_talker, injection_refused, too_many_errors, auth_banned.",
			"listener", "reason"),
		refused: counter("commands_refused_total",
			"Commands after TLS the edge answered itself instead of relaying them, by reason: auth_required (530 before AUTH), identity (a client's XCLIENT or XFORWARD), starttls (STARTTLS inside TLS).",
			"listener", "reason"),
		bareLineEnds: counter("bare_line_ends_total",
			"Bare CRs and bare LFs from clients after TLS that reached the backend as CRLF (bare_line_ends normalize).", "listener"),
		authBans: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "auth_bans_total",
			Help: "Client addresses (an IPv6 client's /64) the AUTH guard banned for failed logins."}),
		upstreams: newUpstreamCollector(ns, sub),
		authGuardEntries: []prometheus.Collector{
			guardEntriesGauge(ns, sub, "addresses", func() int { return processGuard.addrs.len() }),
			guardEntriesGauge(ns, sub, "accounts", func() int { return processGuard.accounts.len() }),
		},
	}
}

// guardEntriesGauge reads the size of one of the AUTH guard's tables when
// scraped.
func guardEntriesGauge(ns, sub, table string, size func() int) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "auth_guard_entries",
		Help:        "Entries in the AUTH guard's tables (client addresses, accounts), each at most max_entries.",
		ConstLabels: prometheus.Labels{"table": table}},
		func() float64 { return float64(size()) })
}

// register adds the collectors to a config's registry; another handler of
// the same config has done it already when they are there.
func (m *edgeMetrics) register(reg *prometheus.Registry) error {
	for _, c := range append([]prometheus.Collector{
		m.sessions, m.activeSessions, m.sessionDuration, m.handshakes, m.handshakeDuration, m.auth,
		m.messages, m.recipients, m.bytes, m.backendDial, m.backendFailures, m.turnedAway, m.refused, m.bareLineEnds, m.authBans, m.upstreams,
	}, m.authGuardEntries...) {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) || already.ExistingCollector != c {
				return err
			}
		}
	}
	return nil
}

// handshake counts a TLS handshake; state is nil when it failed.
func (m *edgeMetrics) handshake(listener string, took time.Duration, state *tls.ConnectionState) {
	version, result := "none", "failed"
	if state != nil {
		version, result = caddytls.ProtocolName(state.Version), "full"
		if state.DidResume {
			result = "resumed"
		}
	}
	m.handshakes.WithLabelValues(listener, version, result).Inc()
	m.handshakeDuration.WithLabelValues(listener).Observe(took.Seconds())
}

// sessionEnded counts what a session did, when it ends.
func (m *edgeMetrics) sessionEnded(s *session, mode string, why outcome, detail string) {
	listener := s.listener
	m.sessions.WithLabelValues(listener, mode, string(why)).Inc()
	m.sessionDuration.WithLabelValues(listener, mode).Observe(time.Since(s.start).Seconds())
	switch why {
	case outcomeConnectionLimit:
		m.turnedAway.WithLabelValues(listener, detail).Inc()
	case outcomeEarlyTalker, outcomeInjection, outcomeTooManyErrors, outcomeAuthBanned:
		m.turnedAway.WithLabelValues(listener, string(why)).Inc()
	}
	if s.tls == nil {
		return
	}
	f := s.facts
	if f.authSuccesses > 0 {
		m.auth.WithLabelValues(listener, "success").Add(float64(f.authSuccesses))
	}
	if f.authFailures > 0 {
		m.auth.WithLabelValues(listener, "failure").Add(float64(f.authFailures))
	}
	if f.messages > 0 {
		m.messages.WithLabelValues(listener).Add(float64(f.messages))
	}
	if f.recipients > 0 {
		m.recipients.WithLabelValues(listener).Add(float64(f.recipients))
	}
	for reason, n := range f.refused {
		if n > 0 {
			m.refused.WithLabelValues(listener, refusalNames[reason]).Add(float64(n))
		}
	}
	if f.bareLineEnds > 0 {
		m.bareLineEnds.WithLabelValues(listener).Add(float64(f.bareLineEnds))
	}
	m.bytes.WithLabelValues(listener, "from_client").Add(float64(s.bytesRead))
	m.bytes.WithLabelValues(listener, "to_client").Add(float64(s.bytesWritten))
}
