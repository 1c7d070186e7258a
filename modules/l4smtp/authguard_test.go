package l4smtp

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage" // the storage of the test's caddy
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// testGuard is a guard with the given options over tables of its own, so
// that tests neither see nor leave counts in the process's tables; its
// ban counter is its own too.
func testGuard(t *testing.T, opts AuthGuard) *authGuard {
	t.Helper()
	g, err := opts.build()
	if err != nil {
		t.Fatal(err)
	}
	g.state = newGuardState(prometheus.NewCounter(prometheus.CounterOpts{Name: "test_bans"}))
	return g
}

var t0 = time.Date(2026, 8, 1, 12, 0, 0, 0, time.UTC)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// checkTable verifies the table's invariants: every entry indexed where it
// is, both lists whole and consistent, banned entries only in the ban list.
func checkTable[K comparable](t *testing.T, tb *guardTable[K]) {
	t.Helper()
	if len(tb.index) != len(tb.entries) {
		t.Fatalf("%d indexed, %d entries", len(tb.index), len(tb.entries))
	}
	for k, i := range tb.index {
		if tb.entries[i].key != k {
			t.Fatalf("index %v → %d holds %v", k, i, tb.entries[i].key)
		}
	}
	seen := 0
	for list, l := range tb.lists {
		prev := int32(-1)
		for i := l.head; i >= 0; i = tb.entries[i].next {
			e := tb.entries[i]
			if e.prev != prev || int(e.list) != list {
				t.Fatalf("list %d: entry %d has prev %d list %d, want %d %d", list, i, e.prev, e.list, prev, list)
			}
			if (e.banUntil != 0) != (list == banning) {
				t.Fatalf("list %d: entry %d banUntil %d", list, i, e.banUntil)
			}
			prev = i
			seen++
		}
		if l.tail != prev {
			t.Fatalf("list %d: tail %d, last %d", list, l.tail, prev)
		}
	}
	if seen != len(tb.entries) {
		t.Fatalf("%d entries in the lists, %d in the table", seen, len(tb.entries))
	}
}

func TestAuthGuardCountsAndBans(t *testing.T) {
	g := testGuard(t, AuthGuard{})
	ip, other := addr("192.0.2.1"), addr("192.0.2.2")
	want := []time.Duration{2, 4, 8, 15, 15, 15, 15, 15, 15, 15}
	for i, w := range want {
		now := t0.Add(time.Duration(i) * time.Minute)
		delay, banned := g.failure(ip, "", now)
		if delay != w*time.Second {
			t.Errorf("failure %d: delay %s, want %ds", i+1, delay, w)
		}
		if banned != (i+1 == defaultGuardMaxFailures) {
			t.Errorf("failure %d: banned %v", i+1, banned)
		}
	}
	if !g.banned(ip, t0.Add(10*time.Minute)) {
		t.Error("not banned after max_failures")
	}
	if g.banned(other, t0.Add(10*time.Minute)) {
		t.Error("another address banned")
	}
	if got := testutil.ToFloat64(g.state.bans); got != 1 {
		t.Errorf("bans counted %v, want 1", got)
	}
	// a failure during the ban (a session opened before it) is delayed
	// the most, and the ban is neither counted again nor made longer
	if delay, banned := g.failure(ip, "", t0.Add(11*time.Minute)); delay != 15*time.Second || !banned {
		t.Errorf("failure while banned: %s %v", delay, banned)
	}
	if got := testutil.ToFloat64(g.state.bans); got != 1 {
		t.Errorf("bans counted %v after a failure while banned, want 1", got)
	}
	checkTable(t, &g.state.addrs)
}

func TestAuthGuardWindow(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 3, Window: caddy.Duration(10 * time.Minute)})
	ip := addr("192.0.2.1")
	g.failure(ip, "", t0)
	g.failure(ip, "", t0.Add(9*time.Minute))
	// the window counts from the first failure: this one starts a new one
	if delay, banned := g.failure(ip, "", t0.Add(10*time.Minute)); banned || delay != 2*time.Second {
		t.Fatalf("first failure of a new window: %s, banned %v", delay, banned)
	}
	g.failure(ip, "", t0.Add(11*time.Minute))
	if _, banned := g.failure(ip, "", t0.Add(19*time.Minute)); !banned {
		t.Fatal("three failures within the window did not ban")
	}
}

func TestAuthGuardBanExpires(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 2, Ban: caddy.Duration(time.Hour)})
	ip := addr("192.0.2.1")
	g.failure(ip, "", t0)
	g.failure(ip, "", t0)
	if !g.banned(ip, t0.Add(time.Hour-time.Nanosecond)) {
		t.Fatal("ban over too soon")
	}
	end := t0.Add(time.Hour)
	if g.banned(ip, end) {
		t.Fatal("still banned after the ban time")
	}
	// after the ban the address starts afresh, with the first delay
	if delay, banned := g.failure(ip, "", end); banned || delay != 2*time.Second {
		t.Fatalf("first failure after the ban: %s, banned %v", delay, banned)
	}
	if _, banned := g.failure(ip, "", end); !banned {
		t.Fatal("not banned again")
	}
	checkTable(t, &g.state.addrs)
}

func TestAuthGuardSuccessClears(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 3})
	ip := addr("192.0.2.1")
	g.failure(ip, "", t0)
	g.failure(ip, "", t0)
	g.success(ip, t0)
	if delay, banned := g.failure(ip, "", t0); banned || delay != 2*time.Second {
		t.Fatalf("failure after a success: %s, banned %v; the count was not cleared", delay, banned)
	}
	g.failure(ip, "", t0)
	g.failure(ip, "", t0)
	g.success(ip, t0) // e.g. the guesser's own account, in an older session
	if !g.banned(ip, t0) {
		t.Fatal("a success ended the ban")
	}
	checkTable(t, &g.state.addrs)
}

// Failures per account slow a distributed guesser down, and lock nobody out.
func TestAuthGuardAccounts(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 3})
	for i := range 50 {
		ip := netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})
		delay, banned := g.failure(ip, "alice@example.org", t0)
		if banned {
			t.Fatalf("address %s banned after one failure", ip)
		}
		want := 15 * time.Second
		if i < 3 {
			want = 2 * time.Second << i
		}
		if delay != want {
			t.Fatalf("failure %d for the account: delay %s, want %s", i+1, delay, want)
		}
	}
	// the account's owner is slowed on a failure but never refused
	owner := addr("203.0.113.5")
	if delay, banned := g.failure(owner, "Alice@Example.org", t0); delay != 15*time.Second || banned {
		t.Fatalf("owner's failure: %s, banned %v; user names are compared without case", delay, banned)
	}
	if g.banned(owner, t0) {
		t.Fatal("the account's owner is refused")
	}
	// another account is not slowed by alice's failures
	if delay, _ := g.failure(addr("203.0.113.6"), "bob@example.org", t0); delay != 2*time.Second {
		t.Fatalf("another account's first failure: %s", delay)
	}
	// an account's failures expire with the window
	if delay, _ := g.failure(addr("203.0.113.7"), "alice@example.org", t0.Add(defaultGuardWindow)); delay != 2*time.Second {
		t.Fatalf("account failure after the window: %s", delay)
	}
	for _, e := range g.state.accounts.entries {
		if e.banUntil != 0 {
			t.Fatal("an account was banned")
		}
	}
	checkTable(t, &g.state.accounts)
}

func TestAuthGuardDelays(t *testing.T) {
	for _, tt := range []struct {
		opts AuthGuard
		want []time.Duration // for failures 1, 2, ...
	}{
		{AuthGuard{}, []time.Duration{2e9, 4e9, 8e9, 15e9, 15e9}},
		{AuthGuard{Delay: caddy.Duration(time.Second), MaxDelay: caddy.Duration(3 * time.Second)}, []time.Duration{1e9, 2e9, 3e9, 3e9}},
		{AuthGuard{Delay: caddy.Duration(20 * time.Second)}, []time.Duration{20e9, 20e9}},
		{AuthGuard{Delay: -1}, []time.Duration{0, 0, 0}},
	} {
		g := testGuard(t, tt.opts)
		for i, want := range tt.want {
			if got := g.delayFor(i + 1); got != want {
				t.Errorf("%+v: failure %d: delay %s, want %s", tt.opts, i+1, got, want)
			}
		}
		if got := g.delayFor(1000); got != g.maxDelay {
			t.Errorf("%+v: failure 1000: delay %s, want %s", tt.opts, got, g.maxDelay)
		}
	}
}

func TestAuthGuardIPv6Grouping(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 2})
	g.failure(addr("2001:db8:1:2::1"), "", t0)
	g.failure(addr("2001:db8:1:2:ffff:ffff:ffff:9"), "", t0)
	for _, tt := range []struct {
		ip     string
		banned bool
	}{
		{"2001:db8:1:2::77", true},      // the same /64
		{"2001:db8:1:2::77%eth0", true}, // a zone changes nothing
		{"2001:db8:1:3::1", false},      // the next /64
		{"::ffff:2001:db8:1:2", false},  // not an IPv4-mapped /64 clash
		{"::ffff:192.0.2.1", false},     // IPv4 is not grouped ...
		{"192.0.2.1", false},            // ...
	} {
		if got := g.banned(addr(tt.ip), t0); got != tt.banned {
			t.Errorf("%s: banned %v, want %v", tt.ip, got, tt.banned)
		}
	}
	g.failure(addr("192.0.2.1"), "", t0)
	g.failure(addr("::ffff:192.0.2.1"), "", t0)
	if !g.banned(addr("192.0.2.1"), t0) {
		t.Error("an IPv4 address and its IPv4-mapped form counted apart")
	}
	if g.banned(addr("192.0.2.2"), t0) {
		t.Error("IPv4 neighbours counted together")
	}
}

func TestAuthGuardEviction(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 2, MaxEntries: 3, Ban: caddy.Duration(time.Hour)})
	a, b, c, d := addr("192.0.2.1"), addr("192.0.2.2"), addr("192.0.2.3"), addr("192.0.2.4")
	g.failure(a, "", t0)
	g.failure(b, "", t0)
	g.failure(c, "", t0)
	g.failure(a, "", t0.Add(time.Second)) // a bans, b is now the one that failed least recently
	g.failure(d, "", t0.Add(2*time.Second))
	tb := &g.state.addrs
	checkTable(t, tb)
	if _, ok := tb.index[keyOfAddr(b)]; ok || len(tb.entries) != 3 {
		t.Fatalf("b not evicted: %d entries", len(tb.entries))
	}
	// a flood of new addresses evicts counts, never the ban
	for i := range 100 {
		g.failure(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), "", t0.Add(3*time.Second))
		checkTable(t, tb)
	}
	if !g.banned(a, t0.Add(3*time.Second)) || len(tb.entries) != 3 {
		t.Fatalf("the ban did not survive the flood (%d entries)", len(tb.entries))
	}
	// a table of bans only makes room by its oldest ban; an expired ban
	// goes before any count
	g.failure(c, "", t0.Add(4*time.Second))
	g.failure(c, "", t0.Add(4*time.Second))
	g.failure(d, "", t0.Add(5*time.Second))
	g.failure(d, "", t0.Add(5*time.Second)) // a, c, d banned
	g.failure(b, "", t0.Add(6*time.Second))
	if g.banned(a, t0.Add(6*time.Second)) || !g.banned(c, t0.Add(6*time.Second)) {
		t.Fatal("with bans only, the oldest ban was not the one evicted")
	}
	g.failure(addr("192.0.2.9"), "", t0.Add(time.Hour+4*time.Second)) // c's ban is over
	if _, ok := tb.index[keyOfAddr(c)]; ok {
		t.Fatal("an expired ban was kept over a count")
	}
	if _, ok := tb.index[keyOfAddr(b)]; !ok {
		t.Fatal("a count was evicted before an expired ban")
	}
	checkTable(t, tb)

	// a lower max_entries (after a reload) shrinks the table as entries come
	small := testGuard(t, AuthGuard{MaxEntries: 1})
	small.state = g.state
	small.failure(addr("192.0.2.10"), "", t0.Add(2*time.Hour))
	small.failure(addr("192.0.2.11"), "", t0.Add(2*time.Hour))
	if len(tb.entries) != 1 {
		t.Fatalf("%d entries under max_entries 1", len(tb.entries))
	}
	checkTable(t, tb)
}

// Random operations keep the table consistent and within its bound.
func TestAuthGuardTableRandom(t *testing.T) {
	g := testGuard(t, AuthGuard{MaxFailures: 3, MaxEntries: 16, Window: caddy.Duration(time.Minute), Ban: caddy.Duration(5 * time.Minute)})
	r := rand.New(rand.NewPCG(1, 2))
	now := t0
	for range 20000 {
		now = now.Add(time.Duration(r.IntN(10)) * time.Second)
		ip := netip.AddrFrom4([4]byte{10, 0, 0, byte(r.IntN(40))})
		switch r.IntN(4) {
		case 0:
			g.success(ip, now)
		default:
			g.failure(ip, fmt.Sprint("user", r.IntN(30)), now)
		}
		if len(g.state.addrs.entries) > 16 || len(g.state.accounts.entries) > 16 {
			t.Fatal("over max_entries")
		}
	}
	checkTable(t, &g.state.addrs)
	checkTable(t, &g.state.accounts)
}

func TestAuthGuardNil(t *testing.T) {
	var g *authGuard // the guard is off
	if d, b := g.failure(addr("192.0.2.1"), "u", t0); d != 0 || b {
		t.Fatal("a nil guard delays or bans")
	}
	g.success(addr("192.0.2.1"), t0)
	if g.banned(addr("192.0.2.1"), t0) {
		t.Fatal("a nil guard bans")
	}
	// no IP address (a unix socket): only the account counts
	g = testGuard(t, AuthGuard{MaxFailures: 1})
	if d, b := g.failure(netip.Addr{}, "u", t0); d != 2*time.Second || b || len(g.state.addrs.entries) != 0 {
		t.Fatalf("no address: %s %v", d, b)
	}
}

func TestAuthGuardBuild(t *testing.T) {
	g, err := AuthGuard{}.build()
	if err != nil {
		t.Fatal(err)
	}
	if g.maxFailures != 10 || g.window != 15*time.Minute || g.ban != time.Hour || g.delay != 2*time.Second ||
		g.maxDelay != 15*time.Second || g.maxEntries != 100000 || g.state != processGuard {
		t.Errorf("defaults %+v", g)
	}
	if g, err := (AuthGuard{Disabled: true}).build(); g != nil || err != nil {
		t.Errorf("disabled: %v %v", g, err)
	}
	h := &Handler{Hostnames: []string{"m.example"}, AuthGuard: AuthGuard{Disabled: true}}
	if _, err := h.setup(); err != nil || h.guard != nil {
		t.Errorf("disabled in a handler: guard %v, error %v", h.guard, err)
	}
	for _, tt := range []struct {
		opts AuthGuard
		want string
	}{
		{AuthGuard{Disabled: true, MaxFailures: 3}, "disabled goes alone"},
		{AuthGuard{MaxFailures: -1}, "must not be negative"},
		{AuthGuard{MaxEntries: -1}, "must not be negative"},
		{AuthGuard{Window: -1}, "must not be negative"},
		{AuthGuard{Ban: -1}, "must not be negative"},
		{AuthGuard{MaxDelay: -1}, "must not be negative"},
		{AuthGuard{Delay: -1, MaxDelay: caddy.Duration(time.Second)}, "not with delays off"},
		{AuthGuard{Delay: caddy.Duration(time.Minute), MaxDelay: caddy.Duration(time.Second)}, "longer than max_delay"},
	} {
		h := &Handler{Hostnames: []string{"m.example"}, AuthGuard: tt.opts}
		if _, err := h.setup(); err == nil || !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "smtp: auth_guard") {
			t.Errorf("%+v: error %v, want one containing %q", tt.opts, err, tt.want)
		}
	}
}

// TestAuthGuardBytesPerEntry measures the memory of a full address table
// (the heap it holds divided by its entries) and prints it:
//
//	go test -run TestAuthGuardBytesPerEntry -v ./modules/l4smtp/
func TestAuthGuardBytesPerEntry(t *testing.T) {
	const n = 200000
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	users := make([]string, n+n/10)
	for i := range users {
		users[i] = fmt.Sprintf("user%d@example.org", i)
	}
	for _, table := range []string{"IPv4", "IPv6", "accounts"} {
		g := testGuard(t, AuthGuard{MaxEntries: n})
		before := heap()
		for i := range n + n/10 { // full, and evicting
			switch table {
			case "IPv4":
				g.failure(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), "", t0)
			case "IPv6":
				g.failure(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, byte(i >> 16), byte(i >> 8), byte(i), 15: 1}), "", t0)
			default:
				g.failure(netip.Addr{}, users[i], t0)
			}
		}
		after := heap()
		if got := len(g.state.addrs.entries) + len(g.state.accounts.entries); got != n {
			t.Fatalf("%d entries", got)
		}
		perEntry := float64(after-before) / n
		t.Logf("%s: %.0f bytes per entry (%d entries, %.1f MiB)", table, perEntry, n, float64(after-before)/(1<<20))
		if perEntry > 120 {
			t.Errorf("%s: %.0f bytes per entry; the README says at most 100", table, perEntry)
		}
		runtime.KeepAlive(g)
	}
}

// bannedAddr bans ip in the guard, as the relay would after max_failures
// 535s.
func bannedAddr(t *testing.T, g *authGuard, ip string) {
	t.Helper()
	for range g.maxFailures {
		g.failure(addr(ip), "", time.Now())
	}
	if !g.banned(addr(ip), time.Now()) {
		t.Fatal("not banned")
	}
}

const authBannedReply = "421 4.7.0 mail.test Too many failed logins, try again later"

// A banned address is turned away at connect, in plaintext, before any TLS
// work, on both kinds of listener; other addresses are served.
func TestAuthGuardRefusesAtConnect(t *testing.T) {
	for _, implicit := range []bool{false, true} {
		t.Run(fmt.Sprintf("implicit=%v", implicit), func(t *testing.T) {
			h, logs := newTestHandler(t, func(h *Handler) { h.ImplicitTLS = implicit; h.DetectTLS = -1 })
			h.guard = testGuard(t, AuthGuard{MaxFailures: 3})
			bannedAddr(t, h.guard, "127.0.0.8")
			port, ended := serveAll(t, h)
			listener := net.JoinHostPort("127.0.0.1", port)
			refusals := metrics.turnedAway.WithLabelValues(listener, "auth_banned")

			conn, r, first := dialFrom(t, "127.0.0.8", port)
			if first != authBannedReply {
				t.Fatalf("banned client: %q", first)
			}
			expectClosed(t, r)
			conn.Close()
			<-ended
			line := accessLine(t, logs)
			if line["outcome"] != string(outcomeAuthBanned) || line["tls"] != nil {
				t.Errorf("access line %v", line)
			}
			if got := testutil.ToFloat64(refusals); got != 1 {
				t.Errorf("turned_away_total{reason=auth_banned} %v, want 1", got)
			}

			// another address gets the greeting (STARTTLS) or a handshake
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.9")}}
			other, err := d.Dial("tcp", listener)
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			if implicit {
				if err := tls.Client(other, testClientTLS()).Handshake(); err != nil {
					t.Fatalf("another address: handshake: %v", err)
				}
			} else if got := readReplies(t, bufio.NewReader(other), 1)[0]; got != "220 mail.test ESMTP" {
				t.Fatalf("another address: %q", got)
			}
		})
	}
}

// The address a PROXY header in front of smtp gave is the one banned, not
// the load balancer's.
func TestAuthGuardBehindProxyProtocol(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	pp := &l4proxyprotocol.Handler{Allow: []string{"127.0.0.0/8"}}
	if err := pp.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	h, _ := newTestHandler(t, nil)
	h.guard = testGuard(t, AuthGuard{MaxFailures: 1})
	bannedAddr(t, h.guard, "203.0.113.7")
	nop := layer4.HandlerFunc(func(*layer4.Connection) error { return nil })
	for _, tt := range []struct{ client, want string }{
		{"203.0.113.7", authBannedReply},
		{"203.0.113.8", "220 mail.test ESMTP"},
	} {
		conn, done := serveOne(t, func(cx *layer4.Connection) error {
			return pp.Handle(cx, layer4.HandlerFunc(func(cx *layer4.Connection) error { return h.Handle(cx, nop) }))
		})
		fmt.Fprintf(conn, "PROXY TCP4 %s 127.0.0.1 40000 587\r\n", tt.client)
		r := bufio.NewReader(conn)
		if got := readReplies(t, r, 1)[0]; got != tt.want {
			t.Errorf("client %s behind the balancer: %q, want %q", tt.client, got, tt.want)
		}
		conn.Close()
		<-done
	}
}

// A config reload makes new handlers; a ban made under the old config
// holds under the new one. Caddy runs in the test's process, with real
// config loads, as the admin API's /load does them.
func TestAuthGuardOutlivesReload(t *testing.T) {
	ip := addr("127.0.0.77") // in the process's tables: an address no other test uses
	t.Cleanup(func() {
		processGuard.addrs.mu.Lock()
		defer processGuard.addrs.mu.Unlock()
		if i, ok := processGuard.addrs.index[keyOfAddr(ip)]; ok {
			processGuard.addrs.remove(i)
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(listen)
	// not t.TempDir: certificate maintenance started by the load may still
	// write into the storage while the test's cleanup removes it, which
	// t.TempDir reports as a failure; nothing here depends on that removal
	storage, err := os.MkdirTemp("", "authguard-reload-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(storage) })
	load := func(greeting string) {
		t.Helper()
		cfg := fmt.Sprintf(`{
			"admin": {"disabled": true},
			"logging": {"logs": {"default": {"level": "ERROR"}}},
			"storage": {"module": "file_system", "root": %q},
			"apps": {
				"pki": {"certificate_authorities": {"local": {"install_trust": false}}},
				"layer4": {"servers": {"smtp": {"listen": [%q], "routes": [{"handle": [
					{"handler": "smtp", "hostnames": ["mail.localhost"], "greeting": %q, "auth_guard": {"max_failures": 2}}
				]}]}}}
			}
		}`, storage, listen, greeting)
		if err := caddy.Load([]byte(cfg), true); err != nil {
			t.Fatal(err)
		}
	}
	load("before")
	t.Cleanup(func() { _ = caddy.Stop() })
	greeted := func(from string) string {
		t.Helper()
		conn, _, first := dialFrom(t, from, port)
		conn.Close()
		return first
	}
	if got := greeted("127.0.0.77"); got != "220 mail.localhost before" {
		t.Fatalf("before the ban: %q", got)
	}

	// the relay's two 535s, through a guard with the config's options
	g, err := AuthGuard{MaxFailures: 2}.build()
	if err != nil {
		t.Fatal(err)
	}
	bans := testutil.ToFloat64(metrics.authBans)
	bannedAddr(t, g, ip.String())
	if got := testutil.ToFloat64(metrics.authBans) - bans; got != 1 {
		t.Errorf("caddy_layer4_smtp_auth_bans_total went up by %v, want 1", got)
	}
	banned := "421 4.7.0 mail.localhost Too many failed logins, try again later"
	if got := greeted("127.0.0.77"); got != banned {
		t.Fatalf("banned, before the reload: %q", got)
	}

	load("after")
	if got := greeted("127.0.0.78"); got != "220 mail.localhost after" {
		t.Fatalf("the new config does not serve: %q", got)
	}
	if got := greeted("127.0.0.77"); got != banned {
		t.Fatalf("banned, after the reload: %q", got)
	}
}
