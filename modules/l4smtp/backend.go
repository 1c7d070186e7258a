package l4smtp

import (
	"errors"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
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

// setupBackends checks the backend options (the short form, backends, or
// the long one, upstreams with load_balancing and health_checks) and the
// PROXY protocol version, and builds the pool.
func (h *Handler) setupBackends() error {
	repl := caddy.NewReplacer()
	long := len(h.Upstreams) > 0 || h.LoadBalancing != nil || h.HealthChecks != nil
	if len(h.Backends) > 0 && long {
		return errors.New("smtp: backends is the short form of upstreams; write upstreams (with load_balancing and health_checks) or backends, not both")
	}
	if long && len(h.Upstreams) == 0 {
		return errors.New("smtp: load_balancing and health_checks need upstreams")
	}
	cfg := poolConfig{timeout: h.timeout.backend}
	seen := make(map[backendAddr]bool)
	add := func(raw string, weight int) error {
		addr, err := parseBackend(repl.ReplaceKnown(raw, ""))
		if err != nil {
			return fmt.Errorf("smtp: backend %q: %w", raw, err)
		}
		if seen[addr] {
			return fmt.Errorf("smtp: backend %q named twice", raw)
		}
		seen[addr] = true
		cfg.addrs = append(cfg.addrs, addr)
		cfg.weights = append(cfg.weights, weight)
		return nil
	}
	for _, raw := range h.Backends {
		if err := add(raw, 1); err != nil {
			return err
		}
	}
	for i, u := range h.Upstreams {
		if u == nil || len(u.Dial) != 1 {
			return fmt.Errorf("smtp: upstream %d: dial needs exactly one address (write one upstream per mail server)", i)
		}
		if u.Weight < 0 {
			return fmt.Errorf("smtp: upstream %q: weight must not be negative, got %d", u.Dial[0], u.Weight)
		}
		if err := add(u.Dial[0], u.Weight); err != nil {
			return err
		}
	}
	if lb := h.LoadBalancing; lb != nil && lb.Policy != "" {
		if !validPolicy(lb.Policy) {
			return fmt.Errorf("smtp: load_balancing: policy must be first, round_robin, least_conn, random or ip_hash, got %q", lb.Policy)
		}
		cfg.policy = lb.Policy
	}
	if hc := h.HealthChecks; hc != nil {
		if hc.Active != nil {
			active, err := hc.Active.build(h.hostname)
			if err != nil {
				return err
			}
			cfg.active = active
		}
		if hc.Passive != nil {
			if hc.Passive.FailDuration < 0 {
				return fmt.Errorf("smtp: health_checks: passive fail_duration must not be negative, got %s", time.Duration(hc.Passive.FailDuration))
			}
			cfg.failDuration = durationOr(hc.Passive.FailDuration, defaultFailDuration)
		}
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
	if h.proxyProtocol != 0 && len(cfg.addrs) == 0 {
		return errors.New("smtp: proxy_protocol applies to the backend option; with a proxy handler after smtp, set proxy_protocol there")
	}
	cfg.proxyProtocol = h.proxyProtocol
	if h.pool != nil {
		h.pool.close() // a handler set up twice (tests)
	}
	h.pool = nil
	if len(cfg.addrs) > 0 {
		h.pool = newUpstreamPool(cfg)
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
