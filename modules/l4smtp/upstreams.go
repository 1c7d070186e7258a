package l4smtp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"
)

// upstream is one mail server of a pool.
type upstream struct {
	addr backendAddr
}

// upstreamPool is the set of mail servers one handler relays its sessions
// to, and everything it knows of them: a session asks the pool for a
// connection and knows nothing of the choice. The handler holds one pool;
// nothing about the upstreams lives in the handler outside it.
type upstreamPool struct {
	upstreams     []*upstream
	proxyProtocol int           // the PROXY header's version; 0: none
	timeout       time.Duration // the backend timeout: dial and greeting
}

func newUpstreamPool(addrs []backendAddr, proxyProtocol int, timeout time.Duration) *upstreamPool {
	p := &upstreamPool{proxyProtocol: proxyProtocol, timeout: timeout}
	for _, a := range addrs {
		p.upstreams = append(p.upstreams, &upstream{addr: a})
	}
	return p
}

// addrs lists the pool's addresses, in configured order.
func (p *upstreamPool) addrs() []backendAddr {
	out := make([]backendAddr, len(p.upstreams))
	for i, u := range p.upstreams {
		out[i] = u.addr
	}
	return out
}

// dial connects to the first upstream that answers, within the backend
// timeout counted from start, and sends the PROXY protocol header if one is
// configured. Each upstream gets an equal share of the time left, so that
// one that drops packets (rather than refusing) does not use up the time of
// the upstreams after it.
func (p *upstreamPool) dial(sess *session, start time.Time) (net.Conn, error) {
	deadline := start.Add(p.timeout)
	var dialer net.Dialer
	var errs []error
	for i, u := range p.upstreams {
		left := len(p.upstreams) - i
		share := time.Until(deadline) / time.Duration(left)
		up, err := p.dialOne(&dialer, sess, u, time.Now().Add(share))
		if err == nil {
			sess.backend = u.addr.address
			return up, nil
		}
		metrics.backendFailures.WithLabelValues(u.addr.address).Inc()
		errs = append(errs, err)
		if left > 1 && time.Now().Before(deadline) {
			sess.log().Warn("mail server unreachable; trying the next backend",
				zap.String("backend", u.addr.address),
				zap.Error(err))
		}
	}
	return nil, fmt.Errorf("dialing the backend: %w", errors.Join(errs...))
}

// dialOne dials one upstream and sends the PROXY header, by the deadline.
func (p *upstreamPool) dialOne(dialer *net.Dialer, sess *session, u *upstream, deadline time.Time) (net.Conn, error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	up, err := dialer.DialContext(ctx, u.addr.network, u.addr.address)
	metrics.backendDial.WithLabelValues(u.addr.address).Observe(time.Since(start).Seconds())
	if err != nil {
		return nil, err
	}
	if p.proxyProtocol != 0 {
		if err := writeProxyHeader(p.proxyProtocol, sess, up, deadline); err != nil {
			_ = up.Close()
			return nil, err
		}
	}
	return up, nil
}
