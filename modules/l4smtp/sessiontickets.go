package l4smtp

import (
	"crypto/tls"
	"fmt"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	// the key source the TLS app uses by default; registered here too, so
	// that a build without Caddy's standard modules still has it
	_ "github.com/caddyserver/caddy/v2/modules/caddytls/standardstek"
)

// Session ticket keys. A resumed TLS session (a TLS 1.2 session ticket, a
// TLS 1.3 pre-shared key) costs the edge a fraction of a full handshake, and
// mail clients reconnect all day: an MTA keeps a TLS session cache, an
// application client a pool. A ticket resumes only where the keys that
// sealed it are still known: on the next connection, after a config
// reload, on another edge of a cluster. So the keys come from Caddy's
// session ticket key service, never from Go's per-configuration automatic
// keys:
//
//   - When the TLS app's session_tickets are configured (in the JSON config,
//     apps.tls.session_tickets), the TLS app puts its keys on the
//     configurations of the connection policies, rotates them, takes them
//     from its key_source (distributed: shared by every instance that shares
//     the storage), or turns tickets off (disabled); the handshake uses them
//     as they are. With disable_rotation the policies get no keys, and the
//     handler's configuration keeps Go's own, as Caddy's own servers do.
//   - Otherwise the smtp app runs Caddy's standard key source (the TLS app's
//     default, tls.stek.standard) with the TLS app's default rotation, and
//     puts its keys on the handlers' configurations. That source keeps its
//     keys for the life of the process, so tickets survive config reloads.
//
// A connection policy with client_auth never issues tickets (Caddy turns
// them off there: a ticket must not stand in for a client certificate).

const (
	// the TLS app's defaults for its key service (caddytls)
	ticketKeyRotation = 12 * time.Hour
	ticketKeysKept    = 4
)

// ticketKeys are the session ticket keys of Caddy's standard key source,
// kept on the TLS configurations registered with them as they rotate.
type ticketKeys struct {
	mu      sync.Mutex
	keys    [][32]byte
	configs map[*tls.Config]struct{}
	done    chan struct{}
}

// startTicketKeys loads Caddy's standard key source and follows its
// rotation until stop.
func startTicketKeys(ctx caddy.Context) (*ticketKeys, error) {
	mod, err := ctx.LoadModuleByID("tls.stek.standard", nil)
	if err != nil {
		return nil, fmt.Errorf("loading the session ticket key source: %w", err)
	}
	source := mod.(caddytls.STEKProvider)
	keys, err := source.Initialize(&caddytls.SessionTicketService{
		RotationInterval: caddy.Duration(ticketKeyRotation),
		MaxKeys:          ticketKeysKept,
	})
	if err != nil {
		return nil, fmt.Errorf("initializing the session ticket key source: %w", err)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("the session ticket key source gave no keys")
	}
	tk := &ticketKeys{keys: keys, configs: make(map[*tls.Config]struct{}), done: make(chan struct{})}
	go tk.follow(source.Next(tk.done))
	return tk, nil
}

// follow puts each new set of keys on the registered configurations.
func (tk *ticketKeys) follow(next <-chan [][32]byte) {
	for {
		select {
		case keys := <-next:
			if len(keys) == 0 {
				continue
			}
			tk.mu.Lock()
			tk.keys = keys
			for cfg := range tk.configs {
				cfg.SetSessionTicketKeys(keys)
			}
			tk.mu.Unlock()
		case <-tk.done:
			return
		}
	}
}

// register gives cfg the current keys and the ones after them. A nil
// ticketKeys (the TLS app has the keys) does nothing.
func (tk *ticketKeys) register(cfg *tls.Config) {
	if tk == nil {
		return
	}
	tk.mu.Lock()
	defer tk.mu.Unlock()
	cfg.SetSessionTicketKeys(tk.keys)
	tk.configs[cfg] = struct{}{}
}

// unregister stops updating cfg.
func (tk *ticketKeys) unregister(cfg *tls.Config) {
	if tk == nil {
		return
	}
	tk.mu.Lock()
	defer tk.mu.Unlock()
	delete(tk.configs, cfg)
}

// stop ends the rotation; the key source keeps its keys for the next
// config.
func (tk *ticketKeys) stop() {
	if tk != nil {
		close(tk.done)
	}
}
