package l4smtp

import (
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

// session is the record of one client connection, from the accept to the
// close. Every part of the session (the dialogue before TLS, the handshake,
// the relay, the shutdown) reports through it, and logs through its logger,
// which carries the session's id and the client's address.
type session struct {
	h        *Handler
	cx       *layer4.Connection // the client connection; closed when the shutdown timeout is over and no phase ends it
	id       string             // 16 hex digits, random
	start    time.Time
	listener string // the address the client connected to

	// implicit says the client speaks implicit TLS: on an implicit TLS
	// listener, or detected (tlsmode.go). Set before TLS, by the session's
	// goroutine.
	implicit bool

	loggerOnce sync.Once
	logger     *zap.Logger // see log

	// set by the session's goroutine as the session goes
	tls          *tls.ConnectionState // once the handshake is done
	tlsConn      *tls.Conn            // the same
	backend      string               // the mail server dialled, with the backend option
	facts        sessionFacts         // what the relay's tracker learnt
	bytesRead    int64                // relayed after TLS from the client
	bytesWritten int64                // relayed after TLS to the client

	mu sync.Mutex // guards what follows

	// how the session ended: the first to know says, through ended
	outcome outcome
	detail  string

	// the shutdown's state (shutdown.go)
	phase    phase
	draining bool
	timer    *time.Timer
}

func newSession(h *Handler, cx *layer4.Connection) *session {
	var id [8]byte
	binary.BigEndian.PutUint64(id[:], rand.Uint64())
	s := &session{h: h, cx: cx, id: hex.EncodeToString(id[:]), start: time.Now()}
	if cx != nil {
		s.listener = cx.LocalAddr().String()
	}
	return s
}

// clientConn is where the session's replies to the client go: inside TLS
// once the handshake is done.
func (s *session) clientConn() net.Conn {
	if s.tlsConn != nil {
		return s.tlsConn
	}
	return s.cx
}

// log is the handler's logger with the session's fields, built once, when
// the session first logs (most sessions log nothing but their end).
func (s *session) log() *zap.Logger {
	s.loggerOnce.Do(func() {
		ip, port := splitAddr(s.cx.RemoteAddr())
		s.logger = s.h.logger.With(
			zap.String("session_id", s.id),
			zap.String("remote_ip", ip),
			zap.String("remote_port", port))
	})
	return s.logger
}

// outcome is how a session ended: one of a fixed set, documented in the
// README. The access line and the metrics report it.
type outcome string

const (
	// the client said QUIT: to the edge before TLS, or to the backend,
	// which answered 221
	outcomeQuit outcome = "quit"
	// the client closed the connection (or reset it) without QUIT
	outcomeClientClosed outcome = "client_closed"
	// a step timed out; the detail says which: command (before TLS),
	// handshake, or idle (after TLS)
	outcomeTimeout outcome = "timeout"
	// the TLS handshake failed; the detail says why: not_tls (the client
	// sent something else), client_alert (the client refused the
	// handshake, e.g. the certificate), client_certificate (client_auth
	// refused the client's certificate), or the TLS stack's error
	outcomeHandshakeFailed outcome = "handshake_failed"
	// the client offers only TLS versions the policy refuses (below 1.2)
	outcomeTLSVersion outcome = "tls_version_refused"
	// the edge has no certificate to serve (none obtained yet)
	outcomeNoCertificate outcome = "no_certificate"
	// a TLS ClientHello where the listener waited for SMTP: a client set
	// up for implicit TLS on a STARTTLS listener without detect_tls, or
	// one that started TLS after the greeting began
	outcomeUnexpectedTLS outcome = "unexpected_tls"
	// bytes after STARTTLS before the handshake (command injection)
	outcomeInjection outcome = "injection_refused"
	// max_errors protocol errors before TLS
	outcomeTooManyErrors outcome = "too_many_errors"
	// turned away by max_connections or max_connections_per_ip (the detail)
	outcomeConnectionLimit outcome = "connection_limit"
	// talked before the greeting was complete (early_talker reject)
	outcomeEarlyTalker outcome = "early_talker"
	// turned away at connect: the client's address is banned for failed
	// logins (auth_guard)
	outcomeAuthBanned outcome = "auth_banned"
	// the backend could not be dialled, closed before its greeting, or did
	// not greet within the backend timeout
	outcomeBackendUnreachable outcome = "backend_unreachable"
	// the backend went away in the middle of the session
	outcomeBackendLost outcome = "backend_lost"
	// the backend ended the session with 421
	outcomeBackendEnded outcome = "backend_ended"
	// the backend did not take the client's identity from the edge
	// (xclient): 421 4.4.1, logged at Error
	outcomeBackendRefused outcome = "identity_refused"
	// ended with 421 4.3.2 because Caddy is shutting down
	outcomeShutdown outcome = "shutdown"
	// a fault of the edge (a panic): 421 4.3.0, logged at Error
	outcomeInternalError outcome = "internal_error"
)

// ended records how the session ended; the first call wins, because later
// ones see only the consequences of the first (a close, a failed read).
func (s *session) ended(o outcome, detail string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.outcome == "" {
		s.outcome, s.detail = o, detail
	}
}

// howEnded is the outcome and its detail, once the session is over.
func (s *session) howEnded() (outcome, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.outcome == "" {
		return outcomeClientClosed, s.detail
	}
	return s.outcome, s.detail
}

// mode is implicit or starttls, as the access line and the metrics say it.
func (s *session) mode() string {
	if s.implicit {
		return "implicit"
	}
	return "starttls"
}

// errorDetail is an error's text for the detail of an outcome.
func errorDetail(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
