package l4smtp

import (
	"errors"
	"fmt"
	"strings"
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

// BackendOptions say where a session goes after TLS (the edge's own relay
// to backends or upstreams, or the next handler) and how the backend learns
// who the client is.
type BackendOptions struct {
	// The mail server to relay the session to after TLS: one or more
	// addresses, host:port or unix/<socket path>, tried in turn until one
	// is dialled and greets with 2xx, within the backend timeout; the
	// short form of upstreams, with the policy "first" and no health
	// checks. With backends (or upstreams), the handler relays the session
	// itself and is the last handler of its route; without, it hands the
	// session to the next handler (caddy-l4's proxy). The handler's own
	// relay holds less memory per idle session, bounds the dial by the
	// backend timeout and checks its upstreams in SMTP. Not with upstreams.
	// Default: none.
	Backends []string `json:"backends,omitempty"`

	// The long form of backends: the mail servers, each with a weight,
	// picked by load_balancing and watched by health_checks, in the shape
	// of caddy-l4's proxy. Not with backends. Default: none.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// How a session's upstream is picked. Only with upstreams. Default:
	// the policy "first", the upstreams in their order.
	LoadBalancing *LoadBalancing `json:"load_balancing,omitempty"`

	// How the upstreams are checked. Only with upstreams. Default: none,
	// every upstream is tried by every session that needs it.
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// Send a PROXY protocol header, v1 or v2, to the backend before the
	// session, with the client's address (or the one a proxy_protocol
	// handler in front of this one has read). A v2 header also carries
	// TLVs as HAProxy writes them: PP2_TYPE_SSL (the client used TLS, its
	// version and cipher suite by OpenSSL's names, and whether it sent a
	// client certificate and crypto/tls verified it), PP2_TYPE_AUTHORITY
	// (the SNI the client sent, if any) and PP2_TYPE_UNIQUE_ID (the
	// session id of the access log). Dovecot reads the SSL TLV and treats
	// the connection as secured; Postfix and Exim read the addresses only.
	// Only with backends. Default: none.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// Tell the backend who the client is with Postfix's XCLIENT command,
	// inside the session after TLS: the edge sends its own EHLO and then
	// XCLIENT with the client's address and port and the address it
	// connected to (as far as the backend offers those attributes), and
	// relays the client only once the backend has taken it. The backend
	// must allow the edge to use XCLIENT (Postfix:
	// smtpd_authorized_xclient_hosts); one that does not gets the client a
	// 421 and the operator an Error. Not with proxy_protocol: send one or the
	// other. Default: false.
	XClient bool `json:"xclient,omitempty"`
}

// backendRoute is BackendOptions set up: where a session goes after TLS.
type backendRoute struct {
	pool    *upstreamPool // nil: the next handler
	xclient bool
}

// SNIRoute sends the clients that ask for some of the handler's hostnames by
// SNI to backends of their own (multi-tenant: one edge, a mail server per
// customer domain).
type SNIRoute struct {
	// The hostnames this route applies to, each one of the handler's
	// hostnames. Required.
	SNI []string `json:"sni,omitempty"`

	// Where these clients go, and how their backend learns who the client
	// is, as the handler's own options say for the others; backends or
	// upstreams are required.
	BackendOptions
}

// setupBackends sets up the handler's backend options and its routes by
// SNI. names are the handler's hostnames, cleaned up.
func (h *Handler) setupBackends(names []string) error {
	if h.route != nil {
		h.route.close() // a handler set up twice (tests)
	}
	for _, r := range h.sniRoutes {
		r.close()
	}
	h.routes, h.sniRoutes = nil, nil
	route, err := h.BackendOptions.setup(h.hostname, h.timeout.backend)
	if err != nil {
		return fmt.Errorf("smtp: %w", err)
	}
	h.route = route
	if len(h.SNIRoutes) == 0 {
		return nil
	}
	hostnames := make(map[string]bool, len(names))
	for _, n := range names {
		hostnames[n] = true
	}
	h.routes = make(map[string]*backendRoute)
	ok := false
	defer func() {
		if !ok { // release what was set up: Cleanup does not follow a failed Provision
			h.route.close()
			for _, r := range h.sniRoutes {
				r.close()
			}
		}
	}()
	for i, r := range h.SNIRoutes {
		if r == nil || len(r.SNI) == 0 {
			return fmt.Errorf("smtp: sni_routes %d: needs at least one hostname in sni", i)
		}
		if len(r.Backends) == 0 && len(r.Upstreams) == 0 {
			return fmt.Errorf("smtp: sni_routes %v: needs backends or upstreams", r.SNI)
		}
		route, err := r.BackendOptions.setup(h.hostname, h.timeout.backend)
		if err != nil {
			return fmt.Errorf("smtp: sni_routes %v: %w", r.SNI, err)
		}
		h.sniRoutes = append(h.sniRoutes, route)
		for _, raw := range r.SNI {
			name := strings.ToLower(strings.TrimSuffix(raw, "."))
			switch {
			case !hostnames[name]:
				return fmt.Errorf("smtp: sni_routes: %q is not one of the handler's hostnames %v (a route applies to names the edge has a certificate for)", raw, names)
			case h.routes[name] != nil:
				return fmt.Errorf("smtp: sni_routes: %q is in two routes", raw)
			}
			h.routes[name] = route
		}
	}
	ok = true
	return nil
}

// routeFor is where the session goes after TLS: the route of the name the
// client asked for by SNI, or the handler's own.
func (h *Handler) routeFor(sess *session) *backendRoute {
	if sess.tls != nil && len(h.routes) > 0 {
		if r := h.routes[strings.ToLower(sess.tls.ServerName)]; r != nil {
			return r
		}
	}
	return h.route
}

// setup checks the backend options (the short form, backends, or the long
// one, upstreams with load_balancing and health_checks), the PROXY protocol
// version and xclient, and builds the route. hostname names the edge in
// its health checks.
func (o *BackendOptions) setup(hostname string, timeout time.Duration) (*backendRoute, error) {
	repl := caddy.NewReplacer()
	long := len(o.Upstreams) > 0 || o.LoadBalancing != nil || o.HealthChecks != nil
	if len(o.Backends) > 0 && long {
		return nil, errors.New("backends is the short form of upstreams; write upstreams (with load_balancing and health_checks) or backends, not both")
	}
	if long && len(o.Upstreams) == 0 {
		return nil, errors.New("load_balancing and health_checks need upstreams")
	}
	cfg := poolConfig{timeout: timeout}
	seen := make(map[backendAddr]bool)
	add := func(raw string, weight int) error {
		addr, err := parseBackend(repl.ReplaceKnown(raw, ""))
		if err != nil {
			return fmt.Errorf("backend %q: %w", raw, err)
		}
		if seen[addr] {
			return fmt.Errorf("backend %q named twice", raw)
		}
		seen[addr] = true
		cfg.addrs = append(cfg.addrs, addr)
		cfg.weights = append(cfg.weights, weight)
		return nil
	}
	for _, raw := range o.Backends {
		if err := add(raw, 1); err != nil {
			return nil, err
		}
	}
	for i, u := range o.Upstreams {
		if u == nil || len(u.Dial) != 1 {
			return nil, fmt.Errorf("upstream %d: dial needs exactly one address (write one upstream per mail server)", i)
		}
		if u.Weight < 0 {
			return nil, fmt.Errorf("upstream %q: weight must not be negative, got %d", u.Dial[0], u.Weight)
		}
		if err := add(u.Dial[0], u.Weight); err != nil {
			return nil, err
		}
	}
	if lb := o.LoadBalancing; lb != nil && lb.Policy != "" {
		if !validPolicy(lb.Policy) {
			return nil, fmt.Errorf("load_balancing: policy must be first, round_robin, least_conn, random or ip_hash, got %q", lb.Policy)
		}
		cfg.policy = lb.Policy
	}
	if hc := o.HealthChecks; hc != nil {
		if hc.Active != nil {
			active, err := hc.Active.build(hostname)
			if err != nil {
				return nil, err
			}
			cfg.active = active
		}
		if hc.Passive != nil {
			if hc.Passive.FailDuration < 0 {
				return nil, fmt.Errorf("health_checks: passive fail_duration must not be negative, got %s", time.Duration(hc.Passive.FailDuration))
			}
			cfg.failDuration = durationOr(hc.Passive.FailDuration, defaultFailDuration)
		}
	}
	switch o.ProxyProtocol {
	case "":
		cfg.proxyProtocol = 0
	case "v1":
		cfg.proxyProtocol = 1
	case "v2":
		cfg.proxyProtocol = 2
	default:
		return nil, fmt.Errorf("proxy_protocol must be v1 or v2, got %q", o.ProxyProtocol)
	}
	if cfg.proxyProtocol != 0 && len(cfg.addrs) == 0 {
		return nil, errors.New("proxy_protocol applies to the backend option; with a proxy handler after smtp, set proxy_protocol there")
	}
	if o.XClient && cfg.proxyProtocol != 0 {
		return nil, errors.New("xclient and proxy_protocol both tell the backend who the client is; use one of them")
	}
	route := &backendRoute{xclient: o.XClient}
	if len(cfg.addrs) > 0 {
		route.pool = newUpstreamPool(cfg)
	}
	return route, nil
}

// start starts the route's health checks.
func (r *backendRoute) start(logger *zap.Logger) {
	if r.pool != nil {
		r.pool.start(logger)
	}
}

// close stops them.
func (r *backendRoute) close() {
	if r.pool != nil {
		r.pool.close()
	}
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
