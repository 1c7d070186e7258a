package l4smtp

import (
	"context"
	"crypto/tls"
	"io"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
)

// implicitTLSSession opens a TLS connection to an implicit TLS handler and
// returns the client's view of the handshake.
func implicitTLSSession(t *testing.T, h *Handler, cfg *tls.Config) tls.ConnectionState {
	t.Helper()
	client, done := serveOne(t, func(cx *layer4.Connection) *tls.Conn {
		conn := h.startTLS(implicitSession(h, cx), cx)
		if conn != nil {
			// TLS 1.3 tickets come after the handshake: let the
			// client read them before the close
			_, _ = io.WriteString(conn, "220 ok\r\n")
			_, _ = io.Copy(io.Discard, conn)
		}
		return conn
	})
	conn := tls.Client(client, cfg)
	if err := conn.Handshake(); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	buf := make([]byte, 8)
	if _, err := io.ReadFull(conn, buf); err != nil {
		t.Fatalf("reading the greeting: %v", err)
	}
	state := conn.ConnectionState()
	conn.Close()
	if <-done == nil {
		t.Fatal("server handshake failed")
	}
	return state
}

func TestTLSResumption(t *testing.T) {
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			h, _ := newTestHandler(t, func(h *Handler) { h.ImplicitTLS = true })
			cfg := testClientTLS()
			cfg.MaxVersion = version
			cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
			if implicitTLSSession(t, h, cfg).DidResume {
				t.Fatal("the first session resumed")
			}
			if !implicitTLSSession(t, h, cfg).DidResume {
				t.Fatal("the second session did not resume")
			}
		})
	}
}

// A config reload makes new handlers and a new smtp app; tickets that the
// old ones issued resume on the new ones, because both take their keys from
// Caddy's standard key source, which keeps them for the process. A handler
// without those keys (Go's own, per configuration) does not resume them.
func TestTLSResumptionAfterReload(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	implicit := func(h *Handler) { h.ImplicitTLS = true }
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			client := func() *tls.Config {
				cfg := testClientTLS()
				cfg.MaxVersion = version
				cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				return cfg
			}
			reloadClient, controlClient := client(), client()

			before, err := startTicketKeys(ctx)
			if err != nil {
				t.Fatal(err)
			}
			old, _ := newTestHandler(t, implicit)
			before.register(old.tlsConfig)
			implicitTLSSession(t, old, reloadClient)
			implicitTLSSession(t, old, controlClient)
			before.unregister(old.tlsConfig)
			before.stop()

			after, err := startTicketKeys(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer after.stop()
			reloaded, _ := newTestHandler(t, implicit)
			after.register(reloaded.tlsConfig)
			if !implicitTLSSession(t, reloaded, reloadClient).DidResume {
				t.Error("a ticket from before the reload did not resume after it")
			}
			unkeyed, _ := newTestHandler(t, implicit)
			if implicitTLSSession(t, unkeyed, controlClient).DidResume {
				t.Error("a handler without the key source's keys resumed the ticket")
			}
		})
	}
}
