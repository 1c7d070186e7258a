package integration

import (
	"fmt"
	"net"
	"net/smtp"
	"net/textproto"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The Exim backend: Debian's Exim (exim4-daemon-heavy, unpacked by
// integration/install-exim.sh, since installing it would remove Postfix)
// started by the test as root with a configuration of its own: a base that
// gives it private directories, examples/exim/exim.conf as it is (the edge's
// listener with hosts_proxy, the RCPT ACL, AUTH PLAIN and LOGIN), and a
// router and transport that send every message to a go-smtp sink in this
// process, where the test reads it back.

const (
	// eximPathEnv names another Exim binary than eximDefaultPath.
	eximPathEnv = "SMTP_EDGE_EXIM"
	// eximDefaultPath is where integration/install-exim.sh puts Exim.
	eximDefaultPath = "/opt/exim4-daemon-heavy/usr/sbin/exim4"
	// eximUser is the user Debian's Exim is compiled to run as.
	eximUser = "Debian-exim"
)

// eximEnviron is the whole environment Exim runs with (it would purge
// anything else, with a warning).
var eximEnviron = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}

// requireExim returns the path of an Exim with PROXY support, or skips (fails
// in CI) when there is none or the test does not run as root.
func requireExim(t *testing.T) string {
	t.Helper()
	path := os.Getenv(eximPathEnv)
	if path == "" {
		path = eximDefaultPath
	}
	if _, err := os.Stat(path); err != nil {
		skipOrFail(t, fmt.Sprintf("no Exim at %s (%v): run integration/install-exim.sh as root (it unpacks "+
			"Debian's exim4-daemon-heavy into %s without installing it: installing it would remove Postfix), "+
			"or name another Exim with PROXY support in %s", path, err, filepath.Dir(filepath.Dir(filepath.Dir(eximDefaultPath))), eximPathEnv))
	}
	if os.Geteuid() != 0 {
		skipOrFail(t, "a private Exim instance must be started as root")
	}
	out, err := runBounded(mtaStartTimeout, eximEnviron, path, "-C", "/dev/null", "-bV")
	if err != nil {
		skipOrFail(t, fmt.Sprintf("%s -bV: %v (integration/install-exim.sh creates the %s user it needs)\n%s", path, err, eximUser, out))
	}
	// PROXY support, by the exit status of a configuration check: Exim
	// knows the option hosts_proxy only when built with it (SUPPORT_PROXY),
	// and refuses a configuration with an unknown option
	probe := filepath.Join(t.TempDir(), "proxy-probe.conf")
	if err := os.WriteFile(probe, []byte("keep_environment =\nhosts_proxy = 127.0.0.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := runBounded(mtaStartTimeout, eximEnviron, path, "-C", probe, "-bV"); err != nil {
		skipOrFail(t, fmt.Sprintf("%s refuses hosts_proxy (%v): it is built without PROXY support "+
			"(Debian: exim4-daemon-light; use -heavy)\n%s", path, err, out))
	}
	return path
}

// eximBaseConf is the main section a private Exim starts with, before the
// example's: its own spool, log and pid file, the binary it re-executes for
// deliveries, and no environment.
const eximBaseConf = `# written by integration/exim_test.go
exim_path = {{EXIM}}
primary_hostname = exim.localhost
spool_directory = {{DIR}}/spool
log_file_path = {{DIR}}/log/%slog
pid_file_path = {{DIR}}/exim.pid
keep_environment =

`

// eximSinkConf comes after the example: every message goes to the sink.
const eximSinkConf = `

# written by integration/exim_test.go
begin routers

to_sink:
  driver = manualroute
  route_list = * 127.0.0.1 byname
  self = send
  transport = to_sink

begin transports

to_sink:
  driver = smtp
  port = {{SINKPORT}}
  allow_localhost
`

// eximInstance is a private Exim daemon (exim -bdf), a child of the test.
type eximInstance struct {
	*daemon
	log logFile // mainlog
}

// startExim writes conf into dir, runs the Exim daemon in the foreground on
// it as root, and waits until every address of listen accepts connections.
// It is stopped with SIGTERM (then SIGKILL to its process group) at cleanup;
// its configuration and logs are printed if t failed.
func startExim(t *testing.T, exim, dir, conf string, listen []string) *eximInstance {
	t.Helper()
	owner, err := user.Lookup(eximUser)
	if err != nil {
		t.Fatalf("Exim's user: %v", err)
	}
	uid, _ := strconv.Atoi(owner.Uid)
	gid, _ := strconv.Atoi(owner.Gid)
	// the spool and the logs belong to the Exim user: it receives and
	// delivers as that user
	for _, d := range []string{filepath.Join(dir, "spool"), filepath.Join(dir, "log")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(d, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	confPath := filepath.Join(dir, "exim.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := runBounded(mtaStartTimeout, eximEnviron, exim, "-C", confPath, "-bV"); err != nil {
		t.Fatalf("Exim refuses the configuration: %v\n%s\n%s", err, out, numberLines(conf))
	}

	cmd := exec.Command(exim, "-C", confPath, "-bdf")
	cmd.Env = eximEnviron
	e := &eximInstance{
		daemon: startDaemon(t, "Exim", cmd),
		log:    logFile{path: filepath.Join(dir, "log", "mainlog")},
	}
	t.Cleanup(func() {
		e.stop(t)
		if t.Failed() {
			panicLog, _ := os.ReadFile(filepath.Join(dir, "log", "paniclog"))
			t.Logf("exim.conf:\n%s\nExim output:\n%s\nExim mainlog (%s):\n%s\npaniclog:\n%s",
				numberLines(conf), e.output(), e.log.path, e.log.tail(), panicLog)
		}
	})
	for _, addr := range listen {
		if err := waitListening(addr, mtaStartTimeout, e.exited); err != nil {
			t.Fatalf("Exim: %v\n%s\n%s", err, e.output(), e.log.tail())
		}
	}
	return e
}

// numberLines prefixes each line of text with its number (Exim's errors
// name configuration lines).
func numberLines(text string) string {
	var b strings.Builder
	for i, line := range strings.Split(text, "\n") {
		fmt.Fprintf(&b, "%4d  %s\n", i+1, line)
	}
	return b.String()
}

// eximPasswd writes an /etc/exim4/passwd of Debian's format (user:crypt
// hash) for name and password, readable by Exim's group, as Debian has it.
func eximPasswd(t *testing.T, path, name, password string) {
	t.Helper()
	requireTool(t, "openssl", "openssl")
	cmd := exec.Command("openssl", "passwd", "-6", "-stdin")
	cmd.Stdin = strings.NewReader(password + "\n")
	hash, err := cmd.Output()
	if err != nil {
		t.Fatalf("openssl passwd -6: %v", err)
	}
	if err := os.WriteFile(path, []byte(name+":"+strings.TrimSpace(string(hash))+"\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	group, err := user.LookupGroup(eximUser)
	if err != nil {
		t.Fatalf("Exim's group: %v", err)
	}
	gid, _ := strconv.Atoi(group.Gid)
	if err := os.Chown(path, 0, gid); err != nil {
		t.Fatal(err)
	}
}

type eximEnv struct {
	proc    *caddyProc
	exim    *eximInstance
	sink    *mtaSink
	backend string // the edge's listener in Exim (PROXY required)
	local   string // Exim's other listener, as a local program uses it
	edges   proxyEdges
}

// startEximEnv starts the sink, Exim with the example, and one caddy with
// eight edges into Exim (see startProxyEdges).
func startEximEnv(t *testing.T) *eximEnv {
	t.Helper()
	exim := requireExim(t)
	dir := mtaTempDir(t)
	env := &eximEnv{sink: startMTASink(t), backend: freeAddr(t), local: freeAddr(t)}
	_, backendPort, _ := net.SplitHostPort(env.backend)
	_, localPort, _ := net.SplitHostPort(env.local)
	_, sinkPort, _ := net.SplitHostPort(env.sink.addr)
	passwd := filepath.Join(dir, "passwd")
	eximPasswd(t, passwd, postfixUser, postfixPassword)

	conf := strings.NewReplacer("{{EXIM}}", exim, "{{DIR}}", dir).Replace(eximBaseConf) +
		readExample(t, "exim/exim.conf", map[string]string{
			"[127.0.0.1]:25 ; [::1]:25": "[127.0.0.1]:" + localPort,
			"10587":                     backendPort,
			"/etc/exim4/passwd":         passwd,
		}) +
		strings.NewReplacer("{{SINKPORT}}", sinkPort).Replace(eximSinkConf)
	env.exim = startExim(t, exim, dir, conf, []string{env.backend, env.local})

	env.proc, env.edges = startProxyEdges(t, env.backend)
	return env
}

// TestEximBehindEdge runs Exim behind the edge with examples/exim/exim.conf:
// PROXY v1 and v2 from the smtp handler's backend option and from caddy-l4's
// proxy, on implicit TLS and STARTTLS, the
// client's own address in Exim's log and in the Received: header of the
// message it relays to a go-smtp sink, AUTH PLAIN and LOGIN after TLS, a
// wrong password, no relaying without AUTH (refused by the edge, and by the
// example's ACL should it get there), and hosts_proxy confined to the edge's
// listener.
func TestEximBehindEdge(t *testing.T) {
	env := startEximEnv(t)

	for w, way := range relayWays {
		listeners := env.edges[way]
		t.Run(string(way), func(t *testing.T) {
			for _, l := range listeners {
				t.Run("client address/"+l.String(), func(t *testing.T) {
					testEximDelivery(t, env, l, "PLAIN")
				})
			}
			for _, l := range listeners[:2] {
				t.Run("AUTH LOGIN/"+l.mode.String(), func(t *testing.T) {
					testEximDelivery(t, env, l, "LOGIN")
				})
			}
			for i, c := range []struct{ ip, mech string }{
				{wayIP(w, 11), "PLAIN"}, {wayIP(w, 12), "LOGIN"}, // implicit TLS
				{wayIP(w, 13), "PLAIN"}, {wayIP(w, 14), "LOGIN"}, // STARTTLS
			} {
				l := listeners[i/2]
				t.Run("wrong password/"+c.mech+"/"+l.mode.String(), func(t *testing.T) {
					testEximWrongPassword(t, env, l, c.ip, c.mech)
				})
			}
			t.Run("no relay without AUTH from the edge's address", func(t *testing.T) {
				testEximNoRelayWithoutAuth(t, env, listeners[0], fmt.Sprintf("anyone%d@example.com", w))
			})
		})
	}
	// Exim alone, without the edge
	t.Run("no relay without AUTH by the example's ACL", func(t *testing.T) {
		testEximACLWithoutAuth(t, env)
	})
	t.Run("edge listener requires PROXY", func(t *testing.T) {
		testEximProxyRequired(t, env)
	})
	t.Run("local listener without PROXY", func(t *testing.T) {
		testEximLocalListener(t, env)
	})
}

// eximQueued finds the message ID in Exim's reply to the final dot, "250
// OK id=<message id>": the ID by which Exim's log and Received: lines name
// the message, which clients and log tools correlate by.
var eximQueued = regexp.MustCompile(`\bid=([0-9A-Za-z-]+)`)

// eximReceivedWith is the protocol in Exim's Received: line for a client
// that authenticated without TLS (net/smtp asks for SMTPUTF8 when offered):
// the edge terminated TLS, so for Exim there was none (that would be
// esmtpsa). The names are the registered "with" protocol types (RFC 3848,
// RFC 6531), which Exim writes in lower case.
var eximReceivedWith = regexp.MustCompile(` with (esmtpa|utf8esmtpa) `)

// testEximDelivery: a client from 127.0.0.7 authenticates with mech through
// the edge and sends a message; Exim logs its arrival as from 127.0.0.7 by
// way of the edge (PRX=127.0.0.1), and the message reaches the sink with
// Exim's Received: line naming 127.0.0.7.
func testEximDelivery(t *testing.T, env *eximEnv, l postfixListener, mech string) {
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), clientIP)
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") || !strings.Contains(mechs, "LOGIN") {
		t.Fatalf("EHLO after TLS offers AUTH %q (present: %v), want Exim's PLAIN and LOGIN", mechs, ok)
	}
	if ok, _ := c.Extension("STARTTLS"); ok {
		t.Errorf("EHLO after TLS offers STARTTLS (Exim does; the edge must remove it)")
	}
	var auth smtp.Auth = loginAuth{postfixUser, postfixPassword}
	if mech == "PLAIN" {
		auth = smtp.PlainAuth("", postfixUser, postfixPassword, firstHost)
	}
	if err := c.Auth(auth); err != nil {
		t.Fatalf("AUTH %s: %v", mech, err)
	}
	token := uniqueToken(t)
	reply, err := deliverQueued(c, postfixUser+"@example.com", []string{"rcpt@example.com"},
		testMessage(token, "through the edge into Exim"))
	if err != nil {
		t.Fatalf("delivery: %v", err)
	}
	m := eximQueued.FindStringSubmatch(reply)
	if m == nil {
		t.Fatalf("the reply to DATA %q names no message ID", reply)
	}
	id := m[1]
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}

	// the arrival: client address, protocol (AUTH without TLS: Exim never
	// saw the edge's TLS; utf8 when the client asked for SMTPUTF8),
	// authenticator, and the edge as the proxy. The fields of Exim's "<="
	// line (H=, P=, A=, PRX=) are documented in the Exim specification's
	// chapter on log files, and read by eximstats and log parsers.
	line := env.exim.log.wait(t, regexp.MustCompile(regexp.QuoteMeta(id)+` <= .*`))[0]
	want := regexp.MustCompile(`<= ` + postfixUser + `@example\.com H=\(client\.localhost\) \[` + regexp.QuoteMeta(clientIP) +
		`\] P=(esmtpa|utf8esmtpa) A=` + strings.ToLower(mech) + `_server:` + postfixUser + ` PRX=127\.0\.0\.1 `)
	if !want.MatchString(line) {
		t.Errorf("Exim logged the arrival as %q, want it to match %s", line, want)
	}

	received := messageHeader(t, env.sink.wait(t, token)).Values("Received")
	if len(received) == 0 {
		t.Fatal("the relayed message has no Received: header")
	}
	// the topmost one is Exim's, for the session with the client
	r := received[0]
	if !strings.Contains(r, "["+clientIP+"]") || !eximReceivedWith.MatchString(r) || !strings.Contains(r, " id "+id) {
		t.Errorf("Received: %q, want Exim's line for message %s from [%s] with esmtpa or utf8esmtpa", r, id, clientIP)
	}
	if strings.Contains(r, "127.0.0.1") {
		t.Errorf("Received: %q names the edge's address", r)
	}
}

// testEximWrongPassword: a wrong password gets Exim's 535 through the edge,
// Exim logs the failure for the client's address, and the session goes on.
func testEximWrongPassword(t *testing.T, env *eximEnv, l postfixListener, ip, mech string) {
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), ip)
	code, msg := authSteps(t, c.Text, wrongPasswordSteps(mech))
	if code != 535 {
		t.Fatalf("AUTH %s with a wrong password: %d %s, want Exim's 535", mech, code, msg)
	}
	// Exim's "authenticator failed for" line, with the authenticator, the
	// client's address, the reply code and set_id: the line fail2ban's exim
	// filter reads (the reply's text after the code is left out)
	env.exim.log.wait(t, regexp.MustCompile(strings.ToLower(mech)+`_server authenticator failed for \(client\.localhost\) \[`+
		regexp.QuoteMeta(ip)+`\]: 535 .*\(set_id=`+postfixUser+`\)`))
	if err := c.Noop(); err != nil {
		t.Fatalf("NOOP after the failed login: %v", err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
}

// testEximNoRelayWithoutAuth: a client without AUTH that connects from the
// edge's own address 127.0.0.1 cannot relay: the edge answers its MAIL and
// RCPT with 530 5.7.0 itself (require_auth), and Exim never sees them. Exim
// logs a refused RCPT with its sender (testEximACLWithoutAuth), so after
// Exim's reply to QUIT its log has no line with this session's sender.
func testEximNoRelayWithoutAuth(t *testing.T, env *eximEnv, l postfixListener, sender string) {
	c := dialFrom(t, l.listener, env.proc.tlsConfig(firstHost), "127.0.0.1")
	if err := c.Mail(sender); !isReply(err, 530, "5.7.0") {
		t.Fatalf("MAIL without AUTH: %v, want the edge's 530 5.7.0", err)
	}
	if err := c.Rcpt("rcpt@example.net"); !isReply(err, 530, "5.7.0") {
		t.Fatalf("RCPT without AUTH: %v, want the edge's 530 5.7.0", err)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	for _, line := range env.exim.log.lines() {
		if strings.Contains(line, sender) {
			t.Errorf("Exim got the session's transaction: %q", line)
		}
	}
}

// testEximACLWithoutAuth: the example's ACL still refuses to relay for a
// session through the edge without AUTH, should one reach it (an edge with
// require_auth off): the test writes the PROXY v1 header an edge would for
// a client on the edge's own address, 127.0.0.1, and the RCPT gets the
// example's 550. The sender address finds the session's line in Exim's log.
func testEximACLWithoutAuth(t *testing.T, env *eximEnv) {
	conn, err := net.DialTimeout("tcp", env.backend, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	_, edgePort, _ := net.SplitHostPort(env.backend)
	if _, err := fmt.Fprintf(conn, "PROXY TCP4 127.0.0.1 127.0.0.1 50000 %s\r\n", edgePort); err != nil {
		t.Fatal(err)
	}
	tp := textproto.NewConn(conn)
	if code, msg, err := tp.ReadResponse(220); err != nil {
		t.Fatalf("greeting after the PROXY header: %d %s: %v", code, msg, err)
	}
	sender := "noauth-" + uniqueToken(t) + "@example.com"
	for _, step := range []struct {
		cmd  string
		code int
	}{
		{"EHLO client.localhost", 250},
		{"MAIL FROM:<" + sender + ">", 250},
	} {
		if code, msg := eximCommand(t, tp, step.cmd); code != step.code {
			t.Fatalf("%s: %d %s, want %d", step.cmd, code, msg, step.code)
		}
	}
	// "Authentication required" is the message of the example's own ACL
	// (examples/exim/exim.conf), not Exim's wording
	if code, msg := eximCommand(t, tp, "RCPT TO:<rcpt@example.net>"); code != 550 || !strings.Contains(msg, "Authentication required") {
		t.Fatalf("RCPT without AUTH: %d %s, want the example's 550 Authentication required", code, msg)
	}
	env.exim.log.wait(t, regexp.MustCompile(`H=\(client\.localhost\) \[127\.0\.0\.1\] F=<`+regexp.QuoteMeta(sender)+`> rejected RCPT <rcpt@example\.net>: Authentication required`))
	_, _ = eximCommand(t, tp, "QUIT")
}

// testEximProxyRequired: a connection from the edge's address to the edge's
// listener without a PROXY header (what the edge would send with its
// proxy_protocol switched off) gets 503 to every command, EHLO included,
// after Exim's proxy_protocol_timeout (3s): nothing is ever accepted in the
// edge's name. (testEximLocalListener shows that the same EHLO from the same
// address gets 250 on the listener without hosts_proxy.)
func testEximProxyRequired(t *testing.T, env *eximEnv) {
	tp, conn := eximDirect(t, env.backend)
	defer conn.Close()
	for _, cmd := range []string{"EHLO client.localhost", "MAIL FROM:<anyone@example.com>"} {
		if code, msg := eximCommand(t, tp, cmd); code != 503 {
			t.Errorf("%s without a PROXY header: %d %s, want Exim's 503 (Proxy negotiation failed)", cmd, code, msg)
		}
	}
}

// testEximLocalListener: Exim's other listener still serves a local program
// from 127.0.0.1 without a PROXY header (hosts_proxy applies to the edge's
// port only), and offers it no AUTH in plaintext.
func testEximLocalListener(t *testing.T, env *eximEnv) {
	tp, conn := eximDirect(t, env.local)
	defer conn.Close()
	code, msg := eximCommand(t, tp, "EHLO client.localhost")
	if code != 250 {
		t.Fatalf("EHLO on the local listener: %d %s", code, msg)
	}
	if hasExtension(strings.Split(msg, "\n"), "AUTH") {
		t.Errorf("Exim offers AUTH in plaintext outside the edge's listener:\n%s", msg)
	}
	_, _ = eximCommand(t, tp, "QUIT")
}

// eximDirect connects to an Exim listener from 127.0.0.1 without the edge
// and reads the greeting.
func eximDirect(t *testing.T, addr string) (*textproto.Conn, net.Conn) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	tp := textproto.NewConn(conn)
	if code, msg, err := tp.ReadResponse(220); err != nil {
		conn.Close()
		t.Fatalf("greeting: %d %s: %v", code, msg, err)
	}
	return tp, conn
}

// eximCommand sends one command and returns the reply.
func eximCommand(t *testing.T, tp *textproto.Conn, cmd string) (int, string) {
	t.Helper()
	id, err := tp.Cmd("%s", cmd)
	if err != nil {
		t.Fatalf("sending %q: %v", cmd, err)
	}
	tp.StartResponse(id)
	defer tp.EndResponse(id)
	code, msg, err := tp.ReadResponse(0)
	if err != nil && code == 0 {
		t.Fatalf("reply to %q: %v", cmd, err)
	}
	return code, msg
}
