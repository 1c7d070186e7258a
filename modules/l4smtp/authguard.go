package l4smtp

import (
	"errors"
	"fmt"
	"hash/maphash"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"github.com/prometheus/client_golang/prometheus"
)

// The AUTH guard: password guessing is slowed and then banned.
//
// The relay tells the guard of each AUTH exchange the backend answered: a
// 535 is a failure, which delays the 535 on its way to the client (more
// with every failure, as Dovecot's auth penalty does) and, after
// max_failures within the window, bans the client's address; a 235 is a
// success, which clears the address's count. A banned address is turned away
// at connect with 421 4.7.0, before any TLS work.
//
// Failures are counted per client address (the real one, which a
// proxy_protocol handler in front of smtp read) and per account (the user
// name of AUTH PLAIN or LOGIN). An account's failures add delay but never
// ban anything, so that nobody can lock another user out. An IPv6 client is
// counted by its /64: one host commonly holds a whole /64 and could
// otherwise guess from a fresh address every time.
//
// The counts are kept per process, in tables shared by every smtp handler
// and kept across config reloads (Caddy provisions new handlers on each
// reload; a ban must not end with it). Each table holds at most max_entries
// entries: when it is full, an entry makes room by evicting the least
// useful one (an expired ban, else the address that failed least recently,
// else the oldest ban), so that memory stays bounded whatever the number of
// addresses, and a flood of new addresses evicts counts before bans.

// AuthGuard slows down and bans password guessers: failed AUTH exchanges
// (the backend's 535) counted per client address and per account.
type AuthGuard struct {
	// Turn the guard off: no delays, no bans (for a backend that does
	// both itself, for the real client's address). Default: false, the
	// guard is on.
	Disabled bool `json:"disabled,omitempty"`

	// How many failed AUTH exchanges from one client address (an IPv6
	// client: its /64) within the window ban it. Enough for a user who
	// mistypes a password a few times, or a phone that retries an old
	// one, far too few to guess one. Default: 10.
	MaxFailures int `json:"max_failures,omitempty"`

	// The time within which max_failures ban an address, counted from the
	// address's first failure; after it the count starts again. Also how
	// long an account's failures keep adding delay. Default: 15m.
	Window caddy.Duration `json:"window,omitempty"`

	// How long a banned address is turned away at connect with "421 4.7.0
	// Too many failed logins". A success does not end a ban. Default: 1h.
	Ban caddy.Duration `json:"ban,omitempty"`

	// The delay of the reply to the first failed AUTH of an address or an
	// account; each further failure within the window doubles it, up to
	// max_delay (Dovecot's auth penalty: 2s, 4s, 8s, 15s). A negative
	// value (off in the Caddyfile) turns delays off; bans stay. Default:
	// 2s.
	Delay caddy.Duration `json:"delay,omitempty"`

	// The longest delay of a failed AUTH. Long enough to make guessing
	// slow, shorter than a client's reply timeout. Default: 15s.
	MaxDelay caddy.Duration `json:"max_delay,omitempty"`

	// How many client addresses (and, in a table of its own, accounts)
	// the guard keeps counts for. The tables are one per process: each
	// handler evicts down to its own max_entries when it adds an entry, so
	// give all smtp handlers the same value. An address takes about 80
	// bytes, an account about 70 (measured: see the README), so the
	// default holds at most 15 MiB and a day's guessers of a busy
	// server. Default: 100000.
	MaxEntries int `json:"max_entries,omitempty"`
}

const (
	defaultGuardMaxFailures = 10
	defaultGuardWindow      = 15 * time.Minute
	defaultGuardBan         = time.Hour
	defaultGuardDelay       = 2 * time.Second
	defaultGuardMaxDelay    = 15 * time.Second
	defaultGuardMaxEntries  = 100000
)

// authGuard is a handler's guard: its options, resolved, over the process's
// tables. Its methods are safe on a nil guard (the guard is off).
type authGuard struct {
	maxFailures int
	window, ban time.Duration
	delay       time.Duration // zero: no delays
	maxDelay    time.Duration
	maxEntries  int
	state       *guardState
}

// guardState is what the guard knows: one per process (processGuard),
// another only in tests.
type guardState struct {
	addrs    guardTable[addrKey]
	accounts guardTable[uint64]
	bans     prometheus.Counter
}

// processGuard is shared by all handlers and outlives config reloads.
var processGuard = new(guardState)

func init() {
	// here, not in processGuard's initializer: the metrics read the
	// process's tables
	processGuard.bans = metrics.authBans
}

func newGuardState(bans prometheus.Counter) *guardState { return &guardState{bans: bans} }

// build resolves the options; nil when the guard is off.
func (g AuthGuard) build() (*authGuard, error) {
	if g.Disabled {
		if g != (AuthGuard{Disabled: true}) {
			return nil, errors.New("smtp: auth_guard: disabled goes alone, without other options")
		}
		return nil, nil
	}
	if g.MaxFailures < 0 || g.MaxEntries < 0 {
		return nil, fmt.Errorf("smtp: auth_guard: max_failures and max_entries must not be negative, got %d and %d",
			g.MaxFailures, g.MaxEntries)
	}
	if g.Window < 0 || g.Ban < 0 || g.MaxDelay < 0 {
		return nil, fmt.Errorf("smtp: auth_guard: window, ban and max_delay must not be negative, got %s, %s and %s",
			time.Duration(g.Window), time.Duration(g.Ban), time.Duration(g.MaxDelay))
	}
	ag := &authGuard{
		maxFailures: g.MaxFailures,
		window:      durationOr(g.Window, defaultGuardWindow),
		ban:         durationOr(g.Ban, defaultGuardBan),
		maxDelay:    durationOr(g.MaxDelay, defaultGuardMaxDelay),
		maxEntries:  g.MaxEntries,
		state:       processGuard,
	}
	if ag.maxFailures == 0 {
		ag.maxFailures = defaultGuardMaxFailures
	}
	if ag.maxEntries == 0 {
		ag.maxEntries = defaultGuardMaxEntries
	}
	switch {
	case g.Delay < 0:
		if g.MaxDelay != 0 {
			return nil, errors.New("smtp: auth_guard: max_delay goes with a delay, not with delays off")
		}
		ag.delay, ag.maxDelay = 0, 0
	default:
		ag.delay = durationOr(g.Delay, defaultGuardDelay)
		if g.MaxDelay == 0 && ag.delay > ag.maxDelay {
			ag.maxDelay = ag.delay // only the first delay given: no doubling
		}
		if ag.delay > ag.maxDelay {
			return nil, fmt.Errorf("smtp: auth_guard: delay %s is longer than max_delay %s", ag.delay, ag.maxDelay)
		}
	}
	return ag, nil
}

// banned says whether ip is turned away now.
func (g *authGuard) banned(ip netip.Addr, now time.Time) bool {
	if g == nil || !ip.IsValid() {
		return false
	}
	return g.state.addrs.banned(keyOfAddr(ip), now)
}

// failure counts a failed AUTH of user from ip. It returns how long the
// failure reply must wait before the client gets it, and whether ip is
// banned now (by this failure, or already by another session's), so that
// the relay may end the session after the reply. user may be empty (not
// known); ip may be invalid (no IP address: a unix socket).
func (g *authGuard) failure(ip netip.Addr, user string, now time.Time) (delay time.Duration, banned bool) {
	if g == nil {
		return 0, false
	}
	n := 0
	if ip.IsValid() {
		var newBan bool
		n, banned, newBan = g.state.addrs.fail(keyOfAddr(ip), now, g.window, g.maxFailures, g.ban, g.maxEntries)
		if newBan && g.state.bans != nil {
			g.state.bans.Inc()
		}
	}
	if user != "" {
		// never a ban: nobody may lock another user out
		m, _, _ := g.state.accounts.fail(keyOfAccount(user), now, g.window, 0, 0, g.maxEntries)
		n = max(n, m)
	}
	return g.delayFor(n), banned
}

// success clears ip's failures after a successful AUTH. A ban stays: the
// success may be the guesser's own account, in a session opened before the
// ban.
func (g *authGuard) success(ip netip.Addr, now time.Time) {
	if g == nil || !ip.IsValid() {
		return
	}
	g.state.addrs.clear(keyOfAddr(ip), now)
}

// delayFor is the delay of the nth failure: delay, doubled for each failure
// before it, at most maxDelay.
func (g *authGuard) delayFor(n int) time.Duration {
	if n < 1 || g.delay <= 0 {
		return 0
	}
	d := g.delay
	for i := 1; i < n && d < g.maxDelay; i++ {
		d *= 2
	}
	return min(d, g.maxDelay)
}

// refuseBanned turns away a client whose address is banned, with 421 before
// any TLS work. It says whether it did.
func (h *Handler) refuseBanned(sess *session, cx *layer4.Connection) bool {
	if h.guard == nil || !h.guard.banned(clientAddr(cx), time.Now()) {
		return false
	}
	sess.ended(outcomeAuthBanned, "")
	sess.log().Debug("client address banned for failed logins; turning the client away")
	_ = cx.SetWriteDeadline(time.Now().Add(finalReplyTimeout))
	_, _ = cx.Write(h.replies.authBanned)
	return true
}

// clientAddr is the client's address: the one a PROXY header gave when a
// proxy_protocol handler runs in front of smtp, the connection's otherwise;
// invalid when it is no IP address.
func clientAddr(cx *layer4.Connection) netip.Addr {
	switch a := l4proxyprotocol.GetConn(cx).RemoteAddr().(type) {
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	case nil:
		return netip.Addr{}
	default:
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return netip.Addr{}
		}
		return ap.Addr().Unmap()
	}
}

// addrKey is an IPv4 address, or an IPv6 address's /64, in 16 bytes (IPv4
// in its IPv4-mapped form, so that the two never meet).
type addrKey [16]byte

func keyOfAddr(ip netip.Addr) addrKey {
	ip = ip.Unmap()
	b := ip.As16()
	if ip.Is6() {
		clear(b[8:])
	}
	return addrKey(b)
}

// accountSeed makes account keys unpredictable, so that nobody can pick
// user names that share a count with a victim's.
var accountSeed = maphash.MakeSeed()

// keyOfAccount is a hash of the user name, case folded (mail systems take
// user names in any case): the table keeps no user name, and the entry's
// size does not depend on what a client sent. Two names that share a hash
// share a delay, never more.
func keyOfAccount(user string) uint64 {
	return maphash.String(accountSeed, strings.ToLower(user))
}

// guardTable counts failures by key, with at most a given number of
// entries. Entries are kept in a slice, indexed by the map, and linked in
// two lists, oldest first: the counting entries by their last failure, and
// the banned ones by the start of their ban (their end, since a table's
// bans mostly have one length); eviction takes the first of a list.
type guardTable[K comparable] struct {
	mu      sync.Mutex
	index   map[K]int32
	entries []guardEntry[K]
	lists   [2]guardList // counting, banned
}

const (
	counting = 0
	banning  = 1
)

type guardList struct{ head, tail int32 } // -1 when empty

type guardEntry[K comparable] struct {
	key        K
	prev, next int32
	failures   int32
	list       int8
	first      int64 // unix nanoseconds of the first failure of the window
	banUntil   int64 // unix nanoseconds; zero: not banned
}

func (t *guardTable[K]) init() {
	if t.index == nil {
		t.index = make(map[K]int32)
		t.lists = [2]guardList{{-1, -1}, {-1, -1}}
	}
}

func (t *guardTable[K]) banned(k K, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.index[k]
	return ok && t.entries[i].banUntil > now.UnixNano()
}

// fail counts a failure for k: the failures within the window so far
// (this one included), whether k is banned now, and whether this failure
// banned it. maxFailures zero never bans.
func (t *guardTable[K]) fail(k K, now time.Time, window time.Duration, maxFailures int, ban time.Duration, maxEntries int) (n int, banned, newBan bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init()
	ts := now.UnixNano()
	i, ok := t.index[k]
	if !ok {
		i = t.insert(k, now, maxEntries)
	}
	e := &t.entries[i]
	if e.banUntil != 0 && e.banUntil <= ts {
		// the ban is over: the address starts afresh
		e.banUntil, e.failures = 0, 0
	}
	if e.failures > 0 && ts-e.first >= int64(window) {
		e.failures = 0
	}
	if e.failures == 0 {
		e.first = ts
	}
	if e.failures < 1<<30 {
		e.failures++
	}
	if e.banUntil == 0 && maxFailures > 0 && int(e.failures) >= maxFailures {
		e.banUntil = ts + int64(ban)
		newBan = true
	}
	// the most recent at the end of its list
	t.unlink(i)
	if e.banUntil != 0 {
		t.link(i, banning)
	} else {
		t.link(i, counting)
	}
	return int(e.failures), e.banUntil != 0, newBan
}

// clear forgets k's failures, unless it is banned.
func (t *guardTable[K]) clear(k K, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.index[k]; ok && t.entries[i].banUntil <= now.UnixNano() {
		t.remove(i)
	}
}

// insert adds an entry for k, evicting when the table is full (two at most,
// so that a table shrinks after its max_entries was lowered, a step at a
// time).
func (t *guardTable[K]) insert(k K, now time.Time, maxEntries int) int32 {
	for evicted := 0; len(t.entries) >= maxEntries && evicted < 2; evicted++ {
		t.remove(t.victim(now))
	}
	i := int32(len(t.entries))
	t.entries = append(t.entries, guardEntry[K]{key: k, prev: -1, next: -1, list: counting})
	t.index[k] = i
	t.link(i, counting)
	return i
}

// victim is the least useful entry: an expired ban, else the counting entry
// that failed least recently, else the oldest ban.
func (t *guardTable[K]) victim(now time.Time) int32 {
	if b := t.lists[banning].head; b >= 0 && t.entries[b].banUntil <= now.UnixNano() {
		return b
	}
	if c := t.lists[counting].head; c >= 0 {
		return c
	}
	return t.lists[banning].head
}

// remove deletes entry i, moving the last entry into its place.
func (t *guardTable[K]) remove(i int32) {
	t.unlink(i)
	delete(t.index, t.entries[i].key)
	last := int32(len(t.entries) - 1)
	if i != last {
		t.move(last, i)
	}
	t.entries[last] = guardEntry[K]{}
	t.entries = t.entries[:last]
}

// move puts entry from at index to, which is free, keeping its links.
func (t *guardTable[K]) move(from, to int32) {
	e := t.entries[from]
	t.entries[to] = e
	t.index[e.key] = to
	l := &t.lists[e.list]
	if e.prev >= 0 {
		t.entries[e.prev].next = to
	} else {
		l.head = to
	}
	if e.next >= 0 {
		t.entries[e.next].prev = to
	} else {
		l.tail = to
	}
}

func (t *guardTable[K]) unlink(i int32) {
	e := &t.entries[i]
	l := &t.lists[e.list]
	if e.prev >= 0 {
		t.entries[e.prev].next = e.next
	} else {
		l.head = e.next
	}
	if e.next >= 0 {
		t.entries[e.next].prev = e.prev
	} else {
		l.tail = e.prev
	}
	e.prev, e.next = -1, -1
}

// link appends entry i to a list.
func (t *guardTable[K]) link(i int32, list int8) {
	e := &t.entries[i]
	l := &t.lists[list]
	e.list, e.prev, e.next = list, l.tail, -1
	if l.tail >= 0 {
		t.entries[l.tail].next = i
	} else {
		l.head = i
	}
	l.tail = i
}

// len is the number of entries, for the metrics.
func (t *guardTable[K]) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries)
}

// unmarshalCaddyfile reads the auth_guard option:
//
//	auth_guard off
//	auth_guard {
//		max_failures <n>
//		window       <duration>
//		ban          <duration>
//		delay        <first> <max> | off
//		max_entries  <n>
//	}
func (g *AuthGuard) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		if d.Val() != "off" {
			return d.Errf("smtp option 'auth_guard' takes off or a block, got '%s'", d.Val())
		}
		if d.NextArg() {
			return d.ArgErr()
		}
		if d.NextBlock(d.Nesting()) {
			return d.Err("smtp option 'auth_guard off' takes no block")
		}
		g.Disabled = true
		return nil
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("duplicate auth_guard option '%s'", name)
		}
		seen[name] = true
		switch name {
		case "max_failures", "max_entries":
			n, err := positiveInt(d, "auth_guard "+name)
			if err != nil {
				return err
			}
			if name == "max_failures" {
				g.MaxFailures = n
			} else {
				g.MaxEntries = n
			}
		case "window", "ban":
			dur, err := guardDuration(d, name)
			if err != nil {
				return err
			}
			if d.NextArg() {
				return d.ArgErr()
			}
			if name == "window" {
				g.Window = dur
			} else {
				g.Ban = dur
			}
		case "delay":
			args := d.RemainingArgs()
			if len(args) == 1 && args[0] == "off" {
				g.Delay = -1
				break
			}
			if len(args) != 2 {
				return d.Errf("auth_guard option 'delay' takes the first delay and the longest, e.g. 'delay 2s 15s', or off")
			}
			var ds [2]caddy.Duration
			for i, a := range args {
				dur, err := caddy.ParseDuration(a)
				if err != nil || dur <= 0 {
					return d.Errf("auth_guard option 'delay' takes positive durations, got '%s'", a)
				}
				ds[i] = caddy.Duration(dur)
			}
			if ds[0] > ds[1] {
				return d.Errf("auth_guard option 'delay': the first delay %s is longer than the longest %s", args[0], args[1])
			}
			g.Delay, g.MaxDelay = ds[0], ds[1]
		default:
			return d.Errf("unknown auth_guard option '%s' (want max_failures, window, ban, delay or max_entries)", name)
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("auth_guard option '%s' does not take a block", name)
		}
	}
	if len(seen) == 0 {
		return d.Err("smtp option 'auth_guard' takes off or a block of options")
	}
	return nil
}

// guardDuration reads the one positive duration of an auth_guard option.
func guardDuration(d *caddyfile.Dispenser, name string) (caddy.Duration, error) {
	if !d.NextArg() {
		return 0, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil || dur <= 0 {
		return 0, d.Errf("auth_guard option '%s' takes a positive duration, got '%s'", name, d.Val())
	}
	return caddy.Duration(dur), nil
}
