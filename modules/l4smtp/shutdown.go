package l4smtp

import (
	"context"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

// Shutdown. When the process exits (caddy stop, SIGTERM, SIGINT), Caddy
// stops every app, which closes the layer4 listeners so that new connections
// are refused, and then runs its exit callbacks. Ours ends every SMTP session
// the way RFC 5321 asks of a server that shuts down: with 421 before the
// close. A session between transactions gets "421 4.3.2" at once; a session
// in a transaction gets it as soon as the transaction is over (the reply to
// the end of its message has reached the client), or when the shutdown
// timeout of its handler is over, whichever comes first. Caddy exits when
// the last session has ended.
//
// A config reload is not a shutdown: sessions accepted under the old config
// run on to their natural end. So the set of sessions is process-wide, not
// per config.

func init() {
	// process-wide, registered once, as caddy.OnExit asks
	caddy.OnExit(liveSessions.drain)
}

// liveSessions are the sessions of every smtp handler in the process.
var liveSessions = &sessionSet{sessions: make(map[*session]struct{})}

// A phase is the part of a session that is running: the plaintext dialogue
// or the relay after TLS. The TLS handshake has none: it runs to its own
// timeout, and the relay that follows it ends the session at once.
type phase interface {
	// drain ends the phase at the next moment no transaction is open.
	drain()
	// expire ends it now: the shutdown timeout is over.
	expire()
}

// enter makes p the running phase (nil while a step runs to its own
// timeout). It reports whether the process is shutting down; the phase must
// then end the session at its first chance, as drain would.
func (s *session) enter(p phase) (draining bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.phase = p
	return s.draining
}

// isDraining reports whether the process is shutting down.
func (s *session) isDraining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}

func (s *session) drain() {
	s.mu.Lock()
	s.draining = true
	p := s.phase
	s.timer = time.AfterFunc(s.h.timeout.shutdown, s.expire)
	s.mu.Unlock()
	if p != nil {
		p.drain()
	}
}

func (s *session) expire() {
	s.mu.Lock()
	p := s.phase
	s.mu.Unlock()
	if p != nil {
		p.expire()
		return
	}
	_ = s.cx.Close()
}

// sessionSet tracks the live sessions for the shutdown.
type sessionSet struct {
	mu       sync.Mutex
	sessions map[*session]struct{}
	draining bool
	empty    chan struct{} // closed when draining and the last session has ended
	emptied  bool          // empty is closed
}

// add registers a new session. One that begins while the process is
// shutting down (accepted just before the listeners closed) is draining
// from the start: it is greeted, or after its handshake told, with the 421.
func (set *sessionSet) add(h *Handler, cx *layer4.Connection) *session {
	s := newSession(h, cx)
	set.mu.Lock()
	defer set.mu.Unlock()
	set.sessions[s] = struct{}{}
	if set.draining {
		s.draining = true
		s.timer = time.AfterFunc(h.timeout.shutdown, s.expire)
	}
	return s
}

// remove unregisters a session that has ended.
func (set *sessionSet) remove(s *session) {
	s.mu.Lock()
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Unlock()
	set.mu.Lock()
	defer set.mu.Unlock()
	delete(set.sessions, s)
	if set.draining && len(set.sessions) == 0 && !set.emptied {
		close(set.empty)
		set.emptied = true
	}
}

// drain ends every session and waits until they have ended, at the most
// for the longest shutdown timeout among them (and the time to write a last
// reply and to finish a handshake in progress).
func (set *sessionSet) drain(context.Context) {
	set.mu.Lock()
	set.draining = true
	set.empty = make(chan struct{})
	sessions := make([]*session, 0, len(set.sessions))
	var longest time.Duration
	for s := range set.sessions {
		sessions = append(sessions, s)
		longest = max(longest, s.h.timeout.shutdown)
	}
	if len(sessions) == 0 {
		close(set.empty)
		set.emptied = true
	}
	set.mu.Unlock()
	if len(sessions) == 0 {
		return
	}

	logger := caddy.Log().Named("layer4.handlers.smtp")
	logger.Info("ending SMTP sessions for shutdown",
		zap.Int("sessions", len(sessions)),
		zap.Duration("longest_timeout", longest))
	for _, s := range sessions {
		s.drain()
	}
	select {
	case <-set.empty:
		logger.Info("all SMTP sessions ended")
	case <-time.After(longest + finalReplyTimeout):
		set.mu.Lock()
		left := len(set.sessions)
		set.mu.Unlock()
		logger.Warn("SMTP sessions still open after the shutdown timeout; exiting anyway",
			zap.Int("sessions", left))
	}
}
