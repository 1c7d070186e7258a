package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
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
	"sync"
	"syscall"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"
)

// Helpers for tests that run real MTAs (Postfix, Dovecot) as backends of the
// edge: private instances configured and started by the test as root, a
// go-smtp sink they relay into, log polling, and SMTP client steps that
// net/smtp lacks (a client bound to a chosen loopback address, AUTH LOGIN,
// the queue ID of the reply to DATA).

const (
	// mtaStartTimeout bounds starting an MTA and waiting for its port.
	mtaStartTimeout = 30 * time.Second
	// mtaLogTimeout bounds waiting for a line in an MTA's log, or for a
	// message to arrive in the sink.
	mtaLogTimeout = 30 * time.Second
)

// examplesDir is the repository's examples directory.
func examplesDir(t *testing.T) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "examples")
}

// readExample reads an example file (a path under examples/) and replaces
// each key of placeholders with its value. Every placeholder must occur in
// the file: an example that changes a value the test substitutes fails the
// test instead of silently testing something else.
func readExample(t *testing.T, name string, placeholders map[string]string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(examplesDir(t), name))
	if err != nil {
		t.Fatalf("reading the example: %v", err)
	}
	text := string(data)
	for from, to := range placeholders {
		if !strings.Contains(text, from) {
			t.Fatalf("examples/%s no longer contains %q, which the test replaces with %q", name, from, to)
		}
		text = strings.ReplaceAll(text, from, to)
	}
	return text
}

// requireRootMTA skips (or fails, in CI) unless the test runs as root and
// the named commands are installed.
func requireRootMTA(t *testing.T, tools map[string]string) {
	t.Helper()
	for name, pkg := range tools {
		requireTool(t, name, pkg)
	}
	if os.Geteuid() != 0 {
		skipOrFail(t, "a private Postfix/Dovecot instance must be started as root")
	}
}

// mtaTempDir is a temporary directory of t that the MTAs' unprivileged
// users (postfix, dovecot) can traverse: t.TempDir and its parent are 0700.
func mtaTempDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// runBounded runs a command with a bound on its run time and returns its
// combined output.
func runBounded(timeout time.Duration, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s %s: did not finish within %s", name, strings.Join(args, " "), timeout)
	}
	return string(out), err
}

// waitListening polls addr until it accepts a TCP connection, or until
// deadline. exited, when it becomes readable, ends the wait early.
func waitListening(addr string, timeout time.Duration, exited <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s: the server exited", addr)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s accepts no connection after %s: %v", addr, timeout, err)
		}
		time.Sleep(20 * time.Millisecond) // polling interval, not synchronisation
	}
}

// waitFile polls until path exists.
func waitFile(path string, timeout time.Duration, exited <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s: the server exited", path)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", path, timeout)
		}
		time.Sleep(20 * time.Millisecond) // polling interval, not synchronisation
	}
}

// logFile is an MTA's log file, read by polling.
type logFile struct{ path string }

// lines returns the log's complete lines so far.
func (l logFile) lines() []string {
	data, err := os.ReadFile(l.path)
	if err != nil {
		return nil
	}
	if i := bytes.LastIndexByte(data, '\n'); i >= 0 {
		data = data[:i+1]
	} else {
		data = nil
	}
	return scanLines(string(data))
}

// wait polls the log until a line matches re, and returns the first such
// line's submatches.
func (l logFile) wait(t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	deadline := time.Now().Add(mtaLogTimeout)
	for {
		for _, line := range l.lines() {
			if m := re.FindStringSubmatch(line); m != nil {
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no line matches %s within %s; the log:\n%s", l.path, re, mtaLogTimeout, l.tail())
		}
		time.Sleep(50 * time.Millisecond) // polling interval, not synchronisation
	}
}

// tail is the log's end, for failure messages.
func (l logFile) tail() string {
	lines := l.lines()
	return strings.Join(lines[max(0, len(lines)-60):], "\n")
}

// contains reports whether any line contains s.
func (l logFile) contains(s string) bool {
	for _, line := range l.lines() {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

// postfixInstance is a private Postfix: its own config, queue and data
// directories and log file, all under the test's directory.
type postfixInstance struct {
	stopOnce  sync.Once
	configDir string
	queueDir  string
	log       logFile
	env       []string
}

// postfixConfig is what a test adds to the base configuration of a private
// Postfix.
type postfixConfig struct {
	mainCF   string // appended to main.cf
	masterCF string // appended to master.cf
	listen   string // an address of masterCF to wait for
	relay    string // relayhost: where every message goes (host:port)
}

// postfixMainCF is the base main.cf of a private Postfix: loopback only, no
// local delivery, no DNS, every message relayed to one host, logging to a
// file (no syslog daemon is needed).
const postfixMainCF = `# written by integration/mta_helpers_test.go
compatibility_level = 3.6
queue_directory = {{DIR}}/queue
data_directory = {{DIR}}/data
maillog_file_prefixes = {{DIR}}
maillog_file = {{DIR}}/maillog
myhostname = mx.localhost
mydomain = localhost
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_peername_lookup = no
relayhost = [{{RELAYHOST}}]:{{RELAYPORT}}
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
append_dot_mydomain = no
# Postfix 3.9's default (set here for older ones): a client that talks
# before the greeting or pipelines without PIPELINING is refused. The edge
# must hold the client's post-STARTTLS EHLO until the backend has greeted.
smtpd_forbid_unauth_pipelining = yes
`

// postfixMasterCF is the base master.cf of a private Postfix: the internal
// services, none chrooted (the queue directory has no chroot environment),
// and postlogd for maillog_file. It has no listener of its own.
const postfixMasterCF = `# written by integration/mta_helpers_test.go
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`

// startPostfix writes a configuration directory under dir and starts Postfix
// on it as root (postfix -c DIR start), and waits until cfg.listen accepts
// connections. It is stopped (postfix stop, then abort, then SIGKILL to its
// master) when t's cleanup runs; its log is printed if t failed.
func startPostfix(t *testing.T, dir string, cfg postfixConfig) *postfixInstance {
	t.Helper()
	p := &postfixInstance{
		configDir: filepath.Join(dir, "etc"),
		queueDir:  filepath.Join(dir, "queue"),
		log:       logFile{path: filepath.Join(dir, "maillog")},
	}
	p.env = append(environWithout("MAIL_CONFIG"), "MAIL_CONFIG="+p.configDir)
	dataDir := filepath.Join(dir, "data")
	for _, d := range []string{p.configDir, p.queueDir, dataDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// the data directory belongs to the mail_owner; postfix start creates
	// the queue's subdirectories with their owners itself
	owner, err := user.Lookup("postfix")
	if err != nil {
		t.Fatalf("Postfix's mail_owner: %v", err)
	}
	uid, _ := strconv.Atoi(owner.Uid)
	gid, _ := strconv.Atoi(owner.Gid)
	if err := os.Chown(dataDir, uid, gid); err != nil {
		t.Fatal(err)
	}

	relayHost, relayPort, err := net.SplitHostPort(cfg.relay)
	if err != nil {
		t.Fatalf("relay %q: %v", cfg.relay, err)
	}
	mainCF := strings.NewReplacer("{{DIR}}", dir, "{{RELAYHOST}}", relayHost, "{{RELAYPORT}}", relayPort).
		Replace(postfixMainCF) + "\n" + cfg.mainCF
	masterCF := postfixMasterCF + "\n" + cfg.masterCF
	if err := os.WriteFile(filepath.Join(p.configDir, "main.cf"), []byte(mainCF), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p.configDir, "master.cf"), []byte(masterCF), 0o644); err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			cfgOut, _ := os.ReadFile(filepath.Join(p.configDir, "main.cf"))
			masterOut, _ := os.ReadFile(filepath.Join(p.configDir, "master.cf"))
			t.Logf("Postfix main.cf:\n%s\nmaster.cf:\n%s\nPostfix log (%s):\n%s", cfgOut, masterOut, p.log.path, p.log.tail())
		}
	})
	out, err := runBounded(mtaStartTimeout, p.env, "postfix", "-c", p.configDir, "start")
	if err != nil {
		check, _ := runBounded(mtaStartTimeout, p.env, "postfix", "-c", p.configDir, "check")
		t.Fatalf("postfix -c %s start: %v\n%s\npostfix check:\n%s", p.configDir, err, out, check)
	}
	if err := waitListening(cfg.listen, mtaStartTimeout, nil); err != nil {
		check, _ := runBounded(mtaStartTimeout, p.env, "postfix", "-c", p.configDir, "check")
		t.Fatalf("Postfix: %v\npostfix check:\n%s\nlog:\n%s", err, check, p.log.tail())
	}
	return p
}

// masterPID is the PID of Postfix's master, or 0.
func (p *postfixInstance) masterPID() int {
	data, err := os.ReadFile(filepath.Join(p.queueDir, "pid", "master.pid"))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		return 0
	}
	return pid
}

// stop ends Postfix: postfix stop (which waits for the master to exit),
// then postfix abort, then SIGKILL to the master and its process group. Only
// the first call does anything.
func (p *postfixInstance) stop(t *testing.T) {
	p.stopOnce.Do(func() { p.stopNow(t) })
}

func (p *postfixInstance) stopNow(t *testing.T) {
	pid := p.masterPID()
	out, err := runBounded(stopTimeout, p.env, "postfix", "-c", p.configDir, "stop")
	if err == nil && waitGone(pid, stopTimeout) {
		return
	}
	t.Logf("postfix stop: %v\n%s", err, out)
	out, err = runBounded(stopTimeout, p.env, "postfix", "-c", p.configDir, "abort")
	if err == nil && waitGone(pid, stopTimeout) {
		return
	}
	t.Logf("postfix abort: %v\n%s", err, out)
	if pid > 1 {
		// the master is a session leader: its group holds its children
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		if !waitGone(pid, stopTimeout) {
			t.Errorf("Postfix master %d is still running after SIGKILL", pid)
		}
	}
}

// processAlive reports whether a process with pid exists (and is not a
// zombie).
func processAlive(pid int) bool {
	if pid <= 1 {
		return false
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...
	s := string(data)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// waitGone polls until pid has exited.
func waitGone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond) // polling interval, not synchronisation
	}
	return true
}

// dovecotAuth is a private Dovecot that runs only its auth service (no
// IMAP/POP3 listeners), in the foreground as a child of the test.
type dovecotAuth struct {
	*daemon
	log logFile
}

// dovecotBaseConf is the base dovecot.conf of a private auth-only Dovecot:
// its own run directory and log, no protocols, one passwd-file user.
// auth_failure_delay is Dovecot's pause before answering a failed login (2s
// by default); the test does not need it.
const dovecotBaseConf = `# written by integration/mta_helpers_test.go
instance_name = {{NAME}}
base_dir = {{DIR}}/run
state_dir = {{DIR}}/state
log_path = {{DIR}}/dovecot.log
protocols =
ssl = no
auth_verbose = yes
auth_failure_delay = 0
passdb {
  driver = passwd-file
  args = scheme=PLAIN {{DIR}}/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
`

// startDovecotAuth writes dovecot.conf (the base, then extra) and a
// passwd-file with users under dir, runs dovecot -F on it, and waits until
// socket exists. It is stopped with SIGTERM (then SIGKILL) at cleanup.
func startDovecotAuth(t *testing.T, dir string, users map[string]string, extra, socket string) *dovecotAuth {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var passwd strings.Builder
	for user, password := range users {
		fmt.Fprintf(&passwd, "%s:{PLAIN}%s\n", user, password)
	}
	if err := os.WriteFile(filepath.Join(dir, "users"), []byte(passwd.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("dovecot-edge-test-%d", time.Now().UnixNano())
	conf := strings.NewReplacer("{{DIR}}", dir, "{{NAME}}", name).Replace(dovecotBaseConf) + "\n" + extra
	confPath := filepath.Join(dir, "dovecot.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &dovecotAuth{
		daemon: startDaemon(t, "Dovecot", exec.Command("dovecot", "-F", "-c", confPath)),
		log:    logFile{path: filepath.Join(dir, "dovecot.log")},
	}
	t.Cleanup(func() {
		d.stop(t)
		if t.Failed() {
			t.Logf("dovecot.conf:\n%s\nDovecot output:\n%s\nDovecot log (%s):\n%s", conf, d.output(), d.log.path, d.log.tail())
		}
	})
	if err := waitFile(socket, mtaStartTimeout, d.exited); err != nil {
		t.Fatalf("Dovecot: %v\n%s\n%s", err, d.output(), d.log.tail())
	}
	return d
}

// daemon is an MTA running in the foreground as a child of the test, in its
// own process group, so that the sessions and deliveries it forks can be
// killed with it.
type daemon struct {
	name   string
	cmd    *exec.Cmd
	out    lockedBuffer // its standard output and error
	exited chan struct{}
}

// startDaemon starts cmd as a daemon named name (for messages). The caller
// stops it.
func startDaemon(t *testing.T, name string, cmd *exec.Cmd) *daemon {
	t.Helper()
	d := &daemon{name: name, cmd: cmd, out: lockedBuffer{b: new(bytes.Buffer)}, exited: make(chan struct{})}
	cmd.Stdout = &d.out
	cmd.Stderr = &d.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		_ = cmd.Wait()
		close(d.exited)
	}()
	return d
}

// output is what the daemon has written so far.
func (d *daemon) output() string {
	d.out.mu.Lock()
	defer d.out.mu.Unlock()
	return d.out.b.String()
}

// stop ends the daemon: SIGTERM, SIGKILL to its process group if it has not
// exited within stopTimeout, and SIGKILL to children that outlived it (they
// exit on their own when it goes; this only bounds the wait).
func (d *daemon) stop(t *testing.T) {
	pid := d.cmd.Process.Pid
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(stopTimeout):
		t.Errorf("%s did not exit within %s of SIGTERM; killing it", d.name, stopTimeout)
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-d.exited
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  *bytes.Buffer
}

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// mtaSink is an SMTP server in the test process, on a loopback port, that an
// MTA relays into. It keeps every message, keyed by the token in its
// Subject (see testMessage).
type mtaSink struct {
	addr string

	mu       sync.Mutex
	messages map[string][]byte
	arrived  chan struct{} // closed and replaced on each message
}

func startMTASink(t *testing.T) *mtaSink {
	t.Helper()
	s := &mtaSink{messages: make(map[string][]byte), arrived: make(chan struct{})}
	s.addr = serveSink(t, s)
	return s
}

// serveSink serves be as an SMTP server an MTA relays into, on a loopback
// port, until the test ends, and returns its address.
func serveSink(t *testing.T, be gosmtp.Backend) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := gosmtp.NewServer(be)
	srv.Domain = "sink.localhost"
	srv.MaxMessageBytes = 50 << 20
	srv.ReadTimeout = ioTimeout
	srv.WriteTimeout = ioTimeout
	srv.EnableSMTPUTF8 = true
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return ln.Addr().String()
}

func (s *mtaSink) NewSession(*gosmtp.Conn) (gosmtp.Session, error) {
	return &mtaSinkSession{sink: s}, nil
}

// wait returns the message whose Subject is token, waiting for it to arrive.
func (s *mtaSink) wait(t *testing.T, token string) []byte {
	t.Helper()
	timer := time.NewTimer(mtaLogTimeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		msg, ok := s.messages[token]
		arrived := s.arrived
		s.mu.Unlock()
		if ok {
			return msg
		}
		select {
		case <-arrived:
		case <-timer.C:
			t.Fatalf("the message %s did not arrive in the sink within %s", token, mtaLogTimeout)
		}
	}
}

type mtaSinkSession struct{ sink *mtaSink }

func (*mtaSinkSession) Mail(string, *gosmtp.MailOptions) error { return nil }
func (*mtaSinkSession) Rcpt(string, *gosmtp.RcptOptions) error { return nil }
func (*mtaSinkSession) Reset()                                 {}
func (*mtaSinkSession) Logout() error                          { return nil }

func (s *mtaSinkSession) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	hdr, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(data))).ReadMIMEHeader()
	if err != nil {
		return &gosmtp.SMTPError{Code: 554, EnhancedCode: gosmtp.EnhancedCode{5, 6, 0}, Message: "unparsable header"}
	}
	s.sink.mu.Lock()
	defer s.sink.mu.Unlock()
	s.sink.messages[hdr.Get("Subject")] = data
	close(s.sink.arrived)
	s.sink.arrived = make(chan struct{})
	return nil
}

// messageHeader parses the header of a message.
func messageHeader(t *testing.T, msg []byte) textproto.MIMEHeader {
	t.Helper()
	hdr, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(msg))).ReadMIMEHeader()
	if err != nil {
		t.Fatalf("parsing the message's header: %v\n%s", err, msg)
	}
	return hdr
}

// dialFrom connects to l from the loopback address localIP (127.0.0.7, say),
// completes TLS (implicit, or after EHLO and STARTTLS) and EHLO, and returns
// the client. It is closed at t's cleanup.
func dialFrom(t *testing.T, l listener, cfg *tls.Config, localIP string) *smtp.Client {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	conn, err := d.Dial("tcp", l.addr)
	if err != nil {
		t.Fatalf("%s (%s) from %s: %v", l.name, l.addr, localIP, err)
	}
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	if l.mode == implicitTLS {
		tlsConn := tls.Client(conn, cfg)
		if err := tlsConn.Handshake(); err != nil {
			conn.Close()
			t.Fatalf("%s: TLS handshake: %v", l.name, err)
		}
		conn = tlsConn
	}
	c, err := smtp.NewClient(conn, firstHost)
	if err != nil {
		conn.Close()
		t.Fatalf("%s: greeting: %v", l.name, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Hello("client.localhost"); err != nil {
		t.Fatalf("%s: EHLO: %v", l.name, err)
	}
	if l.mode == startTLS {
		if err := c.StartTLS(cfg); err != nil {
			t.Fatalf("%s: STARTTLS: %v", l.name, err)
		}
	}
	if _, ok := c.TLSConnectionState(); !ok {
		t.Fatalf("%s: the session is not on TLS", l.name)
	}
	return c
}

// loginAuth is AUTH LOGIN for net/smtp (which has PLAIN and CRAM-MD5 only).
// Like smtp.PlainAuth it refuses to send the password without TLS.
type loginAuth struct{ user, password string }

func (a loginAuth) Start(server *smtp.ServerInfo) (string, []byte, error) {
	if !server.TLS {
		return "", nil, errors.New("AUTH LOGIN without TLS")
	}
	return "LOGIN", nil, nil
}

func (a loginAuth) Next(fromServer []byte, more bool) ([]byte, error) {
	if !more {
		return nil, nil
	}
	switch strings.ToLower(strings.TrimSpace(string(fromServer))) {
	case "username:":
		return []byte(a.user), nil
	case "password:":
		return []byte(a.password), nil
	}
	return nil, fmt.Errorf("unexpected AUTH LOGIN challenge %q", fromServer)
}

// deliverQueued sends one message like deliver, and returns the text of the
// server's reply to the final dot (Postfix: "2.0.0 Ok: queued as ID").
func deliverQueued(c *smtp.Client, from string, to []string, msg []byte) (string, error) {
	if err := c.Mail(from); err != nil {
		return "", err
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt); err != nil {
			return "", err
		}
	}
	id, err := c.Text.Cmd("DATA")
	if err != nil {
		return "", err
	}
	c.Text.StartResponse(id)
	_, _, err = c.Text.ReadResponse(354)
	c.Text.EndResponse(id)
	if err != nil {
		return "", err
	}
	w := c.Text.DotWriter()
	if _, err := w.Write(msg); err != nil {
		return "", err
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	_, text, err := c.Text.ReadResponse(250)
	return text, err
}

// count is the number of lines that match re.
func (l logFile) count(re *regexp.Regexp) int {
	n := 0
	for _, line := range l.lines() {
		if re.MatchString(line) {
			n++
		}
	}
	return n
}

// waitCount polls the log until at least n lines match re (for a line that
// recurs once per session, as the sessions of a test add up).
func (l logFile) waitCount(t *testing.T, re *regexp.Regexp, n int) {
	t.Helper()
	deadline := time.Now().Add(mtaLogTimeout)
	for {
		count := 0
		for _, line := range l.lines() {
			if re.MatchString(line) {
				count++
			}
		}
		if count >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d lines match %s after %s, want %d; the log:\n%s", l.path, count, re, mtaLogTimeout, n, l.tail())
		}
		time.Sleep(50 * time.Millisecond) // polling interval, not synchronisation
	}
}
