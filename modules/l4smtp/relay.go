package l4smtp

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

// relay passes the TLS session through a relayConn to the backend (with
// the backend option) or to the next handler (normally caddy-l4's proxy),
// and deals with the ends of the session the copying cannot see: a backend
// that is unreachable or never greets, a session that falls silent, a
// backend that goes away.
func (h *Handler) relay(sess *session, tlsConn *tls.Conn, next layer4.Handler) error {
	cx := sess.cx
	c := &relayConn{Conn: tlsConn, h: h, sess: sess, greeting: make(chan struct{}), over: make(chan struct{}),
		clientIP: clientAddr(sess.cx)}
	c.replied = sync.NewCond(&c.tmu)
	// in STARTTLS mode the edge has greeted the client already
	c.filter.swallowGreeting = !sess.implicit
	c.filter.tracker = &c.tracker
	h.setupTracker(&c.tracker, sess)
	route := h.routeFor(sess)
	if route.xclient {
		c.xclient = xclientEHLO
	}
	if sess.enter(c) {
		// shutting down since before TLS was up: no backend for this one
		c.wmu.Lock()
		c.end(outcomeShutdown, "", h.replies.shuttingDown, false)
		c.wmu.Unlock()
		sess.log().Debug("ending session for shutdown")
		return nil
	}
	defer sess.enter(nil)
	if sess.implicit && c.xclient == xclientOff {
		// with implicit TLS the client waits for the backend's greeting
		// itself, and a client that talks first is the backend's to judge
		// (with xclient, the edge's EHLO must wait for it)
		c.greetingSeen()
	}
	var wrapped *layer4.Connection
	if route.pool == nil {
		// wrap first: the timers write to the client through cx, and
		// Wrap reads cx's counters
		wrapped = cx.Wrap(c)
	}
	start := time.Now()
	c.touch()
	c.backendTimer = time.AfterFunc(h.timeout.backend, c.backendTimeout)
	c.idleTimer = time.AfterFunc(h.timeout.idle, c.idleCheck)

	var err error
	if wrapped != nil {
		err = next.Handle(wrapped)
	} else {
		var up net.Conn
		if up, err = route.pool.dial(sess, start); err == nil {
			if !c.closed.Load() { // not ended by a timeout or the shutdown meanwhile
				pump(c, up)
			}
			_ = up.Close()
			if why, _ := sess.howEnded(); why == outcomeBackendLost {
				route.pool.cut(up)
			}
		}
	}

	c.backendTimer.Stop()
	c.idleTimer.Stop()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	defer c.report()
	if !c.filter.greetingDone() {
		if c.end(outcomeBackendUnreachable, errorDetail(err), h.replies.backendUnavailable, false) {
			sess.log().Warn("mail server unavailable", zap.Error(err))
		}
		// the client has its 421 and the log its warning; an unreachable
		// backend is not a fault of the edge
		return nil
	}
	// the session ended on its own: the backend's CloseWrite has said how,
	// unless the next handler gave up on the backend
	if err != nil && !c.clientEOF.Load() {
		c.end(outcomeBackendLost, errorDetail(err), nil, false)
	}
	c.end(outcomeClientClosed, "", nil, false)
	return err
}

// relayConn is the client's TLS connection as the next handler sees it. Reads
// (client to backend) go through the transactionTracker, the edge's one
// reading of the session, which normalises line ends, answers some commands
// itself and adds the edge's own; writes (backend to client) go through a
// replyFilter, which also puts the edge's answers in their place. It also keeps the session's clocks:
// the backend greeting timeout and the idle timeout.
//
// The session is ended by the edge only through end. Lock order: wmu before
// tmu. A holder of wmu may take tmu (Write, end); nothing that holds tmu
// takes wmu. Timers that must not wait behind a write stuck on a client
// that does not read (the idle timeout, the shutdown timeout) only try wmu.
type relayConn struct {
	net.Conn // the TLS connection to the client
	h        *Handler
	sess     *session

	wmu      sync.Mutex // serialises writes to the client and the filter state
	filter   replyFilter
	out      []byte
	draining bool // the process is shutting down; guarded by wmu

	// tmu guards the tracker, which both directions feed, and orders the
	// decision to end the session for shutdown (closed is set under it)
	// before any client byte that comes after it: such bytes are dropped.
	// replied (on tmu) wakes the reading when a reply has come or the
	// session has ended.
	tmu     sync.Mutex
	replied *sync.Cond
	tracker transactionTracker
	xclient xclientStep // guarded by tmu

	// the reading's own state (the reading goroutine's)
	held       []byte // client bytes read but not yet read by the tracker: it waits for a reply
	pendingOut []byte // bytes for the backend that did not fit in the caller's buffer
	readErr    error  // the client's read error, once pendingOut is passed on

	// greeting is closed once the backend has greeted, or the session is
	// over: until then the client's bytes are held back (STARTTLS mode)
	greeting     chan struct{}
	greetingOnce sync.Once

	bytesRead    atomic.Int64  // from the client
	bytesWritten int64         // to the client; guarded by wmu
	closed       atomic.Bool   // the edge has ended the session; later writes are dropped
	over         chan struct{} // closed when closed is set
	clientIP     netip.Addr    // the client's real address, for the password guard
	clientEOF    atomic.Bool
	lastActive   atomic.Int64 // unix nanoseconds of the last byte either way
	backendTimer *time.Timer
	idleTimer    *time.Timer
}

// Read gives the next handler the client's bytes as the tracker reads them
// (normalised, without the commands the edge answers, with the edge's own
// commands), but not before the backend has greeted: in STARTTLS mode the
// client, greeted by the edge already, sends EHLO right after the handshake,
// and a backend that gets it before its own greeting sees a client that
// pipelines without permission (Postfix logs "improper command pipelining
// after CONNECT", and since 3.9 refuses the session). Where the tracker
// waits for a reply, Read waits with it, and what the client sent meanwhile
// is held.
func (c *relayConn) Read(p []byte) (int, error) {
	<-c.greeting
	for {
		if len(c.pendingOut) > 0 {
			n := copy(p, c.pendingOut)
			c.pendingOut = c.pendingOut[n:]
			return n, nil
		}
		if c.readErr != nil && len(c.held) == 0 {
			return 0, c.readErr
		}
		c.tmu.Lock()
		// bytes held for a reply wait for it; without them, the client
		// is read meanwhile (what comes is held), so that a client that
		// waits for the reply, as it should, costs no extra wake-up
		for c.tracker.waiting() && len(c.held) > 0 && !c.closed.Load() {
			c.replied.Wait()
		}
		if c.closed.Load() {
			c.tmu.Unlock()
			return 0, net.ErrClosed
		}
		identityPending := c.xclient != xclientOff && c.xclient != xclientDone
		if identityPending && !c.tracker.waiting() {
			out, failure := c.edgeCommand(nil)
			c.tmu.Unlock()
			if failure != "" {
				c.identityRefused(failure)
				return 0, net.ErrClosed
			}
			c.pendingOut = out
			continue
		}
		c.tmu.Unlock()

		in := c.held
		var err error
		if len(in) == 0 {
			var n int
			n, err = c.Conn.Read(p)
			if n > 0 {
				c.bytesRead.Add(int64(n))
				c.touch()
			}
			if errors.Is(err, io.EOF) {
				c.clientEOF.Store(true)
			}
			in = p[:n]
			if identityPending {
				// nothing of the client's before the backend has taken
				// its identity: held, read once XCLIENT is through
				c.held = append(c.held[:0:0], in...)
				if err != nil {
					if len(in) == 0 {
						return 0, err
					}
					c.readErr = err
				}
				continue
			}
		}
		scratch := largeBufs.Get().(*[]byte)
		c.tmu.Lock()
		if c.closed.Load() {
			// the session was ended (for shutdown, between
			// transactions); nothing more may reach the backend
			c.tmu.Unlock()
			largeBufs.Put(scratch)
			return 0, net.ErrClosed
		}
		out, used := c.tracker.client((*scratch)[:0], in)
		answers := len(c.tracker.answers) > 0
		c.tmu.Unlock()
		if len(c.held) > 0 {
			c.held = c.held[used:]
		} else if used < len(in) {
			c.held = append(c.held[:0:0], in[used:]...)
		}
		if answers {
			c.sendAnswers()
		}
		n := copy(p, out)
		if n < len(out) {
			c.pendingOut = append(c.pendingOut[:0:0], out[n:]...)
		}
		largeBufs.Put(scratch)
		if err != nil && (len(c.pendingOut) > 0 || len(c.held) > 0) {
			// what was read before the error goes first
			c.readErr, err = err, nil
		}
		if n > 0 || err != nil {
			return n, err
		}
	}
}

// sendAnswers writes the edge's own answers whose turn has come. Before the
// backend's greeting (a client that talks first, with implicit TLS) they
// wait for it: the reply filter puts them after it.
func (c *relayConn) sendAnswers() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() || !c.filter.greetingDone() {
		return
	}
	c.tmu.Lock()
	c.out = c.tracker.takeAnswers(c.out[:0])
	c.tmu.Unlock()
	if len(c.out) > 0 {
		_ = c.writeOut()
		c.touch()
	}
}

// Write takes backend bytes and passes on what the client should see. It
// always reports all of p as written unless the client connection failed,
// because what the filter drops was handled, not lost.
func (c *relayConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return len(p), nil
	}
	greeted := c.filter.greetingDone()
	c.tmu.Lock()
	c.out = c.filter.process(c.out[:0], p)
	lost := c.tracker.lost
	// the user of the exchange that failed: no AUTH starts before the
	// reading has seen its reply, which wakes it below
	failed, succeeded, user := c.tracker.authFailed, c.tracker.authSucceeded, c.tracker.authUser
	c.tracker.authFailed, c.tracker.authSucceeded = 0, 0
	c.replied.Broadcast() // a reply the reading may wait for
	c.tmu.Unlock()
	if succeeded > 0 {
		c.h.guard.success(c.clientIP, time.Now())
	}
	if failed > 0 {
		// the password guard's delay, before the failure reaches the
		// client; replies after it wait too, which keeps their order
		delay, _ := c.h.guard.failure(c.clientIP, user, time.Now())
		c.pause(delay)
	}
	if code := c.filter.lastReply(); lost && !c.filter.midReply() && code != "421" && code != "221" {
		// the replies no longer pair with the commands: the edge cannot
		// tell what the backend reads any more (unless the backend is
		// saying goodbye)
		_ = c.writeOut()
		if c.end(outcomeBackendLost, "replies out of order", c.h.replies.backendGone, false) {
			c.sess.log().Warn("mail server replied out of order; ending the session",
				zap.String("last_reply", c.filter.lastReply()))
		}
		return len(p), nil
	}
	if !greeted && c.filter.greetingDone() {
		c.backendTimer.Stop()
		defer c.greetingSeen() // after the greeting's answer is written
	}
	if len(c.out) > 0 {
		if err := c.writeOut(); err != nil {
			if c.closed.Load() {
				return len(p), nil
			}
			return 0, err
		}
	}
	if cap(c.out) > 4096 {
		c.out = nil // do not keep a large buffer for an idle session
	}
	c.touch()
	if c.draining {
		c.endIfIdle() // the reply that ended a transaction is out
	}
	return len(p), nil
}

// writeOut writes c.out to the client and counts it. The caller holds wmu.
func (c *relayConn) writeOut() error {
	c.bytesWritten += int64(len(c.out))
	_, err := c.Conn.Write(c.out)
	return err
}

// drain ends the session for shutdown as soon as it is between
// transactions: now, or after the reply that ends the transaction in
// progress.
func (c *relayConn) drain() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.draining = true
	c.endIfIdle()
}

// endIfIdle sends 421 and closes the session if no transaction is open and
// nothing the client sent awaits a reply. The caller holds wmu.
func (c *relayConn) endIfIdle() {
	if c.end(outcomeShutdown, "", c.h.replies.shuttingDown, true) {
		c.sess.log().Debug("ending session for shutdown")
	}
}

// expire ends the session when the shutdown timeout is over, in a
// transaction or not. A message whose content has not all reached the
// backend is not delivered (the backend never gets its end); one whose end
// the backend has, may be delivered without the client learning of it, and
// then again when the client retries.
func (c *relayConn) expire() {
	var reply []byte
	if c.wmu.TryLock() {
		defer c.wmu.Unlock()
		reply = c.h.replies.shuttingDown
	}
	c.tmu.Lock()
	awaitingEnd := c.tracker.awaitingEnd()
	c.tmu.Unlock()
	if c.end(outcomeShutdown, "shutdown timeout", reply, false) {
		c.sess.log().Warn("shutdown timeout over; ending a session in a transaction",
			zap.Duration("timeout", c.h.timeout.shutdown),
			zap.Bool("awaiting_end_of_message_reply", awaitingEnd))
	}
}

// CloseWrite is called by the proxy when the backend has finished sending:
// the SMTP session is over. A client that may still be waiting for a reply
// gets a 421 first; then the connection is closed.
func (c *relayConn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	code := c.filter.lastReply()
	switch {
	case !c.filter.greetingDone():
		if c.end(outcomeBackendUnreachable, "closed before its greeting", c.h.replies.backendUnavailable, false) {
			c.sess.log().Warn("mail server closed the connection before greeting")
		}
	case !c.filter.midReply() && code == "221":
		// the answer to QUIT (the client may have closed already)
		c.end(outcomeQuit, "", nil, false)
	case !c.filter.midReply() && code == "421":
		// the backend said goodbye itself
		c.end(outcomeBackendEnded, "421", nil, false)
	case c.clientEOF.Load():
		// the client left first; nobody to tell
		c.end(outcomeClientClosed, "", nil, false)
	default:
		if c.end(outcomeBackendLost, "", c.h.replies.backendGone, false) {
			c.sess.log().Debug("mail server closed the connection during the session")
		}
	}
	return nil
}

// backendTimeout fires when the backend has not greeted within the backend
// timeout.
func (c *relayConn) backendTimeout() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.filter.greetingDone() {
		return
	}
	if c.end(outcomeBackendUnreachable, "no greeting in time", c.h.replies.backendUnavailable, false) {
		c.sess.log().Warn("mail server did not greet in time",
			zap.Duration("timeout", c.h.timeout.backend))
	}
}

// idleCheck fires when the session may have been silent for the idle
// timeout, and closes it if it was.
func (c *relayConn) idleCheck() {
	if c.closed.Load() {
		return
	}
	silent := time.Since(time.Unix(0, c.lastActive.Load()))
	if silent < c.h.timeout.idle {
		c.idleTimer.Reset(c.h.timeout.idle - silent)
		return
	}
	var reply []byte
	if c.wmu.TryLock() {
		defer c.wmu.Unlock()
		reply = c.h.replies.timeout
	}
	if c.end(outcomeTimeout, "idle", reply, false) {
		c.sess.log().Debug("idle timeout after TLS",
			zap.Duration("timeout", c.h.timeout.idle))
	}
}

// report puts what the relay learnt into the session's record. The caller
// holds wmu.
func (c *relayConn) report() {
	c.tmu.Lock()
	defer c.tmu.Unlock()
	c.sess.facts = c.tracker.facts
	c.sess.bytesRead = c.bytesRead.Load()
	c.sess.bytesWritten = c.bytesWritten
}

// end is how the edge ends a session after TLS. The first call records why
// in the session, sends reply (a 421; nil for none, or when the caller does
// not hold wmu) and closes the client connection; every call lets the
// client's held bytes go, to their end. With ifIdle it ends the session only
// between transactions, with nothing the client sent awaiting a reply: the
// check and the mark are taken together under tmu, so that no client byte
// that comes after them reaches the backend. It reports whether this call
// ended the session. The caller holds wmu if reply is not nil.
func (c *relayConn) end(why outcome, detail string, reply []byte, ifIdle bool) bool {
	c.tmu.Lock()
	first := !c.closed.Load() && (!ifIdle || c.tracker.idle())
	if first {
		c.closed.Store(true)
		c.replied.Broadcast()
	}
	c.tmu.Unlock()
	if first {
		close(c.over)
		c.sess.ended(why, detail)
		if reply != nil {
			c.finalReply(reply)
		}
	}
	if first || !ifIdle {
		c.greetingSeen()
		_ = c.Conn.Close()
	}
	return first
}

// pause waits d before the next write to the client, or until the session
// ends. The caller holds wmu: nothing overtakes the delayed reply.
func (c *relayConn) pause(d time.Duration) {
	if d <= 0 {
		return
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-c.over:
	}
}

// finalReply writes a reply that precedes a close. The caller holds wmu.
func (c *relayConn) finalReply(reply []byte) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(finalReplyTimeout))
	_, _ = c.Conn.Write(reply)
}

// greetingSeen lets the client's bytes through.
func (c *relayConn) greetingSeen() { c.greetingOnce.Do(func() { close(c.greeting) }) }

func (c *relayConn) touch() { c.lastActive.Store(time.Now().UnixNano()) }

// Interface guards
var (
	_ interface {
		net.Conn
		CloseWrite() error
	} = (*relayConn)(nil)
	_ phase = (*relayConn)(nil)
)
