package integration

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/smtp"
	"net/textproto"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The Postfix backend: a real Postfix (started by the test as root from a
// configuration directory it writes) behind the edge, with the listener of
// examples/postfix/master.cf (PROXY protocol, AUTH without TLS, SASL-only
// relaying), main.cf's Dovecot SASL, and examples/postfix/dovecot.conf for a
// private auth-only Dovecot. Postfix relays every accepted message to a
// go-smtp sink in this process, where the test reads it back.

const (
	postfixUser     = "alice"
	postfixPassword = "secret"
	// clientIP is the loopback address the clients connect to the edge
	// from: Postfix must see it, not the edge's 127.0.0.1.
	clientIP = "127.0.0.7"
)

// relayWay is how an edge of startProxyEdges relays the session to the MTA.
type relayWay string

const (
	// viaBackend: the smtp handler's own backend and proxy_protocol
	// options, as the examples have them (the recommended configuration)
	viaBackend relayWay = "smtp backend"
	// viaProxy: the smtp handler followed by caddy-l4's proxy with its
	// proxy_protocol option
	viaProxy relayWay = "caddy-l4 proxy"
)

// relayWays are the ways every MTA test runs through, the examples' first.
var relayWays = []relayWay{viaBackend, viaProxy}

// postfixListener is an edge listener, the PROXY protocol version it sends
// to the MTA, and the way it relays.
type postfixListener struct {
	listener
	proxyProtocol string // "v1" or "v2"
	via           relayWay
}

// proxyEdges are the listeners of startProxyEdges by the way they relay:
// PROXY v2 with implicit TLS, v2 with STARTTLS, v1 with implicit TLS, v1
// with STARTTLS.
type proxyEdges map[relayWay][]postfixListener

type postfixEnv struct {
	proc *caddyProc
	*postfixBackends
	edges proxyEdges
}

// postfixBackends are the sink, Postfix and Dovecot of the examples:
// Postfix with both listeners of examples/postfix/master.cf (proxyAddr,
// xclientAddr) and the extra listeners a test adds.
type postfixBackends struct {
	postfix     *postfixInstance
	dovecot     *dovecotAuth
	sink        *mtaSink
	proxyAddr   string // the example's PROXY listener
	xclientAddr string // the example's XCLIENT listener
}

// startPostfixEnv starts the sink, Postfix and Dovecot from the examples,
// and one caddy with eight edges into Postfix's PROXY listener (see
// startProxyEdges).
func startPostfixEnv(t *testing.T) *postfixEnv {
	t.Helper()
	env := &postfixEnv{postfixBackends: startPostfixBackends(t, "")}
	env.proc, env.edges = startProxyEdges(t, env.proxyAddr)
	return env
}

// startPostfixBackends starts the sink, and Postfix and Dovecot with the
// files of examples/postfix/ as they are (only the listener addresses and
// the queue directory replaced), and with extraMasterCF, listeners of the
// test's own, appended to master.cf.
func startPostfixBackends(t *testing.T, extraMasterCF string) *postfixBackends {
	t.Helper()
	requireRootMTA(t, map[string]string{"postfix": "postfix", "dovecot": "dovecot-core"})

	dir := mtaTempDir(t)
	env := &postfixBackends{sink: startMTASink(t), proxyAddr: freeAddr(t), xclientAddr: freeAddr(t)}
	queueDir := filepath.Join(dir, "queue")
	env.postfix = startPostfix(t, dir, postfixConfig{
		mainCF: readExample(t, "postfix/main.cf", nil),
		masterCF: readExample(t, "postfix/master.cf", map[string]string{
			"127.0.0.1:10587": env.proxyAddr,
			"127.0.0.1:10588": env.xclientAddr,
		}) + extraMasterCF,
		listen: env.proxyAddr,
		relay:  env.sink.addr,
	})
	// Dovecot's socket is in Postfix's queue directory, which postfix
	// start has created
	env.dovecot = startDovecotAuth(t, filepath.Join(dir, "dovecot"),
		map[string]string{postfixUser: postfixPassword},
		readExample(t, "postfix/dovecot.conf", map[string]string{
			"/var/spool/postfix": queueDir,
		}),
		filepath.Join(queueDir, "private", "auth"))
	// Postfix goes first: Dovecot waits for its SASL clients (Postfix's
	// idle smtpd processes) before it exits
	t.Cleanup(func() { env.postfix.stop(t) })
	return env
}

func (l postfixListener) String() string {
	return fmt.Sprintf("PROXY %s, %s", l.proxyProtocol, l.mode)
}

// startProxyEdges starts one caddy with eight edges into backend, the four
// of the MTA examples (implicit TLS and STARTTLS, each with PROXY v2 and
// v1) once for each relayWay: with the smtp handler's backend and
// proxy_protocol options, as the examples have them, and with the smtp
// handler followed by caddy-l4's proxy and its proxy_protocol.
func startProxyEdges(t *testing.T, backend string) (*caddyProc, proxyEdges) {
	t.Helper()
	var edges proxyEdges
	proc := startCaddy(t, func() caddySetup {
		edges = proxyEdges{}
		var servers strings.Builder
		var addrs []string
		for _, way := range relayWays {
			for _, l := range []postfixListener{
				{listener{name: "submissions", mode: implicitTLS}, "v2", way},
				{listener{name: "submission", mode: startTLS}, "v2", way},
				{listener{name: "submissions", mode: implicitTLS}, "v1", way},
				{listener{name: "submission", mode: startTLS}, "v1", way},
			} {
				l.addr = freeAddr(t)
				edges[way] = append(edges[way], l)
				addrs = append(addrs, l.addr)
				// the wrong-password subtests all guess at one account: the
				// password guard's per-account delay (up to 15 s each) would
				// only make the test slow; its bans stay on
				implicit := "\n\t\t\t\t\tauth_guard {\n\t\t\t\t\t\tdelay off\n\t\t\t\t\t}"
				if l.mode == implicitTLS {
					implicit += "\n\t\t\t\t\timplicit_tls"
				}
				if way == viaBackend {
					fmt.Fprintf(&servers, `
		%s {
			route {
				smtp %s {%s
					backend %s
					proxy_protocol %s
				}
			}
		}`, l.addr, firstHost, implicit, backend, l.proxyProtocol)
					continue
				}
				fmt.Fprintf(&servers, `
		%s {
			route {
				smtp %s {%s
				}
				proxy %s {
					proxy_protocol %s
				}
			}
		}`, l.addr, firstHost, implicit, backend, l.proxyProtocol)
			}
		}
		return caddySetup{
			caddyfile: "{\n\tadmin off\n\tskip_install_trust\n\tdebug\n\n\tlayer4 {" +
				servers.String() + "\n\t}\n}\n",
			addrs:     addrs,
			probe:     edges[viaBackend][0].listener,
			hostnames: []string{firstHost},
		}
	})
	return proc, edges
}

// wayIP is the loopback address number n of the way with index w (of
// relayWays): the tests that look for a client's address in an MTA's log
// use addresses of their own for each way, so that the second way cannot
// find the first one's lines.
func wayIP(w, n int) string { return fmt.Sprintf("127.0.0.%d", n+20*w) }

func TestPostfixBehindEdge(t *testing.T) {
	env := startPostfixEnv(t)

	for w, way := range relayWays {
		listeners := env.edges[way]
		t.Run(string(way), func(t *testing.T) {
			for _, l := range listeners {
				t.Run("client address/"+l.String(), func(t *testing.T) {
					testPostfixClientAddress(t, env, l)
				})
			}
			for _, l := range listeners[:2] {
				t.Run("AUTH LOGIN/"+l.mode.String(), func(t *testing.T) {
					testPostfixAuthLogin(t, env, l)
				})
			}
			t.Run("no AUTH before TLS", func(t *testing.T) {
				testPostfixNoAuthBeforeTLS(t, env, listeners[1], wayIP(w, 9), wayIP(w, 10))
			})
			t.Run("no relay without AUTH from the edge's address", func(t *testing.T) {
				testPostfixNoRelayWithoutAuth(t, env, listeners[0])
			})
			for i, c := range []struct{ ip, mech string }{
				{wayIP(w, 11), "PLAIN"}, {wayIP(w, 12), "LOGIN"}, // implicit TLS
				{wayIP(w, 13), "PLAIN"}, {wayIP(w, 14), "LOGIN"}, // STARTTLS
			} {
				l := listeners[i/2]
				t.Run("wrong password/"+c.mech+"/"+l.mode.String(), func(t *testing.T) {
					testPostfixWrongPassword(t, env, l, c.ip, c.mech)
				})
			}
		})
	}
}

// receivedWith is the protocol of Postfix's Received: line for a client
// that authenticated without TLS: the registered "with" protocol types
// (RFC 3848, RFC 6531).
var receivedWith = regexp.MustCompile(`\bwith (ESMTPA|UTF8SMTPA) id `)

// queuedAs finds the queue ID in Postfix's reply to the final dot, "250
// 2.0.0 Ok: queued as <ID>": the ID by which Postfix's log names the
// message, which clients and log tools (pflogsumm) correlate by.
var queuedAs = regexp.MustCompile(`queued as ([0-9A-Za-z]+)`)

// sendThroughPostfix authenticates with auth, sends a message with token,
// and returns Postfix's queue ID for it.
func sendThroughPostfix(t *testing.T, c *smtp.Client, auth smtp.Auth, token string) string {
	t.Helper()
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") || !strings.Contains(mechs, "LOGIN") {
		t.Fatalf("EHLO after TLS offers AUTH %q (present: %v), want Postfix's PLAIN and LOGIN", mechs, ok)
	}
	if err := c.Auth(auth); err != nil {
		t.Fatalf("AUTH: %v", err)
	}
	reply, err := deliverQueued(c, postfixUser+"@example.com", []string{"rcpt@example.com"},
		testMessage(token, "through the edge into Postfix"))
	if err != nil {
		t.Fatalf("delivery: %v", err)
	}
	m := queuedAs.FindStringSubmatch(reply)
	if m == nil {
		t.Fatalf("the reply to DATA %q names no queue ID", reply)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	return m[1]
}

// checkPostfixSession finds the log line of queueID's client and SASL
// login, and the "connect from" line of the same session (the last one of
// the same smtpd process before it), and checks that both name the client's
// address. These are Postfix's record lines: smtpd's "connect from
// name[address]" and "<queue ID>: client=name[address], sasl_method=...,
// sasl_username=..." fields, which log tools (pflogsumm, fail2ban) parse;
// only the address in brackets is compared, not the name.
func checkPostfixSession(t *testing.T, env *postfixBackends, queueID, method string) {
	t.Helper()
	want := "[" + clientIP + "]"
	re := regexp.MustCompile(`postfix(?:/[\w.-]+)*/smtpd\[(\d+)\]: ` + queueID +
		`: client=([^,]+), sasl_method=(\w+), sasl_username=(\S+)`)
	m := env.postfix.log.wait(t, re)
	pid, client, gotMethod, user := m[1], m[2], m[3], m[4]
	if !strings.HasSuffix(client, want) || gotMethod != method || user != postfixUser {
		t.Errorf("Postfix logged %q, want client=...%s, sasl_method=%s, sasl_username=%s", m[0], want, method, postfixUser)
	}

	connectRE := regexp.MustCompile(`postfix(?:/[\w.-]+)*/smtpd\[` + pid + `\]: connect from (\S+)$`)
	var connect string
	for _, line := range env.postfix.log.lines() {
		if c := connectRE.FindStringSubmatch(line); c != nil {
			connect = c[1]
		}
		if re.MatchString(line) {
			break
		}
	}
	if !strings.HasSuffix(connect, want) {
		t.Errorf("Postfix's smtpd[%s] logged the session's connection as %q, want \"connect from ...%s\"; log:\n%s",
			pid, connect, want, env.postfix.log.tail())
	}
}

// checkReceived checks the Received: header Postfix added to the message
// that reached the sink.
func checkReceived(t *testing.T, env *postfixBackends, token, queueID string) {
	t.Helper()
	msg := env.sink.wait(t, token)
	received := messageHeader(t, msg).Values("Received")
	if len(received) == 0 {
		t.Fatalf("the relayed message has no Received: header:\n%s", msg)
	}
	// the topmost one is Postfix's, for the session with the client: its
	// TCP-info has the client's address literal, its id clause the queue
	// ID (RFC 5321 4.4)
	r := received[0]
	if !strings.Contains(r, "["+clientIP+"])") || !strings.Contains(r, " id "+queueID) {
		t.Errorf("Received: %q, want Postfix's line for queue ID %s from [%s]", r, queueID, clientIP)
	}
	if strings.Contains(r, "127.0.0.1") {
		t.Errorf("Received: %q names the edge's address", r)
	}
	// ESMTPA or UTF8SMTPA: Postfix saw AUTH but no TLS (that would be
	// ESMTPSA): the edge terminated it
	if !receivedWith.MatchString(r) {
		t.Errorf("Received: %q, want \"with ESMTPA\" or \"with UTF8SMTPA\"", r)
	}
}

// testPostfixClientAddress: a client from 127.0.0.7 authenticates with AUTH
// PLAIN through the edge and sends a message; Postfix logs the session as
// from 127.0.0.7 and writes 127.0.0.7 into the Received: header.
func testPostfixClientAddress(t *testing.T, env *postfixEnv, l postfixListener) {
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), clientIP)
	token := uniqueToken(t)
	queueID := sendThroughPostfix(t, c, smtp.PlainAuth("", postfixUser, postfixPassword, firstHost), token)
	checkReceived(t, env.postfixBackends, token, queueID)
	checkPostfixSession(t, env.postfixBackends, queueID, "PLAIN")
}

// testPostfixAuthLogin: AUTH LOGIN after TLS, answered by Postfix (through
// Dovecot), and the message goes out.
func testPostfixAuthLogin(t *testing.T, env *postfixEnv, l postfixListener) {
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), clientIP)
	token := uniqueToken(t)
	queueID := sendThroughPostfix(t, c, loginAuth{postfixUser, postfixPassword}, token)
	checkReceived(t, env.postfixBackends, token, queueID)
	checkPostfixSession(t, env.postfixBackends, queueID, "LOGIN")
}

// testPostfixWrongPassword: a wrong password gets Postfix's 535 through the
// edge, after Dovecot really checked it (its log says so, with the client's
// address), and the session goes on. Each attempt comes from an address of
// its own: Dovecot delays further logins from an address with failed ones
// (its auth penalty, seconds), which would only slow the test down.
func testPostfixWrongPassword(t *testing.T, env *postfixEnv, l postfixListener, ip, mech string) {
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), ip)
	code, msg := authSteps(t, c.Text, wrongPasswordSteps(mech))
	// 535 5.7.8: authentication credentials invalid (RFC 4954 6)
	if code != 535 || !strings.HasPrefix(msg, "5.7.8 ") {
		t.Fatalf("AUTH %s with a wrong password: %d %s, want Postfix's 535 5.7.8", mech, code, msg)
	}
	env.dovecot.log.wait(t, dovecotPasswordMismatch(ip))
	if err := c.Noop(); err != nil {
		t.Fatalf("NOOP after the failed login: %v", err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
}

// dovecotPasswordMismatch matches the line Dovecot's auth process logs
// (auth_verbose) for a wrong password from ip: "passwd-file(user,ip,...):
// Password mismatch", the line fail2ban's dovecot filter reads.
func dovecotPasswordMismatch(ip string) *regexp.Regexp {
	return regexp.MustCompile(`passwd-file\(` + postfixUser + `,` + regexp.QuoteMeta(ip) + `[,)].*Password mismatch`)
}

// authSteps sends an AUTH command and then each further line after a 334
// challenge, and returns the final reply.
func authSteps(t *testing.T, tp *textproto.Conn, steps []string) (int, string) {
	t.Helper()
	for i, line := range steps {
		id, err := tp.Cmd("%s", line)
		if err != nil {
			t.Fatalf("sending %q: %v", line, err)
		}
		tp.StartResponse(id)
		code, msg, err := tp.ReadResponse(0)
		tp.EndResponse(id)
		if err != nil {
			t.Fatalf("reply to %q: %v", line, err)
		}
		if code != 334 || i == len(steps)-1 {
			return code, msg
		}
	}
	return 0, ""
}

// wrongPasswordSteps are the AUTH lines for postfixUser with a wrong
// password, for mech PLAIN or LOGIN, as authSteps sends them.
func wrongPasswordSteps(mech string) []string {
	b64 := base64.StdEncoding.EncodeToString
	if mech == "LOGIN" {
		return []string{"AUTH LOGIN", b64([]byte(postfixUser)), b64([]byte("wrong"))}
	}
	return []string{"AUTH PLAIN " + b64([]byte("\x00"+postfixUser+"\x00wrong"))}
}

// testPostfixNoAuthBeforeTLS: before STARTTLS the edge offers no AUTH and
// answers AUTH with 530; Postfix and Dovecot never hear of the session. The
// pre-TLS client uses an address of its own (preTLSIP); a later session from
// markerIP marks the point in Postfix's log by which the first would have
// been logged.
func testPostfixNoAuthBeforeTLS(t *testing.T, env *postfixEnv, l postfixListener, preTLSIP, markerIP string) {
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(preTLSIP)}}
	conn, err := d.Dial("tcp", l.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	tp := textproto.NewConn(conn)
	if _, _, err := tp.ReadResponse(220); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	id, _ := tp.Cmd("EHLO client.localhost")
	tp.StartResponse(id)
	_, msg, err := tp.ReadResponse(250)
	tp.EndResponse(id)
	if err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	if hasExtension(strings.Split(msg, "\n"), "AUTH") {
		t.Errorf("EHLO before TLS offers AUTH:\n%s", msg)
	}
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + postfixUser + "\x00" + postfixPassword))
	for _, cmd := range []string{"AUTH PLAIN " + plain, "AUTH LOGIN"} {
		id, _ := tp.Cmd("%s", cmd)
		tp.StartResponse(id)
		code, msg, err := tp.ReadResponse(530)
		tp.EndResponse(id)
		if err != nil {
			t.Errorf("%s before TLS: %d %s (%v), want 530", strings.Fields(cmd)[1], code, msg, err)
		}
	}
	id, _ = tp.Cmd("QUIT")
	tp.StartResponse(id)
	_, _, _ = tp.ReadResponse(221)
	tp.EndResponse(id)
	conn.Close()

	// a TLS session after it, which Postfix logs
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), markerIP)
	if err := c.Noop(); err != nil {
		t.Fatalf("NOOP: %v", err)
	}
	env.postfix.log.wait(t, regexp.MustCompile(`connect from \S*\[`+regexp.QuoteMeta(markerIP)+`\]`))
	if env.postfix.log.contains("[" + preTLSIP + "]") {
		t.Errorf("Postfix saw the session that never started TLS; log:\n%s", env.postfix.log.tail())
	}
	if env.dovecot.log.contains(preTLSIP) {
		t.Errorf("Dovecot saw the AUTH sent before TLS; log:\n%s", env.dovecot.log.tail())
	}
}

// testPostfixNoRelayWithoutAuth: a client without AUTH, connecting from the
// edge's own address 127.0.0.1 (in Postfix's default mynetworks), cannot
// relay: the edge answers MAIL and RCPT with 530 5.7.0 (require_auth, on by
// default), and Postfix, whose log counts the session's commands in its
// disconnect line, gets neither. (That the example's listener refuses such a
// client itself, with the edge's check off, is TestPostfixOpenRelay's.)
func testPostfixNoRelayWithoutAuth(t *testing.T, env *postfixEnv, l postfixListener) {
	// Postfix's record of a session from 127.0.0.1 that sent EHLO and QUIT
	// and nothing else; the other sessions from that address (caddy's
	// readiness probes, the other relay way's run of this test) are
	// counted before
	session := regexp.MustCompile(`/smtpd\[\d+\]: disconnect from \S*\[127\.0\.0\.1\] ehlo=1 quit=1 commands=2$`)
	before := env.postfix.log.count(session)

	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), "127.0.0.1")
	for _, cmd := range []func() error{
		func() error { return c.Mail("anyone@example.com") },
		func() error { return c.Rcpt("rcpt@example.net") },
	} {
		err := cmd()
		var te *textproto.Error
		if !errors.As(err, &te) || te.Code != 530 || !strings.HasPrefix(te.Msg, "5.7.0 ") {
			t.Fatalf("without AUTH: %v, want the edge's 530 5.7.0", err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	env.postfix.log.waitCount(t, session, before+1)
	for _, line := range env.postfix.log.lines() {
		if strings.Contains(line, "[127.0.0.1]") && strings.Contains(line, " mail=") {
			t.Errorf("Postfix got a MAIL from 127.0.0.1: %s", line)
		}
	}
}
