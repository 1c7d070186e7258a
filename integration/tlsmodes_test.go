package integration

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestWrongTLSMode: clients configured for the other TLS mode than their
// port's deliver their message (detect_tls). On the implicit TLS listener,
// where detection is on by default, clients that wait for a greeting and
// then use STARTTLS: Python's smtplib (SMTP + starttls()), Go's net/smtp,
// curl (smtp:// with --ssl-reqd) and swaks (--tls). On a STARTTLS listener
// with detect_tls, clients that start TLS at once: smtplib's SMTP_SSL, Go,
// curl (smtps://) and swaks (--tlsc). Every client verifies the
// certificate; the message must be stored as sent.
func TestWrongTLSMode(t *testing.T) {
	t.Parallel()
	sinkDir := filepath.Join(t.TempDir(), "mail")
	var implicit, detecting listener
	proc := startCaddy(t, func() caddySetup {
		implicit = listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
		detecting = listener{name: "submission with detect_tls", mode: startTLS, addr: freeAddr(t)}
		sinkAddr := freeAddr(t)
		return caddySetup{
			config: caddyConfig{
				Edges: []edgeConfig{
					{Addrs: []string{implicit.addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Backend: sinkAddr},
					{Addrs: []string{detecting.addr}, Hostnames: []string{firstHost}, Backend: sinkAddr,
						Options: []string{"detect_tls 200ms"}},
				},
				Sinks: []sinkConfig{{Addr: sinkAddr, Dir: sinkDir, MaxMessageSize: 1 << 20}},
			},
			addrs:     []string{implicit.addr, detecting.addr, sinkAddr},
			probe:     implicit,
			hostnames: []string{firstHost},
		}
	})
	env := &sinkEnv{proc: proc, sinkDir: sinkDir}

	// each listener, as the client wrongly sees it
	wrong := []listener{
		{name: "STARTTLS client on the implicit TLS port", mode: startTLS, addr: implicit.addr},
		{name: "implicit TLS client on the STARTTLS port", mode: implicitTLS, addr: detecting.addr},
	}
	for _, l := range wrong {
		t.Run("Go/"+l.name, func(t *testing.T) {
			t.Parallel()
			c := smtpClient(t, l, proc.tlsConfig(firstHost))
			token := uniqueToken(t)
			msg := testMessage(token, "through "+l.name)
			if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, msg); err != nil {
				t.Fatalf("delivery: %v", err)
			}
			assertSameBytes(t, "the stored message", sinkMessage(t, sinkDir, token), msg)
		})
		t.Run("Python/"+l.name, func(t *testing.T) {
			t.Parallel()
			testSmtplib(t, env, l)
		})
		t.Run("curl/"+l.name, func(t *testing.T) {
			t.Parallel()
			testCurl(t, env, l)
		})
		t.Run("swaks/"+l.name, func(t *testing.T) {
			t.Parallel()
			testSwaks(t, env, l)
		})
	}
}

// testSmtplib sends a message with Python's smtplib through l, in l's mode:
// SMTP_SSL for implicit TLS, SMTP and starttls() for STARTTLS, verifying the
// certificate against Caddy's local CA, after login() as sinkUser.
func testSmtplib(t *testing.T, env *sinkEnv, l listener) {
	python := requireTool(t, "python3", "python3")
	token := uniqueToken(t)
	script := `
import smtplib, ssl, sys
host, port, mode, ca, name, token, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8]

class NamedContext(ssl.SSLContext):
    """verifies the certificate for name, whatever address the client dials"""
    def wrap_socket(self, sock, *args, **kwargs):
        kwargs["server_hostname"] = name
        return super().wrap_socket(sock, *args, **kwargs)

ctx = NamedContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile=ca)
message = "Subject: %s\r\n\r\nsent by smtplib %s\r\n" % (token, token)
if mode == "implicit":
    client = smtplib.SMTP_SSL(host, port, context=ctx, timeout=30)
else:
    client = smtplib.SMTP(host, port, timeout=30)
    client.ehlo("python.localhost")
    client.starttls(context=ctx)
client.ehlo("python.localhost")
client.login(user, password)
client.sendmail("sender@example.com", ["rcpt@example.com"], message)
client.quit()
`
	mode := "starttls"
	if l.mode == implicitTLS {
		mode = "implicit"
	}
	if _, err := runTool(t, nil, python, "-c", script, "127.0.0.1", l.port(), mode, env.proc.rootPath(), firstHost, token, sinkUser, sinkPassword); err != nil {
		t.Fatalf("smtplib: %v", err)
	}
	data := sinkMessage(t, env.sinkDir, token)
	if !strings.Contains(string(data), "Subject: "+token+"\r\n") {
		t.Errorf("the stored message lacks the subject line: %q", head(data))
	}
}
