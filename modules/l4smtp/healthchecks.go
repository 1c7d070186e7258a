package l4smtp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/pires/go-proxyproto"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// HealthChecks keep sessions away from upstreams that do not serve mail.
// An upstream is down while the active checks say so, or for fail_duration
// after a session could not use it (passive). When every upstream is down,
// sessions try them all anyway.
type HealthChecks struct {
	// Check every upstream on a timer, in SMTP. Default: none.
	Active *ActiveHealthChecks `json:"active,omitempty"`

	// Mark an upstream down when a session cannot use it. Default: none.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`
}

// ActiveHealthChecks check every upstream in the background, as a client
// would: connect, send the PROXY header when the upstream gets one (a v2
// LOCAL header, which says "no client: use the connection's own
// addresses"; with v1, which has no such command that Postfix accepts, a
// header with the edge's own addresses), read the greeting and require 2xx,
// send "EHLO health-check.<first hostname>" and require 2xx, then QUIT. The
// EHLO name is how a backend's logs and statistics can tell the checks from
// clients. Checks never count as client sessions at the edge: no access
// line, no session metrics.
type ActiveHealthChecks struct {
	// How often to check each upstream; the first check comes one
	// interval after the config is loaded. Default: 30s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long one check may take, from the dial to the reply to EHLO.
	// Default: 5s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// How many checks in a row must fail before an upstream is marked
	// down, as in caddy-l4's proxy. Default: 1.
	Fall int `json:"fall,omitempty"`

	// How many checks in a row must pass before a down upstream is
	// marked healthy again, as in caddy-l4's proxy. Default: 1.
	Rise int `json:"rise,omitempty"`
}

// PassiveHealthChecks watch the sessions: an upstream that a session could
// not dial, that closed the connection or timed out before its greeting, or
// that greeted with anything but 2xx, is marked down for fail_duration, and
// the session tries the next upstream. Note that a backend that refuses a
// client by its address (the PROXY header's, with a 5xx greeting) is marked
// down too.
type PassiveHealthChecks struct {
	// How long an upstream stays down after such a failure. Default: 30s.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
}

const (
	defaultHealthInterval = 30 * time.Second
	defaultHealthTimeout  = 5 * time.Second
	defaultFailDuration   = 30 * time.Second
)

// activeChecks are the ActiveHealthChecks with the defaults filled in.
type activeChecks struct {
	interval, timeout time.Duration
	rise, fall        int
	ehlo              string // the name the checks send in EHLO
}

// build checks the options and fills in the defaults.
func (a *ActiveHealthChecks) build(hostname string) (*activeChecks, error) {
	if a.Interval < 0 || a.Timeout < 0 {
		return nil, fmt.Errorf("smtp: health_checks: active interval and timeout must not be negative, got %s and %s",
			time.Duration(a.Interval), time.Duration(a.Timeout))
	}
	if a.Rise < 0 || a.Fall < 0 {
		return nil, fmt.Errorf("smtp: health_checks: active rise and fall must not be negative, got %d and %d", a.Rise, a.Fall)
	}
	return &activeChecks{
		interval: durationOr(a.Interval, defaultHealthInterval),
		timeout:  durationOr(a.Timeout, defaultHealthTimeout),
		rise:     max(a.Rise, 1),
		fall:     max(a.Fall, 1),
		ehlo:     "health-check." + hostname,
	}, nil
}

// checkLoop checks every upstream at once, every interval, until the pool
// is closed. The first checks come one interval after the start, not at
// once: the config is provisioned before its listeners open, and an
// upstream in the same config (a sink, a local relay) would fail a check
// made then.
func (p *upstreamPool) checkLoop(ctx context.Context) {
	defer close(p.done)
	ticker := time.NewTicker(p.active.interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		var wg sync.WaitGroup
		for _, u := range p.upstreams {
			if !u.state.claimChecks(p) {
				continue // another pool of the process checks this address
			}
			wg.Go(func() { p.recordCheck(u, p.check(ctx, u)) })
		}
		wg.Wait()
	}
}

// recordCheck counts a check's result and logs the upstream's change of
// state, when it changes.
func (p *upstreamPool) recordCheck(u *upstream, err error) {
	if errors.Is(err, context.Canceled) {
		return // the pool is closing: not the upstream's fault
	}
	switch u.state.recordCheck(err == nil, p.active.rise, p.active.fall) {
	case checkMarkedDown:
		p.logger.Warn("mail server down", zap.String("upstream", u.addr.address),
			zap.String("check", "active"), zap.Int("fall", p.active.fall), zap.Error(err))
	case checkMarkedUp:
		p.logger.Warn("mail server healthy again", zap.String("upstream", u.addr.address),
			zap.String("after", "active checks"), zap.Int("rise", p.active.rise))
	}
	p.healthy(u, p.now()) // logs the end of a passive mark, if it is over
}

// check runs one active health check on u; nil means healthy.
func (p *upstreamPool) check(ctx context.Context, u *upstream) error {
	ctx, cancel := context.WithTimeout(ctx, p.active.timeout)
	defer cancel()
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, u.addr.network, u.addr.address)
	if err != nil {
		if ctx.Err() == context.Canceled {
			return ctx.Err()
		}
		return err
	}
	defer conn.Close()
	stopClosing := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stopClosing()
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	fail := func(err error) error {
		if ctx.Err() == context.Canceled {
			return ctx.Err()
		}
		return err
	}
	if p.proxyProtocol != 0 {
		if _, err := checkProxyHeader(p.proxyProtocol, conn).WriteTo(conn); err != nil {
			return fail(fmt.Errorf("writing the PROXY header: %w", err))
		}
	}
	_, code, err := readGreeting(conn, deadline)
	if err != nil {
		return fail(err)
	}
	if code[0] != '2' {
		return fmt.Errorf("greeted with %s", code)
	}
	if _, err := conn.Write([]byte("EHLO " + p.active.ehlo + "\r\n")); err != nil {
		return fail(fmt.Errorf("sending EHLO: %w", err))
	}
	_, code, err = readGreeting(conn, deadline)
	if err != nil {
		return fail(fmt.Errorf("EHLO: %w", err))
	}
	if code[0] != '2' {
		return fmt.Errorf("answered EHLO with %s", code)
	}
	// a polite end, so that the backend logs no lost connection; its
	// answer does not matter
	if _, err := conn.Write([]byte("QUIT\r\n")); err == nil {
		_, _, _ = readGreeting(conn, deadline)
	}
	return nil
}

// checkProxyHeader is the PROXY header of a health check, which has no
// client. v2 has the LOCAL command for it, which Postfix accepts (its
// haproxy_srvr.c, for smtpd and postscreen: "non-proxied connection, use
// the proxy-to-server connection info"). v1's only equivalent, "PROXY
// UNKNOWN", Postfix refuses ("would sidestep address-based access
// control"), so a v1 check says the edge itself is the client: its own
// address on the check's connection.
func checkProxyHeader(version int, conn net.Conn) *proxyproto.Header {
	if version == 2 {
		return &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	}
	return proxyproto.HeaderProxyFromAddrs(1, conn.LocalAddr(), conn.RemoteAddr())
}

// upstreamState is what the edge knows of one mail server address: shared
// by every pool of the process that names it, so that the sessions of an
// old config, still open after a reload, count for least_conn in the new
// one, and a down upstream stays down across it.
type upstreamState struct {
	addr   backendAddr
	active atomic.Int64 // sessions open through this process

	mu          sync.Mutex
	refs        int           // pools that name the address
	checker     *upstreamPool // the one pool whose active checks count for the address
	checkDown   bool
	okRun       int // active checks passed in a row
	failRun     int // active checks failed in a row
	passiveDown bool
	failedUntil time.Time
}

// claimChecks says whether p is the pool that checks the address: the
// first pool to check it, until that pool closes. Pools that share the
// address (several smtp blocks naming one server) would otherwise each
// count towards rise and fall, and take it out sooner than any one of them
// says.
func (s *upstreamState) claimChecks(p *upstreamPool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.checker == nil {
		s.checker = p
	}
	return s.checker == p
}

// releaseChecks lets another pool check the address once p closes.
func (s *upstreamState) releaseChecks(p *upstreamPool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.checker == p {
		s.checker = nil
	}
}

// healthy says whether the upstream takes sessions at now, and whether it
// just came back from a passive failure (its mark expired).
func (s *upstreamState) healthy(now time.Time) (ok, back bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.passiveDown && !now.Before(s.failedUntil) {
		s.passiveDown = false
		back = !s.checkDown
	}
	return !s.checkDown && !s.passiveDown, back
}

// up is healthy without changing anything, for the metrics.
func (s *upstreamState) up(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.checkDown && !(s.passiveDown && now.Before(s.failedUntil))
}

// markFailed marks the upstream down until then (or later, if it is marked
// so already), and says whether it was healthy.
func (s *upstreamState) markFailed(until time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	was := !s.checkDown && !s.passiveDown
	s.passiveDown = true
	if until.After(s.failedUntil) {
		s.failedUntil = until
	}
	return was
}

type checkChange int

const (
	checkNoChange checkChange = iota
	checkMarkedDown
	checkMarkedUp
)

// recordCheck counts an active check's result, with rise and fall.
func (s *upstreamState) recordCheck(ok bool, rise, fall int) checkChange {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok {
		s.failRun = 0
		s.okRun++
		if s.checkDown && s.okRun >= rise {
			s.checkDown = false
			return checkMarkedUp
		}
		return checkNoChange
	}
	s.okRun = 0
	s.failRun++
	if !s.checkDown && s.failRun >= fall {
		s.checkDown = true
		return checkMarkedDown
	}
	return checkNoChange
}

// stateTable holds the upstreams' states of the process, by address.
type stateTable struct {
	mu sync.Mutex
	m  map[backendAddr]*upstreamState
}

var upstreamStates = &stateTable{m: make(map[backendAddr]*upstreamState)}

func (t *stateTable) acquire(addr backendAddr) *upstreamState {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.m[addr]
	if s == nil {
		s = &upstreamState{addr: addr}
		t.m[addr] = s
	}
	s.mu.Lock()
	s.refs++
	s.mu.Unlock()
	return s
}

// release forgets the state once no pool names its address (sessions
// still open keep their pointer and count down on it).
func (t *stateTable) release(s *upstreamState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s.mu.Lock()
	s.refs--
	gone := s.refs <= 0
	s.mu.Unlock()
	if gone && t.m[s.addr] == s {
		delete(t.m, s.addr)
	}
}

func (t *stateTable) snapshot() []*upstreamState {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*upstreamState, 0, len(t.m))
	for _, s := range t.m {
		out = append(out, s)
	}
	return out
}

// upstreamCollector reports every upstream of the process when scraped:
// caddy_layer4_smtp_upstream_healthy and
// caddy_layer4_smtp_upstream_active_sessions, labelled by the upstream's
// configured address. Reading the table at scrape time leaves no series
// behind for an upstream a reload removed.
type upstreamCollector struct {
	healthy, active *prometheus.Desc
}

func newUpstreamCollector(ns, sub string) *upstreamCollector {
	return &upstreamCollector{
		healthy: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "upstream_healthy"),
			"Whether an upstream takes sessions (1) or is down by the health checks (0).", []string{"upstream"}, nil),
		active: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "upstream_active_sessions"),
			"Sessions open to an upstream through this process.", []string{"upstream"}, nil),
	}
}

func (c *upstreamCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.healthy
	ch <- c.active
}

func (c *upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, s := range upstreamStates.snapshot() {
		healthy := 0.0
		if s.up(now) {
			healthy = 1
		}
		ch <- prometheus.MustNewConstMetric(c.healthy, prometheus.GaugeValue, healthy, s.addr.address)
		ch <- prometheus.MustNewConstMetric(c.active, prometheus.GaugeValue, float64(s.active.Load()), s.addr.address)
	}
}
