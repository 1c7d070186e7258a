package integration

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/smtp"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDovecotSubmissionBehindEdge runs Dovecot's submission service behind
// the edge with examples/dovecot-submission/dovecot.conf, in a Dovecot whose
// other services require TLS (ssl = required): PROXY v2 and v1 from the smtp
// handler's backend option and from caddy-l4's proxy, AUTH PLAIN and LOGIN
// after TLS, a wrong password, and the client's own address in Dovecot's log
// and in the Received: header of the message it relays to a go-smtp server.
func TestDovecotSubmissionBehindEdge(t *testing.T) {
	requireRootMTA(t, map[string]string{"dovecot": "dovecot-core", "/usr/lib/dovecot/submission": "dovecot-submissiond"})
	dir := mtaTempDir(t)
	sink := startMTASink(t)
	_, sinkPort, _ := net.SplitHostPort(sink.addr)
	submissionAddr := freeAddr(t)
	_, submissionPort, _ := net.SplitHostPort(submissionAddr)

	dovecot := startDovecotAuth(t, filepath.Join(dir, "dovecot"),
		map[string]string{postfixUser: postfixPassword},
		// the rest of this Dovecot requires TLS, as a production one
		// would for IMAP: the example must work inside it
		dovecotRequireTLS(t, filepath.Join(dir, "tls"))+
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

	proc, edges := startProxyEdges(t, submissionAddr)
	cfg := proc.tlsConfig(firstHost)

	logins := map[string]int{} // successful sessions so far, per mechanism
	for w, way := range relayWays {
		t.Run(string(way), func(t *testing.T) {
			testDovecotSubmission(t, dovecot, sink, cfg, edges[way], logins, wayIP(w, 8))
		})
	}
}

// testDovecotSubmission runs the checks of TestDovecotSubmissionBehindEdge
// through the edges of one relayWay. logins counts the successful sessions
// so far, per mechanism, over all the ways; wrongIP is the client's address
// for the wrong password.
func testDovecotSubmission(t *testing.T, dovecot *dovecotAuth, sink *mtaSink, cfg *tls.Config,
	listeners []postfixListener, logins map[string]int, wrongIP string) {
	for _, l := range listeners {
		for _, mech := range []string{"PLAIN", "LOGIN"} {
			logins[mech]++
			t.Run(fmt.Sprintf("%s/AUTH %s", l, mech), func(t *testing.T) {
				c := dialFrom(t, l.listener, cfg, clientIP)
				var auth smtp.Auth = loginAuth{postfixUser, postfixPassword}
				if mech == "PLAIN" {
					auth = smtp.PlainAuth("", postfixUser, postfixPassword, firstHost)
				}
				if err := c.Auth(auth); err != nil {
					t.Fatalf("AUTH %s: %v", mech, err)
				}
				// one more such line for this session: the login
				// process's "Login:" line, whose fields are Dovecot's
				// login_log_format_elements (user=<%u> method=%m rip=%r
				// ...), documented and read by fail2ban and log tools
				dovecot.log.waitCount(t, regexp.MustCompile(`submission-login: .*\bLogin: user=<`+postfixUser+`>, method=`+mech+`, rip=`+regexp.QuoteMeta(clientIP)+`,`), logins[mech])
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
		c := dialFrom(t, listeners[1].listener, cfg, wrongIP)
		code, msg := authSteps(t, c.Text, wrongPasswordSteps("PLAIN"))
		if code != 535 {
			t.Fatalf("AUTH PLAIN with a wrong password: %d %s, want Dovecot's 535", code, msg)
		}
		dovecot.log.wait(t, dovecotPasswordMismatch(wrongIP))
	})
}

// dovecotRequireTLS writes a self-signed certificate into dir and returns
// the global settings of a Dovecot that requires TLS for every login
// (ssl = required), which the example must override for its listener.
func dovecotRequireTLS(t *testing.T, dir string) string {
	t.Helper()
	cert := selfSignedCert(t, "dovecot.localhost")
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return "ssl = required\nssl_cert = <" + certPath + "\nssl_key = <" + keyPath + "\n\n"
}
