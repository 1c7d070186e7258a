package integration

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestQuickstart runs examples/quickstart/Caddyfile itself, the config of the
// README's first command, and sends a message through each of its listeners
// into the sink's ./mail directory, after AUTH PLAIN (the sink accepts any),
// which the quickstart requires. It uses the file's fixed ports, so it
// runs alone (it is not parallel) and skips when one of them is taken, except
// in CI.
func TestQuickstart(t *testing.T) {
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	config, err := os.ReadFile(filepath.Join(root, "examples", "quickstart", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	listeners := []listener{
		{name: "submissions", mode: implicitTLS, addr: "127.0.0.1:1465"},
		{name: "submission", mode: startTLS, addr: "127.0.0.1:1587"},
		{name: "alt", mode: startTLS, addr: "127.0.0.1:2525"},
		// the README's second example: a STARTTLS client on the implicit
		// TLS port (detect_tls)
		{name: "STARTTLS on the submissions port", mode: startTLS, addr: "127.0.0.1:1465"},
	}
	const admin = "127.0.0.1:2019"
	addrs := []string{listeners[0].addr, listeners[1].addr, listeners[2].addr, "127.0.0.1:10025", admin}
	for _, addr := range addrs {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			skipOrFail(t, "the quickstart's address "+addr+" is taken ("+err.Error()+")")
		}
		ln.Close()
	}

	proc := startCaddy(t, func() caddySetup {
		return caddySetup{caddyfile: string(config), addrs: addrs, probe: listeners[0], hostnames: []string{"mail.localhost"}}
	})
	// the quickstart requires AUTH before mail (require_auth's default);
	// its sink accepts any AUTH PLAIN, as the README's swaks lines send
	t.Run("MAIL before AUTH", func(t *testing.T) {
		c := smtpClient(t, listeners[1], proc.tlsConfig("mail.localhost"))
		if err := c.Mail("me@example.com"); !isReply(err, 530, "5.7.0") {
			t.Errorf("MAIL before AUTH: %v, want 530 5.7.0", err)
		}
	})
	for _, l := range listeners {
		t.Run(l.name, func(t *testing.T) {
			c := smtpClient(t, l, proc.tlsConfig("mail.localhost"))
			token := uniqueToken(t)
			msg := testMessage(token, "through the quickstart's "+l.name+" listener")
			if err := submit(c, "me@example.com", []string{"you@example.com"}, msg); err != nil {
				t.Fatalf("sending: %v", err)
			}
			if err := c.Quit(); err != nil {
				t.Errorf("QUIT: %v", err)
			}
			assertSameBytes(t, "the stored message", sinkMessage(t, filepath.Join(proc.dir, "mail"), token), msg)
		})
	}
	// at Caddy's default log level, what each listener serves, and one
	// line per session that tells how it went
	entries := proc.logEntries(t)
	for _, l := range listeners[:3] {
		if !slices.ContainsFunc(entries, func(e map[string]any) bool {
			return e["msg"] == "serving SMTP" && strings.Contains(fmt.Sprint(e["listen"]), ":"+l.port())
		}) {
			t.Errorf("no 'serving SMTP' line for %s", l.addr)
		}
	}
	for _, l := range listeners {
		e := proc.waitLogEntry(t, "the access line of a session through "+l.name, func(e map[string]any) bool {
			return e["logger"] == "layer4.handlers.smtp.access" && e["listener"] == l.addr && e["outcome"] == "quit" &&
				e["messages"] == 1.0 && e["mode"] == modeName(l.mode) && e["user_id"] == sinkUser
		})
		if e["level"] != "info" {
			t.Errorf("access line at %v, want info", e["level"])
		}
	}
	// and the counts on the admin endpoint, as the README shows them
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatalf("the admin endpoint: %v", err)
	}
	scrape, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, l := range listeners[:3] {
		series := fmt.Sprintf(`caddy_layer4_smtp_sessions_total{listener=%q,mode=%q,outcome="quit"}`, l.addr, modeName(l.mode))
		if !bytes.Contains(scrape, []byte(series+" ")) {
			t.Errorf("the admin endpoint's /metrics has no %s", series)
		}
	}
}

// modeName is the access line's name of a mode.
func modeName(m tlsMode) string {
	if m == implicitTLS {
		return "implicit"
	}
	return "starttls"
}
