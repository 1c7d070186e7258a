package l4smtp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/pires/go-proxyproto"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// testPool is a pool of the named upstreams (addresses nobody dials),
// with weights, for the policies' tests.
func testPool(t *testing.T, policy string, weights ...int) *upstreamPool {
	t.Helper()
	cfg := poolConfig{policy: policy, timeout: time.Second, failDuration: time.Minute}
	for i, w := range weights {
		cfg.addrs = append(cfg.addrs, backendAddr{network: "tcp", address: fmt.Sprintf("192.0.2.%d:25", i+1)})
		cfg.weights = append(cfg.weights, w)
	}
	p := newUpstreamPool(cfg)
	t.Cleanup(p.close)
	return p
}

// names is the order's addresses by their last octet: "1 2 3".
func names(order []*upstream) string {
	var s []string
	for _, u := range order {
		s = append(s, strings.TrimSuffix(strings.TrimPrefix(u.addr.address, "192.0.2."), ":25"))
	}
	return strings.Join(s, " ")
}

// firsts picks n times and returns the first upstream of each order.
func firsts(p *upstreamPool, client netip.Addr, n int) string {
	var s []string
	for range n {
		s = append(s, names(p.order(client)[:1]))
	}
	return strings.Join(s, " ")
}

// randomFrom returns a rand that yields the values in turn, each modulo
// its argument.
func randomFrom(values ...int) func(int) int {
	i := 0
	return func(n int) int {
		v := values[i%len(values)] % n
		i++
		return v
	}
}

func TestLoadBalancingPolicies(t *testing.T) {
	client := netip.MustParseAddr("203.0.113.7")
	tests := []struct {
		name    string
		policy  string
		weights []int
		rand    []int
		setup   func(p *upstreamPool)
		picks   int
		want    string // the first upstream of each pick
	}{
		{name: "first", policy: "first", weights: []int{1, 1, 1}, picks: 3, want: "1 1 1"},
		{name: "first skips a down one", policy: "first", weights: []int{1, 1, 1}, picks: 2, want: "2 2",
			setup: func(p *upstreamPool) { p.upstreams[0].state.markFailed(p.now().Add(time.Minute)) }},
		{name: "round robin", policy: "round_robin", weights: []int{1, 1, 1}, picks: 6, want: "1 2 3 1 2 3"},
		{name: "round robin weighted 3:1", policy: "round_robin", weights: []int{3, 1}, picks: 8, want: "1 1 2 1 1 1 2 1"},
		{name: "round robin skips a down one", policy: "round_robin", weights: []int{1, 1, 1}, picks: 4, want: "1 3 1 3",
			setup: func(p *upstreamPool) { p.upstreams[1].state.markFailed(p.now().Add(time.Minute)) }},
		{name: "random by weight", policy: "random", weights: []int{1, 3}, rand: []int{0, 1, 2, 3, 0}, picks: 5, want: "1 2 2 2 1"},
		{name: "least conn", policy: "least_conn", weights: []int{1, 1, 1}, rand: []int{0}, picks: 2, want: "3 3",
			setup: func(p *upstreamPool) {
				p.upstreams[0].state.active.Add(2)
				p.upstreams[1].state.active.Add(1)
			}},
		{name: "least conn ties at random", policy: "least_conn", weights: []int{1, 1, 1}, rand: []int{1, 2, 0}, picks: 3, want: "2 3 1"},
		{name: "all down: all tried", policy: "first", weights: []int{1, 1}, picks: 1, want: "1",
			setup: func(p *upstreamPool) {
				for _, u := range p.upstreams {
					u.state.markFailed(p.now().Add(time.Minute))
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := testPool(t, tt.policy, tt.weights...)
			if tt.rand != nil {
				p.rand = randomFrom(tt.rand...)
			}
			if tt.setup != nil {
				tt.setup(p)
			}
			if got := firsts(p, client, tt.picks); got != tt.want {
				t.Errorf("picked %s, want %s", got, tt.want)
			}
			// every order holds every healthy upstream once, for the retry
			if got := len(p.order(client)); got < 1 || got > len(tt.weights) {
				t.Errorf("an order of %d upstreams", got)
			}
		})
	}
}

// Weighted round robin and random give each upstream its share over many
// sessions.
func TestLoadBalancingWeights(t *testing.T) {
	for _, policy := range []string{"round_robin", "random"} {
		t.Run(policy, func(t *testing.T) {
			p := testPool(t, policy, 1, 2, 5)
			counts := map[string]int{}
			for range 800 {
				counts[names(p.order(netip.Addr{})[:1])]++
			}
			want := map[string]int{"1": 100, "2": 200, "3": 500}
			for k, w := range want {
				got := counts[k]
				if policy == "round_robin" && got != w {
					t.Errorf("upstream %s: %d sessions, want %d", k, got, w)
				}
				if policy == "random" && (got < w/2 || got > w*3/2) {
					t.Errorf("upstream %s: %d sessions, want about %d", k, got, w)
				}
			}
		})
	}
}

// ip_hash keeps a client on its upstream, spreads clients, and moves only
// the clients of an upstream that goes down.
func TestLoadBalancingIPHash(t *testing.T) {
	p := testPool(t, "ip_hash", 1, 1, 1)
	owner := map[netip.Addr]string{}
	spread := map[string]int{}
	for i := range 300 {
		client := netip.AddrFrom4([4]byte{198, 51, byte(i / 256), byte(i)})
		owner[client] = firsts(p, client, 1)
		if again := firsts(p, client, 3); again != strings.Repeat(owner[client]+" ", 2)+owner[client] {
			t.Fatalf("client %s went to %s, then %s", client, owner[client], again)
		}
		spread[owner[client]]++
	}
	for _, k := range []string{"1", "2", "3"} {
		if spread[k] < 50 {
			t.Errorf("upstream %s has %d of 300 clients: %v", k, spread[k], spread)
		}
	}
	p.upstreams[1].state.markFailed(p.now().Add(time.Minute))
	for client, was := range owner {
		got := firsts(p, client, 1)
		if was != "2" && got != was {
			t.Errorf("client %s moved from %s to %s, though only 2 went down", client, was, got)
		}
		if got == "2" {
			t.Errorf("client %s still on the down upstream", client)
		}
	}
}

// A passive failure keeps an upstream down for fail_duration, then it is
// back, with a Warn at each change.
func TestPassiveMarkAndExpiry(t *testing.T) {
	p := testPool(t, "first", 1, 1)
	core, logs := observer.New(zap.DebugLevel)
	p.logger = zap.New(core)
	now := time.Unix(1_000_000, 0)
	p.now = func() time.Time { return now }
	p.failed(p.upstreams[0], errors.New("connection refused"))
	p.failed(p.upstreams[0], errors.New("connection refused")) // no second warning
	if got := names(p.order(netip.Addr{})); got != "2" {
		t.Fatalf("order %s, want 2 alone", got)
	}
	now = now.Add(time.Minute - time.Nanosecond)
	if got := names(p.order(netip.Addr{})); got != "2" {
		t.Fatalf("order %s before fail_duration is over, want 2 alone", got)
	}
	now = now.Add(time.Nanosecond)
	if got := names(p.order(netip.Addr{})); got != "1 2" {
		t.Fatalf("order %s after fail_duration, want 1 2", got)
	}
	down := logs.FilterMessage("mail server down").All()
	up := logs.FilterMessage("mail server healthy again").All()
	if len(down) != 1 || down[0].Level != zapcore.WarnLevel || down[0].ContextMap()["upstream"] != "192.0.2.1:25" ||
		!strings.Contains(fmt.Sprint(down[0].ContextMap()["error"]), "refused") {
		t.Errorf("want one Warn naming the upstream and the reason; got %v", down)
	}
	if len(up) != 1 || up[0].Level != zapcore.WarnLevel {
		t.Errorf("want one Warn when it is back; got %v", up)
	}
}

// testMTA is a scripted mail server for the health checks: it greets as
// told, answers EHLO and QUIT, and reports each EHLO name and PROXY header.
type testMTA struct {
	ln       net.Listener
	mu       sync.Mutex
	greeting string // "" hangs up at once
	proxy    bool   // reads a PROXY header first
	ehlos    chan string
	headers  chan *proxyproto.Header
}

func newTestMTA(t *testing.T, proxy bool) *testMTA {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &testMTA{ln: ln, greeting: "220 mta.test ESMTP", proxy: proxy,
		ehlos: make(chan string, 100), headers: make(chan *proxyproto.Header, 100)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go m.serve(conn)
		}
	}()
	return m
}

func (m *testMTA) greet(g string) {
	m.mu.Lock()
	m.greeting = g
	m.mu.Unlock()
}

func (m *testMTA) serve(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	if m.proxy {
		h, err := proxyproto.Read(r)
		if err != nil {
			return // as Postfix: no header, no session
		}
		m.headers <- h
	}
	m.mu.Lock()
	g := m.greeting
	m.mu.Unlock()
	if g == "" {
		return
	}
	fmt.Fprintf(conn, "%s\r\n", g)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		cmd := strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(cmd, "EHLO "):
			m.ehlos <- strings.TrimPrefix(cmd, "EHLO ")
			io.WriteString(conn, "250-mta.test\r\n250 PIPELINING\r\n")
		case cmd == "QUIT":
			io.WriteString(conn, "221 2.0.0 Bye\r\n")
			return
		default:
			io.WriteString(conn, "250 2.0.0 Ok\r\n")
		}
	}
}

// activePool is a pool with active checks of the given rise and fall on
// the addresses.
func activePool(t *testing.T, rise, fall, proxyProtocol int, addrs ...string) (*upstreamPool, *observer.ObservedLogs) {
	t.Helper()
	cfg := poolConfig{timeout: time.Second, proxyProtocol: proxyProtocol,
		active: &activeChecks{interval: time.Hour, timeout: 5 * time.Second, rise: rise, fall: fall, ehlo: "health-check.mail.test"}}
	for _, a := range addrs {
		cfg.addrs = append(cfg.addrs, backendAddr{network: "tcp", address: a})
	}
	p := newUpstreamPool(cfg)
	t.Cleanup(p.close)
	core, logs := observer.New(zap.DebugLevel)
	p.logger = zap.New(core)
	return p, logs
}

// An active check speaks SMTP to a real listener: 2xx greeting, EHLO with
// the recognisable name, QUIT. With fall 2, one failed check is not enough
// to mark the upstream down, two are; with rise 2, one good check is not
// enough to take it back, two are.
func TestActiveHealthCheckRiseFall(t *testing.T) {
	for _, bad := range []struct{ name, greeting string }{
		{"greets 421", "421 4.3.2 mta.test Service shutting down"},
		{"hangs up", ""},
	} {
		t.Run(bad.name, func(t *testing.T) {
			mta := newTestMTA(t, false)
			p, logs := activePool(t, 2, 2, 0, mta.ln.Addr().String())
			u := p.upstreams[0]
			ctx := context.Background()
			step := func(wantHealthy bool) {
				t.Helper()
				p.recordCheck(u, p.check(ctx, u))
				if got, _ := u.state.healthy(p.now()); got != wantHealthy {
					t.Fatalf("healthy %v, want %v", got, wantHealthy)
				}
			}
			step(true)
			if name := <-mta.ehlos; name != "health-check.mail.test" {
				t.Errorf("EHLO %q", name)
			}
			mta.greet(bad.greeting)
			step(true) // fall 2: not yet
			step(false)
			if logs.FilterMessage("mail server down").Len() != 1 {
				t.Errorf("want one Warn when it goes down; log %v", logs.All())
			}
			mta.greet("220 mta.test ESMTP")
			step(false) // rise 2: not yet
			step(true)
			if logs.FilterMessage("mail server healthy again").Len() != 1 {
				t.Errorf("want one Warn when it is back; log %v", logs.All())
			}
			// a refused dial fails a check too
			mta.ln.Close()
			step(true)
			step(false)
		})
	}
}

// A check sends the PROXY header a backend that requires one needs: v2
// LOCAL (no client), v1 with the edge's own addresses.
func TestActiveHealthCheckProxyHeader(t *testing.T) {
	for _, version := range []int{1, 2} {
		t.Run(fmt.Sprintf("v%d", version), func(t *testing.T) {
			mta := newTestMTA(t, true)
			p, _ := activePool(t, 1, 1, version, mta.ln.Addr().String())
			if err := p.check(context.Background(), p.upstreams[0]); err != nil {
				t.Fatalf("check: %v", err)
			}
			h := <-mta.headers
			switch version {
			case 2:
				if h.Version != 2 || h.Command != proxyproto.LOCAL {
					t.Errorf("header %+v, want v2 LOCAL", h)
				}
			case 1:
				if h.Version != 1 || h.Command != proxyproto.PROXY || h.DestinationAddr.String() != mta.ln.Addr().String() {
					t.Errorf("header %+v, want v1 from the edge to %s", h, mta.ln.Addr())
				}
			}
		})
	}
}

// The checker runs from start and ends with close (a config reload closes
// the old config's pools): close returns only once the checker goroutine
// has ended, and the handler's Cleanup closes its pool.
func TestHealthCheckerStopsOnCleanup(t *testing.T) {
	mta := newTestMTA(t, false)
	h, _ := newTestHandler(t, func(h *Handler) {
		h.Upstreams = []*Upstream{{Dial: []string{mta.ln.Addr().String()}}}
		h.HealthChecks = &HealthChecks{Active: &ActiveHealthChecks{Interval: caddy.Duration(time.Millisecond)}}
	})
	h.route.pool.start(zap.NewNop())
	for range 3 { // the checker runs, again and again
		<-mta.ehlos
	}
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.route.pool.done:
	default:
		t.Fatal("Cleanup returned with the checker still running")
	}
	if _, ok := upstreamStates.m[h.route.pool.upstreams[0].addr]; ok {
		t.Error("the upstream's state outlived the last pool that names it")
	}
}

// A session whose first upstream greets 421, hangs up before its greeting,
// or refuses the connection goes to the next one, its client unaware;
// with passive health checks the first is down for the next sessions.
func TestPassiveHealthRetriesNextUpstream(t *testing.T) {
	for _, tt := range []struct {
		name  string
		first func(t *testing.T) string
	}{
		{"greets 421", func(t *testing.T) string {
			m := newTestMTA(t, false)
			m.greet("421 4.3.2 mta.test Try again later")
			return m.ln.Addr().String()
		}},
		{"hangs up before greeting", func(t *testing.T) string {
			m := newTestMTA(t, false)
			m.greet("")
			return m.ln.Addr().String()
		}},
		{"refused", func(t *testing.T) string { return refusedAddr(t) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			first := tt.first(t)
			via := viaBackend(t)
			h, logs := newTestHandler(t, func(h *Handler) {
				h.Upstreams = []*Upstream{{Dial: []string{first}}, {Dial: []string{via.ln.Addr().String()}}}
				h.HealthChecks = &HealthChecks{Passive: &PassiveHealthChecks{}}
			})
			t.Cleanup(h.route.pool.close)
			h.route.pool.logger = h.logger
			conn, r, done := serveRelay(t, h, via, false, func(b *backend) error {
				b.send("220 backend ESMTP\r\n")
				b.expect("QUIT")
				b.send("221 2.0.0 Bye\r\n")
				b.finish()
				return nil
			})
			if got := readReplies(t, r, 1)[0]; got != "220 backend ESMTP" {
				t.Fatalf("got %q, want the second upstream's greeting", got)
			}
			io.WriteString(conn, "QUIT\r\n")
			readReplies(t, r, 1)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if got := names2(h.route.pool.order(netip.Addr{})); got != via.ln.Addr().String() {
				t.Errorf("order %s: the first upstream is not down", got)
			}
			if logs.FilterMessage("mail server down").Len() != 1 {
				t.Errorf("want a Warn that the first upstream is down; log %v", logs.All())
			}
		})
	}
}

// A backend that closes a session in its middle (no 221, no 421) is marked
// down with passive health checks; one that ends it with 221 is not.
func TestPassiveHealthSessionCut(t *testing.T) {
	for _, tt := range []struct {
		name string
		end  func(b *backend)
		down bool
	}{
		{"cut", func(b *backend) { b.finish() }, true},
		{"221", func(b *backend) { b.expect("QUIT"); b.send("221 2.0.0 Bye\r\n"); b.finish() }, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			via := viaBackend(t)
			other := refusedAddr(t)
			h, logs := newTestHandler(t, func(h *Handler) {
				h.Upstreams = []*Upstream{{Dial: []string{via.ln.Addr().String()}}, {Dial: []string{other}}}
				h.HealthChecks = &HealthChecks{Passive: &PassiveHealthChecks{}}
			})
			t.Cleanup(h.route.pool.close)
			h.route.pool.logger = h.logger
			conn, r, done := serveRelay(t, h, via, false, func(b *backend) error {
				b.send("220 backend ESMTP\r\n")
				b.expect("NOOP")
				b.send("250 2.0.0 Ok\r\n")
				tt.end(b)
				return nil
			})
			readReplies(t, r, 1)
			io.WriteString(conn, "NOOP\r\n")
			readReplies(t, r, 1)
			if !tt.down {
				io.WriteString(conn, "QUIT\r\n")
			}
			readReplies(t, r, 1) // 421 4.4.2, or 221
			<-done
			down := names2(h.route.pool.order(netip.Addr{})) == other
			if down != tt.down || (logs.FilterMessage("mail server down").Len() == 1) != tt.down {
				t.Errorf("upstream down %v, want %v; log %v", down, tt.down, logs.All())
			}
		})
	}
}

func names2(order []*upstream) string {
	var s []string
	for _, u := range order {
		s = append(s, u.addr.address)
	}
	return strings.Join(s, " ")
}

// The count of a session on its upstream (least_conn, the metrics) goes
// up while the session lasts and back down however it ends.
func TestLeastConnCountsDown(t *testing.T) {
	type ending struct {
		name   string
		script func(b *backend) error
		client func(t *testing.T, conn net.Conn, r *bufio.Reader, greeted func())
		idle   bool
	}
	for _, e := range []ending{
		{name: "quit", script: func(b *backend) error {
			b.send("220 backend ESMTP\r\n")
			b.expect("QUIT")
			b.send("221 2.0.0 Bye\r\n")
			b.finish()
			return nil
		}, client: func(t *testing.T, conn net.Conn, r *bufio.Reader, greeted func()) {
			readReplies(t, r, 1)
			greeted()
			io.WriteString(conn, "QUIT\r\n")
			readReplies(t, r, 1)
		}},
		{name: "client vanishes", script: func(b *backend) error {
			b.send("220 backend ESMTP\r\n")
			io.ReadAll(b.r)
			b.finish()
			return nil
		}, client: func(t *testing.T, conn net.Conn, r *bufio.Reader, greeted func()) {
			readReplies(t, r, 1)
			greeted()
			conn.Close()
		}},
		{name: "backend hangs up", script: func(b *backend) error {
			b.send("220 backend ESMTP\r\n")
			b.finish()
			return nil
		}, client: func(t *testing.T, conn net.Conn, r *bufio.Reader, greeted func()) {
			readReplies(t, r, 1)
			greeted() // the backend may have hung up already: counted or not
			readReplies(t, r, 1)
		}},
		{name: "idle timeout", idle: true, script: func(b *backend) error {
			b.send("220 backend ESMTP\r\n")
			io.ReadAll(b.r)
			return nil
		}, client: func(t *testing.T, conn net.Conn, r *bufio.Reader, greeted func()) {
			readReplies(t, r, 1)
			greeted()
			readReplies(t, r, 1)
		}},
		{name: "greeting refused", script: func(b *backend) error {
			b.send("554 5.7.1 No\r\n")
			b.finish()
			return nil
		}, client: func(t *testing.T, conn net.Conn, r *bufio.Reader, greeted func()) {
			readReplies(t, r, 1)
		}},
	} {
		t.Run(e.name, func(t *testing.T) {
			via := viaBackend(t)
			h, _ := newTestHandler(t, func(h *Handler) {
				h.Upstreams = []*Upstream{{Dial: []string{via.ln.Addr().String()}}}
				h.LoadBalancing = &LoadBalancing{Policy: "least_conn"}
				if e.idle {
					h.Timeouts.Idle = caddy.Duration(50 * time.Millisecond)
				}
			})
			t.Cleanup(h.route.pool.close)
			state := h.route.pool.upstreams[0].state
			during := int64(-1)
			conn, r, done := serveRelay(t, h, via, false, e.script)
			e.client(t, conn, r, func() { during = state.active.Load() })
			<-done
			if during != -1 && during != 1 && e.name != "backend hangs up" {
				t.Errorf("%d sessions counted during the session, want 1", during)
			}
			if got := state.active.Load(); got != 0 {
				t.Errorf("%d sessions counted after the session, want 0", got)
			}
		})
	}
}

// The upstreams' state is in the metrics: healthy 1/0, active sessions.
func TestUpstreamMetrics(t *testing.T) {
	p := testPool(t, "first", 1, 1)
	p.upstreams[0].state.markFailed(time.Now().Add(time.Hour))
	p.upstreams[1].state.active.Add(2)
	defer p.upstreams[1].state.active.Add(-2)
	reg := prometheus.NewRegistry()
	reg.MustRegister(newUpstreamCollector("caddy", "layer4_smtp"))
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			got[f.GetName()+" "+m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
		}
	}
	for k, want := range map[string]float64{
		"caddy_layer4_smtp_upstream_healthy 192.0.2.1:25":         0,
		"caddy_layer4_smtp_upstream_healthy 192.0.2.2:25":         1,
		"caddy_layer4_smtp_upstream_active_sessions 192.0.2.2:25": 2,
	} {
		if v, ok := got[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
		}
	}
}

// An address that several pools name (several smtp blocks, one server) is
// checked by one of them at a time, so that rise and fall count its checks
// only; when that pool closes (a reload), another takes over.
func TestActiveChecksOnePoolPerAddress(t *testing.T) {
	mta := newTestMTA(t, false)
	p1, _ := activePool(t, 2, 2, 0, mta.ln.Addr().String())
	p2, _ := activePool(t, 2, 2, 0, mta.ln.Addr().String())
	s := p1.upstreams[0].state
	if p2.upstreams[0].state != s {
		t.Fatal("the two pools do not share the address's state")
	}
	if !s.claimChecks(p1) || s.claimChecks(p2) || !s.claimChecks(p1) {
		t.Fatal("both pools check the address, or the first lost it")
	}
	p1.close()
	if !s.claimChecks(p2) {
		t.Fatal("the second pool does not take over the checks when the first closes")
	}
}
