package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestTLSPlaceholdersRouting: a route after smtp reads the {l4.tls.*}
// placeholders that the handler sets, as it would after caddy-l4's tls
// handler: caddy-l4's vars matcher sends the sessions of relay.localhost
// to one mail server and the others to another, by the name the client
// asked for, with implicit TLS and after STARTTLS.
func TestTLSPlaceholdersRouting(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	mainDir, relayDir := filepath.Join(dir, "main"), filepath.Join(dir, "relay")
	var listeners []listener
	proc := startCaddy(t, func() caddySetup {
		listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		mainSink, relaySink := freeAddr(t), freeAddr(t)
		edge := func(addr, options string) string {
			return fmt.Sprintf(`
		%s {
			route {
				smtp %s %s {%s
				}
				subroute {
					@relay vars {l4.tls.server_name} %s
					route @relay {
						proxy %s
					}
					route {
						proxy %s
					}
				}
			}
		}`, addr, firstHost, secondHost, options, secondHost, relaySink, mainSink)
		}
		sink := func(addr, dir string) string {
			return fmt.Sprintf(`
		%s {
			route {
				smtp_sink {
					directory %q
					hostname sink.localhost
				}
			}
		}`, addr, dir)
		}
		caddyfile := "{\n\tadmin off\n\tskip_install_trust\n\tdebug\n\tlayer4 {" +
			edge(listeners[0].addr, "\n\t\t\t\t\timplicit_tls") + edge(listeners[1].addr, "") +
			sink(mainSink, mainDir) + sink(relaySink, relayDir) + "\n\t}\n}\n"
		return caddySetup{
			caddyfile: caddyfile,
			addrs:     []string{listeners[0].addr, listeners[1].addr, mainSink, relaySink},
			probe:     listeners[0],
			hostnames: []string{firstHost, secondHost},
		}
	})
	for _, l := range listeners {
		for name, dir := range map[string]string{firstHost: mainDir, secondHost: relayDir} {
			t.Run(l.name+"/"+name, func(t *testing.T) {
				t.Parallel()
				c := smtpClient(t, l, proc.tlsConfig(name))
				token := uniqueToken(t)
				if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "to "+name)); err != nil {
					t.Fatalf("delivery: %v", err)
				}
				sinkMessage(t, dir, token)
				other := mainDir
				if dir == mainDir {
					other = relayDir
				}
				matches, _ := filepath.Glob(filepath.Join(other, "*.eml"))
				for _, m := range matches {
					if data, err := os.ReadFile(m); err == nil && bytes.Contains(data, []byte(token)) {
						t.Errorf("the message for %s reached the other mail server too", name)
					}
				}
			})
		}
	}
}
