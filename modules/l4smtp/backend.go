package l4smtp

import (
	"errors"
	"fmt"

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

// setupBackends checks the backend addresses and the PROXY protocol
// version.
func (h *Handler) setupBackends() error {
	repl := caddy.NewReplacer()
	var addrs []backendAddr
	for _, raw := range h.Backends {
		addr, err := parseBackend(repl.ReplaceKnown(raw, ""))
		if err != nil {
			return fmt.Errorf("smtp: backend %q: %w", raw, err)
		}
		addrs = append(addrs, addr)
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
	if h.proxyProtocol != 0 && len(addrs) == 0 {
		return errors.New("smtp: proxy_protocol applies to the backend option; with a proxy handler after smtp, set proxy_protocol there")
	}
	h.pool = nil
	if len(addrs) > 0 {
		h.pool = newUpstreamPool(addrs, h.proxyProtocol, h.timeout.backend)
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
