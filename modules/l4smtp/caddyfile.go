package l4smtp

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

// UnmarshalCaddyfile sets up the Handler from Caddyfile tokens. Syntax:
//
//	smtp <hostname> [<hostname>...] {
//		backend <address> [<address>...]
//		backend {
//			to <address> [weight <n>]
//			lb_policy first|round_robin|least_conn|random|ip_hash
//			health_interval <duration>
//			health_timeout  <duration>
//			health_rise     <n>
//			health_fall     <n>
//			fail_duration   <duration>
//		}
//		proxy_protocol v1|v2
//		xclient
//		sni <hostname>... {
//			backend ...
//			proxy_protocol v1|v2
//			xclient
//		}
//		require_auth on|off
//		bare_line_ends normalize|pass
//		implicit_tls
//		greeting <text>
//		connection_policy {
//			...
//		}
//		timeouts {
//			command   <duration>
//			handshake <duration>
//			backend   <duration>
//			idle      <duration>
//			pregreet  <duration>
//			shutdown  <duration>
//		}
//		max_errors <n>
//		max_connections <n>
//		max_connections_per_ip <n>
//		early_talker reject|off
//		detect_tls <duration>|off
//		auth_guard off | {
//			max_failures <n>
//			window       <duration>
//			ban          <duration>
//			delay        <first> <max> | off
//			max_entries  <n>
//		}
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name

	h.Hostnames = d.RemainingArgs()
	if len(h.Hostnames) == 0 {
		return d.Err("smtp needs at least one hostname, e.g. 'smtp mail.example.com'")
	}

	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] && option != "connection_policy" && option != "sni" {
			return d.Errf("duplicate smtp option '%s'", option)
		}
		seen[option] = true

		switch option {
		case "implicit_tls":
			if d.NextArg() {
				return d.Errf("smtp option 'implicit_tls' takes no arguments")
			}
			h.ImplicitTLS = true

		case "backend", "proxy_protocol", "xclient":
			if err := h.BackendOptions.unmarshalOption(d, option); err != nil {
				return err
			}
			continue

		case "sni":
			r := &SNIRoute{SNI: d.RemainingArgs()}
			if len(r.SNI) == 0 {
				return d.Err("smtp option 'sni' needs the hostnames it applies to, e.g. 'sni mail.b.example { backend 127.0.0.1:10026 }'")
			}
			if err := r.unmarshalCaddyfile(d); err != nil {
				return err
			}
			h.SNIRoutes = append(h.SNIRoutes, r)
			continue

		case "require_auth":
			v, err := oneOf(d, option, "on", "off")
			if err != nil {
				return err
			}
			on := v == "on"
			h.RequireAuth = &on

		case "bare_line_ends":
			v, err := oneOf(d, option, "normalize", "pass")
			if err != nil {
				return err
			}
			h.BareLineEnds = v

		case "greeting":
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Greeting = d.Val()
			if d.NextArg() {
				return d.Errf("smtp option 'greeting' takes one argument; quote text that has spaces")
			}

		case "connection_policy":
			cp := new(caddytls.ConnectionPolicy)
			if err := cp.UnmarshalCaddyfile(d.NewFromNextSegment()); err != nil {
				return err
			}
			h.ConnectionPolicies = append(h.ConnectionPolicies, cp)
			continue // the segment, block included, is consumed

		case "timeouts":
			if d.NextArg() {
				return d.Errf("smtp option 'timeouts' takes a block, not arguments")
			}
			if err := h.Timeouts.unmarshalCaddyfile(d); err != nil {
				return err
			}
			continue

		case "max_errors", "max_connections", "max_connections_per_ip":
			n, err := positiveInt(d, option)
			if err != nil {
				return err
			}
			switch option {
			case "max_errors":
				h.MaxErrors = n
			case "max_connections":
				h.MaxConnections = n
			default:
				h.MaxConnectionsPerIP = n
			}

		case "early_talker":
			v, err := oneOf(d, option, "reject", "off")
			if err != nil {
				return err
			}
			h.EarlyTalker = v

		case "detect_tls":
			if !d.NextArg() {
				return d.ArgErr()
			}
			if d.Val() == "off" {
				h.DetectTLS = -1
			} else {
				dur, err := caddy.ParseDuration(d.Val())
				if err != nil || dur <= 0 {
					return d.Errf("smtp option 'detect_tls' takes a positive duration or off, got '%s'", d.Val())
				}
				h.DetectTLS = caddy.Duration(dur)
			}
			if d.NextArg() {
				return d.ArgErr()
			}

		case "auth_guard":
			if err := h.AuthGuard.unmarshalCaddyfile(d); err != nil {
				return err
			}
			continue

		default:
			return d.Errf("unknown smtp option '%s'", option)
		}

		if d.NextBlock(nesting + 1) {
			return d.Errf("smtp option '%s' does not take a block", option)
		}
	}
	if err := h.BackendOptions.checkCaddyfile(d, "smtp"); err != nil {
		return err
	}
	routed := make(map[string]bool)
	for _, r := range h.SNIRoutes {
		for _, name := range r.SNI {
			name = strings.ToLower(strings.TrimSuffix(name, "."))
			if !slices.ContainsFunc(h.Hostnames, func(host string) bool { return strings.EqualFold(strings.TrimSuffix(host, "."), name) }) {
				return d.Errf("smtp option 'sni %s': not one of the hostnames %v (a route applies to names the edge has a certificate for)", name, h.Hostnames)
			}
			if routed[name] {
				return d.Errf("smtp option 'sni': %s is in two sni blocks", name)
			}
			routed[name] = true
		}
	}
	if h.EarlyTalker == "reject" && h.DetectTLS > 0 {
		if err := detectWithinPregreet(time.Duration(h.DetectTLS), durationOr(h.Timeouts.Pregreet, defaultPregreet)); err != nil {
			return d.Errf("smtp option %v", err)
		}
	}
	return nil
}

// unmarshalOption reads one of the backend options: backend (the short
// form on its line, or the long form in its block), proxy_protocol,
// xclient. Its name is the current token.
func (o *BackendOptions) unmarshalOption(d *caddyfile.Dispenser, option string) error {
	nesting := d.Nesting()
	switch option {
	case "backend":
		o.Backends = d.RemainingArgs()
		if len(o.Backends) == 0 {
			return o.unmarshalUpstreams(d)
		}
		if d.NextBlock(nesting) {
			return d.Errf("smtp option 'backend' takes its addresses on its line (the short form) or as 'to' lines in its block, not both")
		}
		return nil

	case "proxy_protocol":
		v, err := oneOf(d, option, "v1", "v2")
		if err != nil {
			return err
		}
		o.ProxyProtocol = v

	case "xclient":
		if d.NextArg() {
			return d.Errf("smtp option 'xclient' takes no arguments")
		}
		o.XClient = true
	}
	if d.NextBlock(nesting) {
		return d.Errf("smtp option '%s' does not take a block", option)
	}
	return nil
}

// checkCaddyfile checks the backend options of a block (where: smtp, or
// sni) once it is read.
func (o *BackendOptions) checkCaddyfile(d *caddyfile.Dispenser, where string) error {
	if o.ProxyProtocol != "" && len(o.Backends) == 0 && len(o.Upstreams) == 0 {
		if where == "smtp" {
			return d.Err("smtp option 'proxy_protocol' goes with 'backend'; with a proxy handler after smtp, set proxy_protocol in the proxy")
		}
		return d.Errf("%s option 'proxy_protocol' goes with 'backend'", where)
	}
	if o.XClient && o.ProxyProtocol != "" {
		return d.Errf("%s options 'xclient' and 'proxy_protocol' both tell the backend who the client is; use one of them", where)
	}
	return nil
}

// unmarshalCaddyfile reads the block of an sni option: its names are read.
//
//	sni <hostname>... {
//		backend <address>... | { ... }
//		proxy_protocol v1|v2
//		xclient
//	}
func (r *SNIRoute) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] {
			return d.Errf("duplicate sni option '%s'", option)
		}
		seen[option] = true
		switch option {
		case "backend", "proxy_protocol", "xclient":
			if err := r.BackendOptions.unmarshalOption(d, option); err != nil {
				return err
			}
		default:
			return d.Errf("unknown sni option '%s' (want backend, proxy_protocol or xclient)", option)
		}
	}
	if len(r.Backends) == 0 && len(r.Upstreams) == 0 {
		return d.Errf("smtp option 'sni %s' needs a backend", strings.Join(r.SNI, " "))
	}
	return r.BackendOptions.checkCaddyfile(d, "sni")
}

// unmarshalUpstreams reads the block of the backend option, the long form:
// its first token is already read.
func (o *BackendOptions) unmarshalUpstreams(d *caddyfile.Dispenser) error {
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] && option != "to" {
			return d.Errf("duplicate backend option '%s'", option)
		}
		seen[option] = true
		switch option {
		case "to":
			u := &Upstream{}
			if !d.NextArg() {
				return d.Errf("backend option 'to' needs an address, e.g. 'to 127.0.0.1:10025'")
			}
			u.Dial = []string{d.Val()}
			for _, up := range o.Upstreams {
				if up.Dial[0] == d.Val() {
					return d.Errf("backend address '%s' named twice", d.Val())
				}
			}
			if d.NextArg() {
				if d.Val() != "weight" {
					return d.Errf("backend option 'to' takes one address and optionally 'weight <n>', got '%s'; write one 'to' line per address", d.Val())
				}
				n, err := positiveInt(d, "weight")
				if err != nil {
					return err
				}
				u.Weight = n
			}
			o.Upstreams = append(o.Upstreams, u)
		case "lb_policy":
			if !d.NextArg() {
				return d.ArgErr()
			}
			if !validPolicy(d.Val()) {
				return d.Errf("backend option 'lb_policy' takes first, round_robin, least_conn, random or ip_hash, got '%s'", d.Val())
			}
			o.loadBalancing().Policy = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		case "health_interval", "health_timeout", "fail_duration":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil || dur <= 0 {
				return d.Errf("backend option '%s' takes a positive duration, got '%s'", option, d.Val())
			}
			switch option {
			case "health_interval":
				o.activeChecks().Interval = caddy.Duration(dur)
			case "health_timeout":
				o.activeChecks().Timeout = caddy.Duration(dur)
			default:
				o.healthChecks().Passive = &PassiveHealthChecks{FailDuration: caddy.Duration(dur)}
			}
			if d.NextArg() {
				return d.ArgErr()
			}
		case "health_rise", "health_fall":
			n, err := positiveInt(d, option)
			if err != nil {
				return err
			}
			if option == "health_rise" {
				o.activeChecks().Rise = n
			} else {
				o.activeChecks().Fall = n
			}
		default:
			return d.Errf("unknown backend option '%s' (want to, lb_policy, health_interval, health_timeout, health_rise, health_fall or fail_duration)", option)
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("backend option '%s' does not take a block", option)
		}
	}
	if len(o.Upstreams) == 0 {
		return d.Err("smtp option 'backend' needs at least one address, e.g. 'backend 127.0.0.1:10025', or a block with 'to <address>' lines")
	}
	return nil
}

func (o *BackendOptions) loadBalancing() *LoadBalancing {
	if o.LoadBalancing == nil {
		o.LoadBalancing = new(LoadBalancing)
	}
	return o.LoadBalancing
}

func (o *BackendOptions) healthChecks() *HealthChecks {
	if o.HealthChecks == nil {
		o.HealthChecks = new(HealthChecks)
	}
	return o.HealthChecks
}

func (o *BackendOptions) activeChecks() *ActiveHealthChecks {
	hc := o.healthChecks()
	if hc.Active == nil {
		hc.Active = new(ActiveHealthChecks)
	}
	return hc.Active
}

// oneOf reads the one argument of an option that takes one of choices.
func oneOf(d *caddyfile.Dispenser, option string, choices ...string) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if !slices.Contains(choices, v) {
		return "", d.Errf("smtp option '%s' takes %s, got '%s'", option, strings.Join(choices, " or "), v)
	}
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// positiveInt reads the one argument of an option that takes a whole number
// of at least 1.
func positiveInt(d *caddyfile.Dispenser, option string) (int, error) {
	if !d.NextArg() {
		return 0, d.ArgErr()
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n < 1 {
		return 0, d.Errf("smtp option '%s' needs a whole number of at least 1, got '%s'", option, d.Val())
	}
	if d.NextArg() {
		return 0, d.ArgErr()
	}
	return n, nil
}

func (t *Timeouts) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		var field *caddy.Duration
		switch name {
		case "command":
			field = &t.Command
		case "handshake":
			field = &t.Handshake
		case "backend":
			field = &t.Backend
		case "idle":
			field = &t.Idle
		case "pregreet":
			field = &t.Pregreet
		case "shutdown":
			field = &t.Shutdown
		default:
			return d.Errf("unknown smtp timeout '%s' (want command, handshake, backend, idle, pregreet or shutdown)", name)
		}
		if seen[name] {
			return d.Errf("duplicate smtp timeout '%s'", name)
		}
		seen[name] = true
		if !d.NextArg() {
			return d.ArgErr()
		}
		dur, err := caddy.ParseDuration(d.Val())
		if err != nil {
			return d.Errf("smtp timeout '%s': bad duration '%s': %v", name, d.Val(), err)
		}
		if dur <= 0 {
			return d.Errf("smtp timeout '%s' must be positive, got '%s'", name, d.Val())
		}
		*field = caddy.Duration(dur)
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
