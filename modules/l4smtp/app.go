package l4smtp

import (
	"fmt"
	"slices"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/caddyserver/certmagic"
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
	names   map[string]struct{}
	tlsApp  *caddytls.TLS
	tickets *ticketKeys // nil when the TLS app's session_tickets are configured
	ctx     caddy.Context
	logger  *zap.Logger
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

// Start asks the TLS app to manage the registered names. It runs only when
// the config is started, so `caddy validate` and `caddy adapt` obtain nothing.
func (a *App) Start() error {
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
