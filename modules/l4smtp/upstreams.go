package l4smtp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Upstream is one mail server of the upstreams option.
type Upstream struct {
	// The mail server's address: host:port or unix/<socket path>, with
	// placeholders. Exactly one: caddy-l4's proxy dials every address of
	// an upstream at once and relays to all of them, which an SMTP
	// session cannot use; write one upstream per mail server. Required.
	Dial []string `json:"dial,omitempty"`

	// The upstream's share of the sessions under the round_robin and
	// random policies, against the other upstreams' weights. Default: 1.
	Weight int `json:"weight,omitempty"`
}

// upstream is one mail server of a pool.
type upstream struct {
	addr   backendAddr
	weight int            // at least 1
	state  *upstreamState // shared by every pool of the process that names the address
	credit int            // smooth weighted round robin; guarded by the pool's mu
}

// upstreamPool is the set of mail servers one handler relays its sessions
// to, and everything it knows of them: a session asks the pool for a
// connection and knows nothing of the choice. The handler holds one pool;
// nothing about the upstreams lives in the handler outside it.
type upstreamPool struct {
	upstreams     []*upstream
	policy        string
	proxyProtocol int           // the PROXY header's version; 0: none
	timeout       time.Duration // the backend timeout: dial and greeting
	failDuration  time.Duration // passive health: how long a failure keeps an upstream down; 0: off
	active        *activeChecks // nil: no active health checks

	logger *zap.Logger
	now    func() time.Time // time.Now, but for tests
	rand   func(int) int    // rand.IntN, but for tests

	mu       sync.Mutex // guards the round robin's credits
	stopOnce sync.Once
	cancel   context.CancelFunc // ends the checker; nil before start
	done     chan struct{}      // closed when the checker has ended
}

// poolConfig is what a pool is built from: the handler's options, checked.
type poolConfig struct {
	addrs         []backendAddr
	weights       []int
	policy        string
	proxyProtocol int
	timeout       time.Duration
	failDuration  time.Duration
	active        *activeChecks
}

func newUpstreamPool(cfg poolConfig) *upstreamPool {
	p := &upstreamPool{
		policy: cmpOr(cfg.policy, policyFirst), proxyProtocol: cfg.proxyProtocol, timeout: cfg.timeout,
		failDuration: cfg.failDuration, active: cfg.active,
		logger: zap.NewNop(), now: time.Now, rand: rand.IntN,
	}
	for i, a := range cfg.addrs {
		w := 1
		if i < len(cfg.weights) && cfg.weights[i] > 0 {
			w = cfg.weights[i]
		}
		p.upstreams = append(p.upstreams, &upstream{addr: a, weight: w, state: upstreamStates.acquire(a)})
	}
	return p
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// addrs lists the pool's addresses, in configured order.
func (p *upstreamPool) addrs() []backendAddr {
	out := make([]backendAddr, len(p.upstreams))
	for i, u := range p.upstreams {
		out[i] = u.addr
	}
	return out
}

// start runs the active health checks, if any, until close.
func (p *upstreamPool) start(logger *zap.Logger) {
	p.logger = logger
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan struct{})
	if p.active == nil {
		close(p.done)
		return
	}
	go p.checkLoop(ctx)
}

// close stops the health checks and waits for them to end (a check in
// progress ends within its timeout), and lets go of the upstreams' shared
// state. A config reload closes the old config's pools.
func (p *upstreamPool) close() {
	p.stopOnce.Do(func() {
		if p.cancel != nil {
			p.cancel()
			<-p.done
		}
		for _, u := range p.upstreams {
			u.state.releaseChecks(p)
			upstreamStates.release(u.state)
		}
	})
}

// healthy says whether the upstream takes sessions, and logs it when it
// comes back from a passive failure.
func (p *upstreamPool) healthy(u *upstream, now time.Time) bool {
	ok, back := u.state.healthy(now)
	if back {
		p.logger.Warn("mail server healthy again", zap.String("upstream", u.addr.address),
			zap.String("after", "fail_duration"))
	}
	return ok
}

// dial connects to an upstream for the session: the policy's choice first,
// then the others in the policy's order, within the backend timeout
// counted from start. An upstream is used once it has greeted with 2xx;
// the connection it returns replays the greeting to the relay, which
// handles it as if it came from the wire. An upstream that cannot be
// dialled, does not greet, or greets other than 2xx is skipped (and marked
// down, with passive health checks). Each upstream gets an equal share of
// the time left, so that one that drops packets (rather than refusing) does
// not use up the time of the upstreams after it. When no upstream greets
// with 2xx and the last to greet refused, that refusal is the session's: the
// client reads the backend's own greeting, as it would without the edge.
func (p *upstreamPool) dial(sess *session, start time.Time) (net.Conn, error) {
	deadline := start.Add(p.timeout)
	order := p.order(clientAddr(sess.cx))
	var dialer net.Dialer
	var errs []error
	var refused *upstreamConn // the last upstream that greeted other than 2xx
	for i, u := range order {
		left := len(order) - i
		share := time.Until(deadline) / time.Duration(left)
		up, err := p.dialOne(&dialer, sess, u, time.Now().Add(share))
		if err == nil {
			if refused != nil {
				_ = refused.Close()
			}
			sess.backend = u.addr.address
			return up, nil
		}
		metrics.backendFailures.WithLabelValues(u.addr.address).Inc()
		errs = append(errs, err)
		p.failed(u, err)
		var greeting *greetingRefused
		if errors.As(err, &greeting) {
			if refused != nil {
				_ = refused.Close()
			}
			refused = up
			sess.backend = u.addr.address
		}
		if left > 1 && time.Now().Before(deadline) {
			sess.log().Warn("mail server unreachable; trying the next backend",
				zap.String("backend", u.addr.address),
				zap.Error(err))
		}
	}
	if refused != nil {
		return refused, nil
	}
	return nil, fmt.Errorf("dialing the backend: %w", errors.Join(errs...))
}

// failed marks the upstream down for the fail duration (passive health),
// with why.
func (p *upstreamPool) failed(u *upstream, err error) {
	if p.failDuration <= 0 {
		return
	}
	if u.state.markFailed(p.now().Add(p.failDuration)) {
		p.logger.Warn("mail server down", zap.String("upstream", u.addr.address),
			zap.String("check", "passive"), zap.Duration("for", p.failDuration), zap.Error(err))
	}
}

// cut marks the upstream of a session down (passive health) when it closed
// the session in its middle, without 221 or 421.
func (p *upstreamPool) cut(conn net.Conn) {
	if uc, ok := conn.(*upstreamConn); ok {
		p.failed(uc.upstream, errors.New("closed a session in its middle"))
	}
}

// greetingRefused is an upstream's greeting other than 2xx.
type greetingRefused struct{ code string }

func (e *greetingRefused) Error() string { return "greeted with " + e.code }

// dialOne dials one upstream, sends the PROXY header and reads the
// greeting, by the deadline. With a greeting other than 2xx it returns
// both the connection and a *greetingRefused.
func (p *upstreamPool) dialOne(dialer *net.Dialer, sess *session, u *upstream, deadline time.Time) (*upstreamConn, error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	raw, err := dialer.DialContext(ctx, u.addr.network, u.addr.address)
	metrics.backendDial.WithLabelValues(u.addr.address).Observe(time.Since(start).Seconds())
	if err != nil {
		return nil, err
	}
	up := newUpstreamConn(raw, u)
	if p.proxyProtocol != 0 {
		if err := writeProxyHeader(p.proxyProtocol, sess, raw, deadline); err != nil {
			_ = up.Close()
			return nil, err
		}
	}
	greeting, code, err := readGreeting(raw, deadline)
	if err != nil {
		_ = up.Close()
		return nil, err
	}
	up.replay = greeting
	if code[0] != '2' {
		return up, &greetingRefused{code: code}
	}
	return up, nil
}

// maxGreeting bounds the greeting the dial holds. RFC 5321 lines are 512
// octets; a longer greeting is passed on as it is, its code unchecked.
const maxGreeting = 8192

// readGreeting reads the upstream's greeting to its final line, by the
// deadline, and returns every byte read and the reply code ("" past
// maxGreeting, which counts as a 2xx).
func readGreeting(conn net.Conn, deadline time.Time) ([]byte, string, error) {
	_ = conn.SetReadDeadline(deadline)
	defer func() { _ = conn.SetReadDeadline(time.Time{}) }()
	buf := make([]byte, 0, 512)
	lineStart := 0
	for len(buf) < maxGreeting {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		for {
			nl := bytes.IndexByte(buf[lineStart:], '\n')
			if nl < 0 {
				break
			}
			nl += lineStart
			line := buf[lineStart : nl+1]
			lineStart = nl + 1
			if len(line) < 4 || line[3] != '-' {
				code := string(line[:min(3, len(line))])
				if len(code) < 3 || !isDigits(code) {
					return buf, "", errors.New("greeted with something other than an SMTP reply")
				}
				return buf, code, nil
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return buf, "", errors.New("closed the connection before its greeting")
			}
			return buf, "", fmt.Errorf("no greeting: %w", err)
		}
	}
	return buf, "2xx", nil
}

func isDigits(s string) bool {
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// upstreamConn is a session's connection to its upstream: it replays the
// greeting the dial read, and counts the session among the upstream's
// active ones (least_conn, the metrics) until it is closed, whichever way
// the session ends.
type upstreamConn struct {
	net.Conn
	replay   []byte
	upstream *upstream
	state    *upstreamState
	release  sync.Once
}

func newUpstreamConn(conn net.Conn, u *upstream) *upstreamConn {
	u.state.active.Add(1)
	return &upstreamConn{Conn: conn, upstream: u, state: u.state}
}

func (c *upstreamConn) Read(p []byte) (int, error) {
	if len(c.replay) > 0 {
		n := copy(p, c.replay)
		c.replay = c.replay[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// CloseWrite passes the client's end of the stream on, as pump does for a
// bare connection.
func (c *upstreamConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

func (c *upstreamConn) Close() error {
	c.release.Do(func() { c.state.active.Add(-1) })
	return c.Conn.Close()
}
