package l4smtp

import (
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
	h     *Handler
	cx    *layer4.Connection // the client connection; closed when the shutdown timeout is over and no phase ends it
	id    string             // 16 hex digits, random
	start time.Time

	// implicit says the client speaks implicit TLS: on an implicit TLS
	// listener, or detected (tlsmode.go). Set before TLS, by the session's
	// goroutine.
	implicit bool

	loggerOnce sync.Once
	logger     *zap.Logger // see log

	// the shutdown's state (shutdown.go)
	mu       sync.Mutex
	phase    phase
	draining bool
	timer    *time.Timer
}

func newSession(h *Handler, cx *layer4.Connection) *session {
	var id [8]byte
	binary.BigEndian.PutUint64(id[:], rand.Uint64())
	return &session{h: h, cx: cx, id: hex.EncodeToString(id[:]), start: time.Now()}
}

// log is the handler's logger with the session's fields, built once, when
// the session first logs (most sessions log nothing but their end).
func (s *session) log() *zap.Logger {
	s.loggerOnce.Do(func() {
		ip, port, err := net.SplitHostPort(s.cx.RemoteAddr().String())
		if err != nil {
			ip = s.cx.RemoteAddr().String()
		}
		s.logger = s.h.logger.With(
			zap.String("session_id", s.id),
			zap.String("remote_ip", ip),
			zap.String("remote_port", port))
	})
	return s.logger
}
