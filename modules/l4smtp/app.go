package l4smtp

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/caddyserver/certmagic"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the smtp app. It has no configuration of its own and needs no entry
// in the config: every smtp handler registers its hostnames with it while Caddy
// provisions the config, and when Caddy starts the config, the app asks
// Caddy's TLS app to obtain and renew a certificate for each of them, as the
// HTTP app does for the addresses of its sites. That is what lets an smtp
// listener have certificates with no HTTP site block in the Caddyfile; a site
// of the same name shares the same certificate.
//
// Names that no public CA will certify (localhost, *.localhost, *.internal,
// IP addresses) and that no automation policy of the config covers get a
// policy with Caddy's internal issuer, as the HTTP app does for them.
//
// The app also gives the handlers their TLS session ticket keys, when the
// TLS app does not (see sessiontickets.go).
type App struct {
	names    map[string]struct{}
	handlers []servedHandler // what the layer4 config's smtp handlers serve
	tlsApp   *caddytls.TLS
	tickets  *ticketKeys // nil when the TLS app's session_tickets are configured
	ctx      caddy.Context
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "smtp",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision sets up the app.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()
	a.names = make(map[string]struct{})
	tlsApp, err := ctx.App("tls")
	if err != nil {
		return fmt.Errorf("smtp: getting tls app: %w", err)
	}
	a.tlsApp = tlsApp.(*caddytls.TLS)
	a.handlers = servedHandlers(ctx)
	if a.tlsApp.SessionTickets == nil {
		if a.tickets, err = startTicketKeys(ctx); err != nil {
			return fmt.Errorf("smtp: %w", err)
		}
	}
	return nil
}

// Cleanup stops the session ticket key rotation that Provision started.
func (a *App) Cleanup() error {
	a.tickets.stop()
	return nil
}

// smtpApp returns the smtp app of the config being provisioned, for the
// smtp handlers' Provision.
func smtpApp(ctx caddy.Context) (*App, error) {
	app, err := ctx.App("smtp")
	if err != nil {
		return nil, fmt.Errorf("smtp: getting smtp app: %w", err)
	}
	return app.(*App), nil
}

// register records names for management and gives the internal ones an
// automation policy now, during provisioning, when the HTTP app also makes
// its policies and the internal issuer can still load the pki app.
func (a *App) register(names []string) error {
	var internal []string
	for _, name := range names {
		if _, ok := a.names[name]; ok {
			continue
		}
		a.names[name] = struct{}{}
		if a.needsInternalIssuer(name) {
			internal = append(internal, name)
		}
	}
	if len(internal) == 0 {
		return nil
	}
	issuer := new(caddytls.InternalIssuer)
	if err := issuer.Provision(a.ctx); err != nil {
		return fmt.Errorf("smtp: setting up the internal issuer for %v: %w", internal, err)
	}
	policy := &caddytls.AutomationPolicy{
		SubjectsRaw: internal,
		Issuers:     []certmagic.Issuer{issuer},
	}
	if err := a.tlsApp.AddAutomationPolicy(policy); err != nil {
		return fmt.Errorf("smtp: adding an automation policy for %v: %w", internal, err)
	}
	return nil
}

// needsInternalIssuer reports whether name would otherwise go to a public CA
// that cannot certify it.
func (a *App) needsInternalIssuer(name string) bool {
	var policies []*caddytls.AutomationPolicy
	if a.tlsApp.Automation != nil {
		policies = a.tlsApp.Automation.Policies
	}
	for _, ap := range policies {
		if slices.ContainsFunc(ap.Subjects(), func(subject string) bool {
			return certmagic.MatchWildcard(name, subject)
		}) {
			return false // the user has said how to get this one
		}
	}
	if !certmagic.SubjectQualifiesForPublicCert(name) {
		return true
	}
	// public CAs that Caddy uses by default do not issue for IP addresses
	return certmagic.SubjectIsIP(name) && len(policies) == 0
}

// Start says what each smtp handler serves, and asks the TLS app to manage
// the registered names. It runs only when the config is started, so `caddy
// validate` and `caddy adapt` obtain nothing.
func (a *App) Start() error {
	for _, s := range a.handlers {
		a.logger.Info("serving SMTP", s.fields()...)
	}
	names := make(map[string]struct{}, len(a.names))
	for name := range a.names {
		// a certificate loaded from files or storage by the user is
		// used as it is, as the HTTP app does
		if !a.tlsApp.HasCertificateForSubject(name) {
			names[name] = struct{}{}
		}
	}
	if len(names) == 0 {
		return nil
	}
	list := make([]string, 0, len(names))
	for name := range names {
		list = append(list, name)
	}
	slices.Sort(list)
	a.logger.Info("enabling automatic TLS certificate management for SMTP", zap.Strings("domains", list))
	if err := a.tlsApp.Manage(names); err != nil {
		return fmt.Errorf("smtp: managing certificates for %v: %w", list, err)
	}
	return nil
}

// Stop does nothing; the TLS app stops certificate maintenance itself.
func (a *App) Stop() error { return nil }

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)

// servedHandler is what one smtp handler of the config serves, for the line
// that says so when the config starts.
type servedHandler struct {
	server  string   // the layer4 server's name
	listen  []string // its addresses
	handler Handler  // the handler's config, as written
}

// servedHandlers finds the smtp handlers in the layer4 app's config, also
// inside subroutes. The app is provisioned by the first smtp handler, in
// the middle of the layer4 app's provisioning, when the raw config of every
// handler still to come, the first one's included, is at hand (Caddy drops
// a module's raw JSON once it has loaded it), and the servers that came
// before have none.
func servedHandlers(ctx caddy.Context) []servedHandler {
	var app *layer4.App
	for _, m := range ctx.Modules() {
		if l4, ok := m.(*layer4.App); ok {
			app = l4
		}
	}
	if app == nil {
		return nil
	}
	var served []servedHandler
	for _, name := range slices.Sorted(maps.Keys(app.Servers)) {
		srv := app.Servers[name]
		for _, route := range srv.Routes {
			eachSMTPHandler(route.HandlersRaw, func(h Handler) {
				served = append(served, servedHandler{server: name, listen: srv.Listen, handler: h})
			})
		}
	}
	return served
}

// eachSMTPHandler calls f with each smtp handler in raws, in order, and in
// the routes of subroute handlers.
func eachSMTPHandler(raws []json.RawMessage, f func(Handler)) {
	for _, raw := range raws {
		var head struct {
			Handler string `json:"handler"`
			Routes  []struct {
				Handle []json.RawMessage `json:"handle"`
			} `json:"routes"`
		}
		if json.Unmarshal(raw, &head) != nil {
			continue
		}
		switch head.Handler {
		case "smtp":
			var h Handler
			if json.Unmarshal(raw, &h) == nil {
				f(h)
			}
		case "subroute":
			for _, route := range head.Routes {
				eachSMTPHandler(route.Handle, f)
			}
		}
	}
}

func (s servedHandler) fields() []zap.Field {
	mode := "starttls"
	if s.handler.ImplicitTLS {
		mode = "implicit"
	}
	fields := []zap.Field{
		zap.String("server", s.server),
		zap.Strings("listen", s.listen),
		zap.String("mode", mode),
		zap.Strings("hostnames", s.handler.Hostnames),
		zap.Strings("backends", s.handler.BackendOptions.addresses()),
	}
	if len(s.handler.SNIRoutes) > 0 {
		routes := make([]string, 0, len(s.handler.SNIRoutes))
		for _, r := range s.handler.SNIRoutes {
			if r != nil {
				routes = append(routes, strings.Join(r.SNI, " ")+": "+strings.Join(r.addresses(), " "))
			}
		}
		fields = append(fields, zap.Strings("sni_routes", routes))
	}
	return fields
}

// addresses are the backend addresses as written, or the next handler.
func (o *BackendOptions) addresses() []string {
	addrs := slices.Clone(o.Backends)
	for _, u := range o.Upstreams {
		if u != nil {
			addrs = append(addrs, u.Dial...)
		}
	}
	if len(addrs) == 0 {
		return []string{"the next handler"}
	}
	return addrs
}
