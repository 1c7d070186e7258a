package l4smtp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// The backend: with the backend option the handler dials the mail server
// itself once TLS is up and relays the session with its own copy loop
// (pump.go), instead of handing it to the next handler. Compared with
// caddy-l4's proxy it bounds the dial by the backend timeout (proxy dials
// with no timeout), tries the addresses in turn (proxy dials every address
// of an upstream for each session and relays to all of them), and holds no
// copy buffers while the session is idle.

// backendAddr is one address of the backend option, parsed.
type backendAddr struct {
	network string // tcp, tcp4, tcp6 or unix
	address string // host:port, or the socket path
}

// setupBackends checks the backend addresses and the PROXY protocol
// version.
func (h *Handler) setupBackends() error {
	repl := caddy.NewReplacer()
	h.backends = nil
	for _, raw := range h.Backends {
		addr, err := parseBackend(repl.ReplaceKnown(raw, ""))
		if err != nil {
			return fmt.Errorf("smtp: backend %q: %w", raw, err)
		}
		h.backends = append(h.backends, addr)
	}
	switch h.ProxyProtocol {
	case "":
		h.proxyProtocol = 0
	case "v1":
		h.proxyProtocol = 1
	case "v2":
		h.proxyProtocol = 2
	default:
		return fmt.Errorf("smtp: proxy_protocol must be v1 or v2, got %q", h.ProxyProtocol)
	}
	if h.proxyProtocol != 0 && len(h.backends) == 0 {
		return errors.New("smtp: proxy_protocol applies to the backend option; with a proxy handler after smtp, set proxy_protocol there")
	}
	return nil
}

func parseBackend(s string) (backendAddr, error) {
	na, err := caddy.ParseNetworkAddress(s)
	if err != nil {
		return backendAddr{}, err
	}
	switch na.Network {
	case "tcp", "tcp4", "tcp6":
		if na.Host == "" {
			return backendAddr{}, errors.New("needs a host, e.g. 127.0.0.1:10025")
		}
		if na.PortRangeSize() != 1 || na.StartPort == 0 {
			return backendAddr{}, errors.New("needs exactly one port, e.g. 127.0.0.1:10025")
		}
	case "unix":
	default:
		return backendAddr{}, fmt.Errorf("network %s cannot carry SMTP; use tcp (the default) or unix", na.Network)
	}
	return backendAddr{network: na.Network, address: na.JoinHostPort(0)}, nil
}

// dialBackend connects to the first backend address that answers, within
// the backend timeout counted from start, and sends the PROXY protocol
// header if one is configured. Each address gets an equal share of the time
// left, so that one that drops packets (rather than refusing) does not use
// up the time of the addresses after it.
func (h *Handler) dialBackend(sess *session, start time.Time) (net.Conn, error) {
	deadline := start.Add(h.timeout.backend)
	var dialer net.Dialer
	var errs []error
	for i, addr := range h.backends {
		left := len(h.backends) - i
		share := time.Until(deadline) / time.Duration(left)
		up, err := h.dialOne(&dialer, sess, addr, time.Now().Add(share))
		if err == nil {
			sess.backend = addr.address
			return up, nil
		}
		metrics.backendFailures.WithLabelValues(addr.address).Inc()
		errs = append(errs, err)
		if left > 1 && time.Now().Before(deadline) {
			sess.log().Warn("mail server unreachable; trying the next backend",
				zap.String("backend", addr.address),
				zap.Error(err))
		}
	}
	return nil, fmt.Errorf("dialing the backend: %w", errors.Join(errs...))
}

// dialOne dials one backend address and sends the PROXY header, by the
// deadline.
func (h *Handler) dialOne(dialer *net.Dialer, sess *session, addr backendAddr, deadline time.Time) (net.Conn, error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	up, err := dialer.DialContext(ctx, addr.network, addr.address)
	metrics.backendDial.WithLabelValues(addr.address).Observe(time.Since(start).Seconds())
	if err != nil {
		return nil, err
	}
	if h.proxyProtocol != 0 {
		if err := h.writeProxyHeader(sess, up, deadline); err != nil {
			_ = up.Close()
			return nil, err
		}
	}
	return up, nil
}
