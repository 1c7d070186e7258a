package integration

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"net"
	"net/smtp"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
)

// TestDovecotSubmissionBehindEdge runs Dovecot's submission service behind
// the edge with examples/dovecot-submission/dovecot.conf, in a Dovecot that
// requires TLS (ssl = required, and disable_plaintext_auth at its default,
// yes) for the example's listener too. Through the smtp handler's PROXY v2,
// whose SSL TLV says the client used TLS: AUTH PLAIN and LOGIN, a wrong
// password, and the client's own address in Dovecot's log and in the
// Received: header of the message it relays to a go-smtp server. Through the
// headers without the TLV (the smtp handler's PROXY v1, caddy-l4's proxy
// with v1 and v2): no AUTH. And with headers the test writes itself to
// Dovecot's listener, which differ only in the SSL TLV: the TLV alone is
// what makes Dovecot accept AUTH.
func TestDovecotSubmissionBehindEdge(t *testing.T) {
	requireRootMTA(t, map[string]string{"dovecot": "dovecot-core", "/usr/lib/dovecot/submission": "dovecot-submissiond"})
	dir := mtaTempDir(t)
	sink := startMTASink(t)
	dovecot, submissionAddr := startExampleDovecot(t, dir, sink)

	proc, edges := startProxyEdges(t, submissionAddr)
	cfg := proc.tlsConfig(firstHost)

	// the smtp handler's PROXY v2 carries the SSL TLV; v1 has no room for
	// it, and caddy-l4's proxy sends none
	var withTLV, withoutTLV []postfixListener
	for _, way := range relayWays {
		for _, l := range edges[way] {
			if way == viaBackend && l.proxyProtocol == "v2" {
				withTLV = append(withTLV, l)
			} else {
				withoutTLV = append(withoutTLV, l)
			}
		}
	}
	t.Run(string(viaBackend)+"/PROXY v2", func(t *testing.T) {
		testDovecotSubmission(t, dovecot, sink, cfg, withTLV, map[string]int{}, wayIP(0, 8))
	})
	for _, l := range withoutTLV {
		t.Run("no SSL TLV/"+string(l.via)+"/"+l.String(), func(t *testing.T) {
			c := dialFrom(t, l.listener, cfg, clientIP)
			testDovecotRefusesAuth(t, c)
		})
	}
	t.Run("the SSL TLV alone", func(t *testing.T) {
		testDovecotSSLTLV(t, dovecot, submissionAddr)
	})
}

// testDovecotRefusesAuth checks that Dovecot, on a session it takes for one
// without TLS, offers no AUTH after EHLO and answers AUTH PLAIN with the
// right password with 530 (ssl = required), and that c's session goes on.
func testDovecotRefusesAuth(t *testing.T, c *smtp.Client) {
	t.Helper()
	if ok, mechs := c.Extension("AUTH"); ok {
		t.Errorf("Dovecot offers AUTH %s on a session it should take for plaintext", mechs)
	}
	if code, msg := authSteps(t, c.Text, []string{"AUTH PLAIN " + plainResponse()}); code != 530 {
		t.Errorf("AUTH PLAIN: %d %s, want Dovecot's 530 (TLS required)", code, msg)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
}

// plainResponse is the AUTH PLAIN initial response for postfixUser and the
// right password.
func plainResponse() string {
	return base64.StdEncoding.EncodeToString([]byte("\x00" + postfixUser + "\x00" + postfixPassword))
}

// testDovecotSSLTLV connects to Dovecot's listener itself, from the edge's
// address, and sends PROXY v2 headers that differ only in a PP2_TYPE_SSL
// TLV with the client-SSL bit: without it, no AUTH and 530; with it, AUTH
// offered and 235, and Dovecot logs the login with the header's address.
func testDovecotSSLTLV(t *testing.T, dovecot *dovecotAuth, addr string) {
	for _, tc := range []struct {
		name string
		ssl  bool
		ip   string // the client's address in the header
	}{
		{"without", false, "127.0.0.50"},
		{"with", true, "127.0.0.51"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(ioTimeout))
			header := proxyproto.HeaderProxyFromAddrs(2,
				&net.TCPAddr{IP: net.ParseIP(tc.ip), Port: 40000},
				&net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 465})
			if tc.ssl {
				ssl, err := tlvparse.PP2SSL{
					Client: tlvparse.PP2_BITFIELD_CLIENT_SSL,
					Verify: 1,
					TLV:    []proxyproto.TLV{{Type: proxyproto.PP2_SUBTYPE_SSL_VERSION, Value: []byte("TLSv1.3")}},
				}.Marshal()
				if err == nil {
					err = header.SetTLVs([]proxyproto.TLV{ssl})
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if _, err := header.WriteTo(conn); err != nil {
				t.Fatal(err)
			}
			c, err := smtp.NewClient(conn, "dovecot.localhost")
			if err != nil {
				t.Fatalf("greeting: %v", err)
			}
			if err := c.Hello("client.localhost"); err != nil {
				t.Fatalf("EHLO: %v", err)
			}
			if !tc.ssl {
				testDovecotRefusesAuth(t, c)
				return
			}
			if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") {
				t.Errorf("EHLO offers AUTH %q (present: %v), want PLAIN", mechs, ok)
			}
			if code, msg := authSteps(t, c.Text, []string{"AUTH PLAIN " + plainResponse()}); code != 235 {
				t.Fatalf("AUTH PLAIN: %d %s, want 235", code, msg)
			}
			dovecot.log.wait(t, regexp.MustCompile(`submission-login: .*\bLogin: user=<`+postfixUser+`>, method=PLAIN, rip=`+regexp.QuoteMeta(tc.ip)+`,`))
			if err := c.Quit(); err != nil {
				t.Errorf("QUIT: %v", err)
			}
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
// (ssl = required), which the example leaves as they are.
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

// startExampleDovecot starts a Dovecot with examples/dovecot-submission/'s
// dovecot.conf, its submission listener on a free loopback port relaying
// into sink, and returns it with that listener's address.
func startExampleDovecot(t *testing.T, dir string, sink *mtaSink) (*dovecotAuth, string) {
	t.Helper()
	_, sinkPort, _ := net.SplitHostPort(sink.addr)
	submissionAddr := freeAddr(t)
	_, submissionPort, _ := net.SplitHostPort(submissionAddr)
	dovecot := startDovecotAuth(t, filepath.Join(dir, "dovecot"),
		map[string]string{postfixUser: postfixPassword},
		// this Dovecot requires TLS, as a production one would: the
		// example's listener too, with no override
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
	return dovecot, submissionAddr
}
