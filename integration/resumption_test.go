package integration

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The tests in this file resume TLS sessions through a running caddy: TLS
// 1.2 session tickets and TLS 1.3 pre-shared keys, with implicit TLS and
// after STARTTLS, with Go's ClientSessionCache, openssl s_client
// (-reconnect, -sess_out/-sess_in) and Python's ssl module; across a config
// reload; with the TLS app's session_tickets turned off; and between two
// caddy processes that share their storage and the TLS app's distributed
// ticket keys. Whether a session resumed is what the client's TLS library
// says (Go's and Python's) or, for openssl, what the edge logged for the
// handshake (its "resumed" field): never the wording of a tool's output.

// resumptionCaddyfile is a caddy with an implicit TLS and a STARTTLS edge
// into a sink, and an admin endpoint for reloads; the greeting names the
// config's generation.
func resumptionCaddyfile(admin string, listeners []listener, sinkAddr, sinkDir string, generation int) string {
	return fmt.Sprintf(`{
	admin %s
	skip_install_trust
	debug
	layer4 {
		%s {
			route {
				smtp %s {
					implicit_tls
					backend %s
				}
			}
		}
		%s {
			route {
				smtp %s {
					greeting "generation-%d"
					backend %s
				}
			}
		}
		%s {
			route {
				smtp_sink {
					directory %q
					hostname sink.localhost
				}
			}
		}
	}
}
`, admin, listeners[0].addr, firstHost, sinkAddr, listeners[1].addr, firstHost, generation, sinkAddr, sinkAddr, sinkDir)
}

// resumingClient is a TLS client configuration of p for mail.localhost,
// up to version, with a session cache of its own.
func resumingClient(p *caddyProc, version uint16) *tls.Config {
	cfg := p.tlsConfig(firstHost)
	cfg.MaxVersion = version
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(8)
	return cfg
}

// goSession opens an SMTP session through l with cfg, delivers a message
// into sinkDir when sinkDir is set, and reports whether TLS resumed.
func goSession(t *testing.T, l listener, cfg *tls.Config, sinkDir string) bool {
	t.Helper()
	c := smtpClient(t, l, cfg)
	state, _ := c.TLSConnectionState()
	if sinkDir != "" {
		token := uniqueToken(t)
		if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "resumption")); err != nil {
			t.Fatalf("delivery: %v", err)
		}
		sinkMessage(t, sinkDir, token)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	return state.DidResume
}

var tlsVersions = []uint16{tls.VersionTLS12, tls.VersionTLS13}

// handshakeCounts counts the TLS handshakes the edges of p have logged
// (their Debug line "terminated TLS"), full and resumed.
func handshakeCounts(t *testing.T, p *caddyProc) (full, resumed int) {
	t.Helper()
	for _, e := range p.logEntries(t) {
		if e["logger"] != "layer4.handlers.smtp" || e["msg"] != "terminated TLS" {
			continue
		}
		if e["resumed"] == true {
			resumed++
		} else {
			full++
		}
	}
	return full, resumed
}

// countHandshakes runs f and returns the handshakes the edges logged meanwhile.
func countHandshakes(t *testing.T, p *caddyProc, f func()) (full, resumed int) {
	t.Helper()
	full0, resumed0 := handshakeCounts(t, p)
	f()
	full1, resumed1 := handshakeCounts(t, p)
	return full1 - full0, resumed1 - resumed0
}

func TestTLSResumption(t *testing.T) {
	dir := t.TempDir()
	sinkDir := filepath.Join(dir, "mail")
	var listeners []listener
	var admin, sinkAddr string
	proc := startCaddy(t, func() caddySetup {
		listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		admin, sinkAddr = freeAddr(t), freeAddr(t)
		return caddySetup{
			caddyfile: resumptionCaddyfile(admin, listeners, sinkAddr, sinkDir, 0),
			addrs:     []string{listeners[0].addr, listeners[1].addr, sinkAddr},
			probe:     listeners[0],
			hostnames: []string{firstHost},
		}
	})

	// the subtests run one after the other: the openssl ones count the
	// handshakes in caddy's log
	for _, l := range listeners {
		for _, version := range tlsVersions {
			t.Run(fmt.Sprintf("Go/%s/%s", l.name, tls.VersionName(version)), func(t *testing.T) {
				cfg := resumingClient(proc, version)
				if goSession(t, l, cfg, "") {
					t.Fatal("the first session resumed")
				}
				if !goSession(t, l, cfg, sinkDir) {
					t.Fatal("the second session did not resume")
				}
			})
		}
	}

	for _, l := range listeners {
		t.Run("openssl-reconnect-TLS1.2/"+l.name, func(t *testing.T) {
			openssl := requireTool(t, "openssl", "openssl")
			full, resumed := countHandshakes(t, proc, func() {
				if _, err := tpOpenSSL(t, openssl, proc, l, "-tls1_2", "-reconnect"); err != nil {
					t.Fatalf("openssl s_client -reconnect: %v", err)
				}
			})
			if full != 1 || resumed < 1 {
				t.Errorf("openssl -reconnect: %d full and %d resumed handshakes, want 1 full and the rest resumed", full, resumed)
			}
		})
		t.Run("openssl-sess_out-sess_in-TLS1.3/"+l.name, func(t *testing.T) {
			openssl := requireTool(t, "openssl", "openssl")
			sessionFile := filepath.Join(t.TempDir(), "session.pem")
			full, resumed := countHandshakes(t, proc, func() {
				if _, err := tpOpenSSL(t, openssl, proc, l, "-tls1_3", "-sess_out", sessionFile); err != nil {
					t.Fatalf("openssl s_client -sess_out: %v", err)
				}
			})
			if full != 1 || resumed != 0 {
				t.Fatalf("first connection: %d full and %d resumed handshakes, want 1 full", full, resumed)
			}
			if _, err := os.Stat(sessionFile); err != nil {
				t.Fatalf("openssl saved no session: %v", err)
			}
			full, resumed = countHandshakes(t, proc, func() {
				if _, err := tpOpenSSL(t, openssl, proc, l, "-tls1_3", "-sess_in", sessionFile); err != nil {
					t.Fatalf("openssl s_client -sess_in: %v", err)
				}
			})
			if full != 0 || resumed != 1 {
				t.Errorf("with the saved session: %d full and %d resumed handshakes, want 1 resumed", full, resumed)
			}
		})
		t.Run("Python/"+l.name, func(t *testing.T) {
			reused := pythonResumption(t, proc, l)
			if reused[0] || !reused[1] {
				t.Errorf("Python's session_reused: %v, want false then true", reused)
			}
		})
	}

	// tickets issued before a reload resume after it
	clients := make(map[string]*tls.Config)
	for _, l := range listeners {
		for _, version := range tlsVersions {
			cfg := resumingClient(proc, version)
			goSession(t, l, cfg, "")
			clients[l.name+tls.VersionName(version)] = cfg
		}
	}
	resp, err := http.Post("http://"+admin+"/load", "text/caddyfile",
		strings.NewReader(resumptionCaddyfile(admin, listeners, sinkAddr, sinkDir, 1)))
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reload: %s", resp.Status)
	}
	if greeting := greetingOf(t, listeners[1]); !strings.Contains(greeting, "generation-1") {
		t.Fatalf("after the reload a new session was greeted %q", greeting)
	}
	for _, l := range listeners {
		for _, version := range tlsVersions {
			t.Run(fmt.Sprintf("after-reload/%s/%s", l.name, tls.VersionName(version)), func(t *testing.T) {
				if !goSession(t, l, clients[l.name+tls.VersionName(version)], sinkDir) {
					t.Error("a ticket issued before the reload did not resume after it")
				}
			})
		}
	}
}

// pythonResumption opens two SMTP sessions through l with Python's ssl
// module, the second with the first's TLS session, and returns what
// session_reused said for each.
func pythonResumption(t *testing.T, p *caddyProc, l listener) [2]bool {
	t.Helper()
	python := requireTool(t, "python3", "python3")
	script := `
import json, socket, ssl, sys
host, port, mode, ca, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)

def reply(f):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        if line[3:4] != b"-":
            return line

def session(previous):
    sock = socket.create_connection((host, port), timeout=30)
    if mode == "starttls":
        plain = sock.makefile("rb", buffering=0)
        reply(plain)
        sock.sendall(b"EHLO python.localhost\r\n"); reply(plain)
        sock.sendall(b"STARTTLS\r\n")
        if not reply(plain).startswith(b"220"):
            raise SystemExit("STARTTLS refused")
    conn = ctx.wrap_socket(sock, server_hostname=name, session=previous)
    f = conn.makefile("rb")
    if mode == "implicit":
        reply(f)
    conn.sendall(b"EHLO python.localhost\r\n"); reply(f)
    conn.sendall(b"QUIT\r\n"); reply(f)
    result = (conn.session_reused, conn.session)
    conn.close()
    return result

first, saved = session(None)
second, _ = session(saved)
print(json.dumps([first, second]))
`
	mode := "implicit"
	if l.mode == startTLS {
		mode = "starttls"
	}
	host, port := "127.0.0.1", l.port()
	out, err := runTool(t, nil, python, "-c", script, host, port, mode, p.rootPath(), firstHost)
	if err != nil {
		t.Fatalf("python: %v", err)
	}
	var reused [2]bool
	lines := scanLines(out)
	if len(lines) == 0 || json.Unmarshal([]byte(lines[len(lines)-1]), &reused) != nil {
		t.Fatalf("python printed %q", out)
	}
	return reused
}

// TestTLSSessionTicketsDisabled: the TLS app's session_tickets { disabled }
// (JSON only; the Caddyfile has no option for it) turns resumption off on
// the edge too.
func TestTLSSessionTicketsDisabled(t *testing.T) {
	t.Parallel()
	sinkDir := filepath.Join(t.TempDir(), "mail")
	proc, listeners := startEdgePair(t, sinkDir, nil, func(setup *caddySetup) {
		setup.editJSON = func(config map[string]any) {
			tlsApp(config)["session_tickets"] = map[string]any{"disabled": true}
		}
	})
	for _, l := range listeners {
		for _, version := range tlsVersions {
			t.Run(fmt.Sprintf("%s/%s", l.name, tls.VersionName(version)), func(t *testing.T) {
				cfg := resumingClient(proc, version)
				goSession(t, l, cfg, "")
				if goSession(t, l, cfg, sinkDir) {
					t.Error("a session resumed with session tickets disabled")
				}
			})
		}
	}
}

// TestTLSSessionTicketsDistributed: two caddy processes that share their
// storage and the TLS app's distributed ticket keys (session_tickets {
// key_source distributed }) resume each other's sessions, as edges of one
// cluster.
func TestTLSSessionTicketsDistributed(t *testing.T) {
	t.Parallel()
	distributed := func(config map[string]any) {
		tlsApp(config)["session_tickets"] = map[string]any{"key_source": map[string]any{"provider": "distributed"}}
	}
	// the second uses the first's storage: its certificates, its local CA
	// and its ticket keys
	start := func(storageOf *caddyProc) (*caddyProc, []listener) {
		return startEdgePair(t, filepath.Join(t.TempDir(), "mail"), nil, func(setup *caddySetup) {
			setup.editJSON = func(config map[string]any) {
				distributed(config)
				if storageOf != nil {
					config["storage"] = map[string]any{"module": "file_system", "root": filepath.Join(storageOf.dataDir, "caddy")}
				}
			}
			if storageOf != nil {
				setup.roots = storageOf.rootPool()
			}
		})
	}
	first, firstListeners := start(nil)
	_, secondListeners := start(first)
	for i, l := range firstListeners {
		for _, version := range tlsVersions {
			t.Run(fmt.Sprintf("%s/%s", l.name, tls.VersionName(version)), func(t *testing.T) {
				cfg := resumingClient(first, version)
				goSession(t, l, cfg, "")
				if !goSession(t, secondListeners[i], cfg, "") {
					t.Error("the second edge did not resume a session of the first")
				}
			})
		}
	}
}

// tlsApp is the TLS app of an adapted config, made if there is none.
func tlsApp(config map[string]any) map[string]any {
	apps, _ := config["apps"].(map[string]any)
	if apps == nil {
		apps = make(map[string]any)
		config["apps"] = apps
	}
	app, _ := apps["tls"].(map[string]any)
	if app == nil {
		app = make(map[string]any)
		apps["tls"] = app
	}
	return app
}
