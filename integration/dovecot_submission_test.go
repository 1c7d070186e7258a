package integration

import (
	"encoding/base64"
	"fmt"
	"net"
	"net/smtp"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDovecotSubmissionBehindEdge runs Dovecot's submission service behind
// the edge with examples/dovecot-submission/dovecot.conf: PROXY v2 from
// caddy-l4's proxy, AUTH PLAIN and LOGIN after TLS, a wrong password, and
// the client's own address in Dovecot's log and in the Received: header of
// the message it relays to a go-smtp server.
func TestDovecotSubmissionBehindEdge(t *testing.T) {
	requireRootMTA(t, map[string]string{"dovecot": "dovecot-core", "/usr/lib/dovecot/submission": "dovecot-submissiond"})
	dir := mtaTempDir(t)
	sink := startMTASink(t)
	_, sinkPort, _ := net.SplitHostPort(sink.addr)
	submissionAddr := freeAddr(t)
	_, submissionPort, _ := net.SplitHostPort(submissionAddr)

	dovecot := startDovecotAuth(t, filepath.Join(dir, "dovecot"),
		map[string]string{postfixUser: postfixPassword},
		readExample(t, "dovecot-submission/dovecot.conf", map[string]string{
			"port = 10587":                  "port = " + submissionPort,
			"submission_relay_port = 10025": "submission_relay_port = " + sinkPort,
			"hostname = mail.example.com":   "hostname = dovecot.localhost",
		})+
			// a user's session needs a mail location even in submission;
			// a real Dovecot has one already
			"\nmail_location = maildir:"+filepath.Join(dir, "maildir", "%u")+"\n",
		filepath.Join(dir, "dovecot", "run", "anvil"))
	if err := waitListening(submissionAddr, mtaStartTimeout, dovecot.exited); err != nil {
		t.Fatalf("Dovecot's submission listener: %v\n%s", err, dovecot.log.tail())
	}

	listeners := []listener{
		{name: "submissions", mode: implicitTLS},
		{name: "submission", mode: startTLS},
	}
	proc := startCaddy(t, func() caddySetup {
		var servers strings.Builder
		var addrs []string
		for i := range listeners {
			listeners[i].addr = freeAddr(t)
			implicit := ""
			if listeners[i].mode == implicitTLS {
				implicit = " {\n\t\t\t\t\timplicit_tls\n\t\t\t\t}"
			}
			fmt.Fprintf(&servers, `
		%s {
			route {
				smtp %s%s
				proxy %s {
					proxy_protocol v2
				}
			}
		}`, listeners[i].addr, firstHost, implicit, submissionAddr)
			addrs = append(addrs, listeners[i].addr)
		}
		return caddySetup{
			caddyfile: "{\n\tadmin off\n\tskip_install_trust\n\tdebug\n\n\tlayer4 {" +
				servers.String() + "\n\t}\n}\n",
			addrs:     addrs,
			probe:     listeners[0],
			hostnames: []string{firstHost},
		}
	})
	cfg := proc.tlsConfig(firstHost)

	for _, l := range listeners {
		for _, mech := range []string{"PLAIN", "LOGIN"} {
			t.Run(fmt.Sprintf("%s/AUTH %s", l.mode, mech), func(t *testing.T) {
				c := dialFrom(t, l, cfg, clientIP)
				var auth smtp.Auth = loginAuth{postfixUser, postfixPassword}
				if mech == "PLAIN" {
					auth = smtp.PlainAuth("", postfixUser, postfixPassword, firstHost)
				}
				if err := c.Auth(auth); err != nil {
					t.Fatalf("AUTH %s: %v", mech, err)
				}
				dovecot.log.wait(t, regexp.MustCompile(`submission-login: Info: Login: user=<`+postfixUser+`>, method=`+mech+`, rip=`+regexp.QuoteMeta(clientIP)+`,`))
				token := uniqueToken(t)
				if err := deliver(c, postfixUser+"@example.com", []string{"rcpt@example.com"}, testMessage(token, "through Dovecot")); err != nil {
					t.Fatalf("sending a message: %v", err)
				}
				received := messageHeader(t, sink.wait(t, token)).Values("Received")
				if len(received) == 0 || !strings.Contains(received[0], "["+clientIP+"]") || !strings.Contains(received[0], "dovecot.localhost") {
					t.Errorf("Received: %q, want Dovecot's line naming the client [%s]", received, clientIP)
				}
				if err := c.Quit(); err != nil {
					t.Errorf("QUIT: %v", err)
				}
			})
		}
	}

	t.Run("wrong password", func(t *testing.T) {
		c := dialFrom(t, listeners[1], cfg, "127.0.0.8")
		plain := base64.StdEncoding.EncodeToString([]byte("\x00" + postfixUser + "\x00wrong"))
		code, msg := authSteps(t, c.Text, []string{"AUTH PLAIN " + plain})
		if code != 535 {
			t.Fatalf("AUTH PLAIN with a wrong password: %d %s, want Dovecot's 535", code, msg)
		}
		dovecot.log.wait(t, regexp.MustCompile(`passwd-file\(`+postfixUser+`,127\.0\.0\.8[,)].*Password mismatch`))
	})
}
