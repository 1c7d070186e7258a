package l4smtp

import (
	"cmp"
	"hash/fnv"
	"net/netip"
	"slices"
)

// LoadBalancing says how the edge picks the upstream for a session. The
// upstream it picks is tried first; if it cannot be used (no connection,
// no greeting, or a greeting other than 2xx), the others follow in the
// policy's order, within the backend timeout, as long as the client has not
// been answered.
type LoadBalancing struct {
	// The selection policy:
	//   - "first": the upstreams in their configured order; the first
	//     healthy one takes every session (failover, not balancing);
	//   - "round_robin": in turn, in proportion to the upstreams' weights
	//     (smooth weighted round robin, as nginx does: an upstream of weight
	//     3 beside one of weight 1 gets 3 of every 4 sessions, interleaved);
	//   - "least_conn": the upstream with the fewest sessions open through
	//     this edge process, ties broken at random;
	//   - "random": at random, each upstream with a probability in
	//     proportion to its weight;
	//   - "ip_hash": by the client's real address (the one a proxy_protocol
	//     handler in front has read, if any), so that a client keeps its
	//     upstream; rendezvous hashing, so that an upstream that goes down
	//     moves only its own clients.
	//
	// Weights are honoured by round_robin and random; first, least_conn and
	// ip_hash ignore them. Default: "first".
	Policy string `json:"policy,omitempty"`
}

// The selection policies.
const (
	policyFirst      = "first"
	policyRoundRobin = "round_robin"
	policyLeastConn  = "least_conn"
	policyRandom     = "random"
	policyIPHash     = "ip_hash"
)

func validPolicy(p string) bool {
	switch p {
	case policyFirst, policyRoundRobin, policyLeastConn, policyRandom, policyIPHash:
		return true
	}
	return false
}

// order returns the upstreams a session tries, in turn: the healthy ones in
// the policy's order, or, when none is healthy, all of them (a health check
// can be wrong, and a client refused for nothing is worse than one more dial
// that fails).
func (p *upstreamPool) order(client netip.Addr) []*upstream {
	now := p.now()
	cands := make([]*upstream, 0, len(p.upstreams))
	for _, u := range p.upstreams {
		if p.healthy(u, now) {
			cands = append(cands, u)
		}
	}
	if len(cands) == 0 {
		cands = append(cands, p.upstreams...)
	}
	if len(cands) == 1 {
		return cands
	}
	switch p.policy {
	case policyRoundRobin:
		return rotate(cands, p.nextRoundRobin(cands))
	case policyRandom:
		return rotate(cands, weightedPick(cands, p.rand))
	case policyLeastConn:
		// ties at random: sessions that do not overlap would all go to
		// the first upstream otherwise
		start := p.rand(len(cands))
		cands = rotate(cands, start)
		slices.SortStableFunc(cands, func(a, b *upstream) int {
			return cmp.Compare(a.state.active.Load(), b.state.active.Load())
		})
		return cands
	case policyIPHash:
		scores := make(map[*upstream]uint64, len(cands))
		for _, u := range cands {
			scores[u] = rendezvous(client, u.addr.address)
		}
		slices.SortStableFunc(cands, func(a, b *upstream) int {
			return cmp.Compare(scores[b], scores[a])
		})
		return cands
	}
	return cands // first
}

// nextRoundRobin is smooth weighted round robin over the candidates: each
// turn adds every candidate's weight to its credit, the one with the most
// credit wins and pays the sum of the weights. It returns the winner's
// index in cands.
func (p *upstreamPool) nextRoundRobin(cands []*upstream) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	total, best := 0, -1
	for i, u := range cands {
		u.credit += u.weight
		total += u.weight
		if best < 0 || u.credit > cands[best].credit {
			best = i
		}
	}
	cands[best].credit -= total
	return best
}

// weightedPick picks an index of cands with a probability in proportion to
// its weight; rnd(n) returns a number in [0, n).
func weightedPick(cands []*upstream, rnd func(int) int) int {
	total := 0
	for _, u := range cands {
		total += u.weight
	}
	n := rnd(total)
	for i, u := range cands {
		if n < u.weight {
			return i
		}
		n -= u.weight
	}
	return len(cands) - 1
}

// rotate returns cands starting at index i, the others after it in their
// order, wrapping around.
func rotate(cands []*upstream, i int) []*upstream {
	out := make([]*upstream, 0, len(cands))
	out = append(out, cands[i:]...)
	return append(out, cands[:i]...)
}

// rendezvous is the client's score for an upstream: the upstream with the
// highest score is the client's, and removing another upstream changes
// nothing for it.
func rendezvous(client netip.Addr, upstream string) uint64 {
	h := fnv.New64a()
	b := client.As16()
	_, _ = h.Write(b[:])
	_, _ = h.Write([]byte(upstream))
	// FNV's last bytes spread poorly over the high bits: mix them
	x := h.Sum64()
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return x
}
