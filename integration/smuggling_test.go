package integration

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"
)

// SMTP smuggling (CVE-2023-51764/5/6) through the edge into a real Postfix
// that reads a non-standard end of data: Debian 12's Postfix 3.7.11 with
// smtpd_forbid_bare_newline = no (its default, set here explicitly), the
// default smtpd_forbid_bare_newline_exclusions ($mynetworks), and its
// default smtpd_forbid_unauth_pipelining = no (the harness's base main.cf
// sets yes, with which Postfix hangs up on the content pipelined after a
// smuggled DATA, so that only the first, cut, message is stored). The clients
// authenticate (AUTH PLAIN, checked by Dovecot through Postfix's SASL), as
// the edge will require it before MAIL.

// smugglingVariant is a fake end of data as a public scanner sends it: the
// bytes after the line before it, and the bytes the scanner puts between it
// and the smuggled commands.
type smugglingVariant struct {
	source string // the scanner, and the name or list it has the variant under
	eod    string
	after  string
}

func (v smugglingVariant) String() string {
	return v.source + " " + strconv.Quote(v.eod)
}

// smugglingVariants are the end-of-data variants of two public scanners,
// read from their repositories (not vendored):
//   - The-Login/SMTP-Smuggling-Tools, smtp_smuggling_scanner.py,
//     outbound_eod_sequences (its inbound_eod_sequences are a subset). Its
//     message template has CRLF before and after the variant.
//   - hannob/smtpsmug, smtpsmug, the tests table (all but "pipelining").
//     It sends the variant after a CRLF-ended line and nothing after it.
var smugglingVariants = []smugglingVariant{
	{"The-Login outbound_eod_sequences", "\n.\n", "\r\n"},
	{"The-Login outbound_eod_sequences", "\n.\r", "\r\n"},
	{"The-Login outbound_eod_sequences", "\r.\n", "\r\n"},
	{"The-Login outbound_eod_sequences", "\r.\r", "\r\n"},
	{"The-Login outbound_eod_sequences", "\n.\r\n", "\r\n"},
	{"The-Login outbound_eod_sequences", "\r.\r\n", "\r\n"},
	{"The-Login outbound_eod_sequences", "\r\n.\r\r\n", "\r\n"},
	{"The-Login outbound_eod_sequences", "\r\r\n.\r\r\n", "\r\n"},
	{"The-Login outbound_eod_sequences", "\r\n\x00.\r\n", "\r\n"},
	{"hannob lflf", "\n.\n", ""},
	{"hannob crcr", "\r.\r", ""},
	{"hannob crlf", "\r.\n", ""},
	{"hannob lfcr", "\n.\r", ""},
	{"hannob lfcrlf", "\n.\r\n", ""},
	{"hannob crlflf", "\r\n.\n", ""},
	{"hannob crcrlf", "\r.\r\n", ""},
	{"hannob crlfcr", "\r\n.\r", ""},
	{"hannob nullbefore", "\r\n\x00.\r\n", ""},
	{"hannob nullafter", "\r\n.\x00\r\n", ""},
}

const smuggledSender = "smuggled@example.net"

// smugglingEnv is a Postfix with Dovecot SASL, relaying every message it
// accepts into a recording sink, and one caddy with edges into it.
type smugglingEnv struct {
	postfixAddr string
	postfix     *postfixInstance
	sink        *recordingSink
	proc        *caddyProc
	edges       []postfixListener // PROXY v2, implicit TLS and STARTTLS, the edge's own backend option

	mu     sync.Mutex
	nextIP int
}

func startSmugglingEnv(t *testing.T) *smugglingEnv {
	t.Helper()
	requireRootMTA(t, map[string]string{"postfix": "postfix", "dovecot": "dovecot-core"})

	dir := mtaTempDir(t)
	env := &smugglingEnv{sink: startRecordingSink(t), postfixAddr: freeAddr(t), nextIP: 100}
	queueDir := filepath.Join(dir, "queue")
	// The listener of examples/postfix/master.cf, written out here rather
	// than read from the example: the test needs Postfix at its most
	// permissive reading of the end of data whatever the example comes to
	// recommend.
	masterCF := env.postfixAddr + ` inet n - n - - smtpd
  -o syslog_name=postfix/submission-edge
  -o smtpd_upstream_proxy_protocol=haproxy
  -o smtpd_tls_security_level=none
  -o smtpd_tls_auth_only=no
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
  -o smtpd_forbid_bare_newline=no
  -o smtpd_forbid_unauth_pipelining=no
`
	env.postfix = startPostfix(t, dir, postfixConfig{
		mainCF:   readExample(t, "postfix/main.cf", nil) + "\nsmtpd_forbid_bare_newline = no\n",
		masterCF: masterCF,
		listen:   env.postfixAddr,
		relay:    env.sink.addr,
	})
	startDovecotAuth(t, filepath.Join(dir, "dovecot"),
		map[string]string{postfixUser: postfixPassword},
		readExample(t, "postfix/dovecot.conf", map[string]string{
			"/var/spool/postfix": queueDir,
		}),
		filepath.Join(queueDir, "private", "auth"))
	t.Cleanup(func() { env.postfix.stop(t) })

	proc, edges := startProxyEdges(t, env.postfixAddr)
	env.proc = proc
	for _, l := range edges[viaBackend] {
		if l.proxyProtocol == "v2" {
			env.edges = append(env.edges, l)
		}
	}
	return env
}

// clientIP returns a loopback address no other session of the test uses, by
// which Postfix's log, the relayed messages' Received: lines and the edge's
// access line name the session.
func (env *smugglingEnv) clientIP(t *testing.T) string {
	env.mu.Lock()
	defer env.mu.Unlock()
	if env.nextIP > 254 {
		t.Fatal("out of loopback addresses")
	}
	ip := fmt.Sprintf("127.0.0.%d", env.nextIP)
	env.nextIP++
	return ip
}

func TestSmuggling(t *testing.T) {
	env := startSmugglingEnv(t)

	// Control: Postfix alone (PROXY header, no edge) is smuggled into, so a
	// pass through the edge is the edge's doing.
	t.Run("control: Postfix alone is smuggled", func(t *testing.T) {
		ip := env.clientIP(t)
		s := dialPostfixDirect(t, env.postfixAddr, ip)
		s.authenticate(t)
		sendSmuggling(t, s, smugglingVariants[0], uniqueToken(t))
		stats := env.postfixSession(t, ip)
		if stats["data"] != 2 {
			t.Errorf("Postfix stored %d messages of a session straight to it with %q, want 2 (the smuggled one too): the test's Postfix is not the vulnerable one",
				stats["data"], smugglingVariants[0].eod)
		}
	})

	for _, l := range env.edges {
		t.Run(l.mode.String(), func(t *testing.T) {
			for _, v := range smugglingVariants {
				t.Run(v.String(), func(t *testing.T) {
					ip := env.clientIP(t)
					s := env.dialEdge(t, l, ip)
					s.authenticate(t)
					token := uniqueToken(t)
					sendSmuggling(t, s, v, token)
					stored := env.checkSession(t, ip, 1)
					for _, m := range stored {
						if m.from == smuggledSender {
							t.Errorf("Postfix stored the smuggled message (MAIL FROM:<%s>):\n%q", m.from, m.data)
						}
					}
				})
			}

			t.Run("bare LF command pipeline", func(t *testing.T) {
				ip := env.clientIP(t)
				s := env.dialEdge(t, l, ip)
				s.authenticate(t)
				s.send(t, "MAIL FROM:<"+postfixUser+"@example.com>\nRCPT TO:<rcpt@example.com>\nDATA\n")
				codes := []int{s.reply(t), s.reply(t), s.reply(t)}
				token := uniqueToken(t)
				if codes[2] == 354 {
					s.send(t, string(testMessage(token, "after a bare LF pipeline"))+".\r\n")
					codes = append(codes, s.reply(t))
				}
				s.quit(t)
				t.Logf("replies to MAIL, RCPT, DATA (and the message): %v", codes)
				env.checkSession(t, ip, -1)
			})

			t.Run("clean 8-bit message byte for byte", func(t *testing.T) {
				ip := env.clientIP(t)
				s := env.dialEdge(t, l, ip)
				s.authenticate(t)
				token := uniqueToken(t)
				msg := eightBitMessage(token, 64<<10)
				s.cmd(t, 250, "MAIL FROM:<"+postfixUser+"@example.com> BODY=8BITMIME")
				s.cmd(t, 250, "RCPT TO:<rcpt@example.com>")
				s.cmd(t, 354, "DATA")
				s.send(t, string(dotStuff(msg))+".\r\n")
				if code := s.reply(t); code != 250 {
					t.Fatalf("the message got %d, want 250", code)
				}
				s.quit(t)
				stored := env.checkSession(t, ip, 1)
				got := stored[0].data
				// Postfix prepends its Received: header and changes nothing else.
				if !bytes.HasSuffix(got, msg) {
					t.Fatalf("Postfix relayed %d bytes, which do not end with the %d sent:\n%q", len(got), len(msg), got)
				}
				added := string(got[:len(got)-len(msg)])
				if !strings.HasPrefix(added, "Received: ") || !strings.HasSuffix(added, "\r\n") {
					t.Errorf("before the message Postfix put %q, want only its Received: header", added)
				}
				for _, line := range strings.Split(strings.TrimSuffix(added, "\r\n"), "\r\n")[1:] {
					if line == "" || (line[0] != ' ' && line[0] != '\t') {
						t.Errorf("before the message Postfix put %q, want only its Received: header", added)
						break
					}
				}
			})
		})
	}
}

// sendSmuggling sends one message whose content has the variant's fake end
// of data and, after it, a smuggled MAIL, RCPT, DATA and message, and then
// the one real end of data; then QUIT. It reads replies until the 221.
func sendSmuggling(t *testing.T, s *smugglingSession, v smugglingVariant, token string) {
	t.Helper()
	s.cmd(t, 250, "MAIL FROM:<"+postfixUser+"@example.com>")
	s.cmd(t, 250, "RCPT TO:<rcpt@example.com>")
	s.cmd(t, 354, "DATA")
	s.send(t, "From: <"+postfixUser+"@example.com>\r\n"+
		"To: <rcpt@example.com>\r\n"+
		"Subject: "+token+"\r\n"+
		"Message-ID: <"+token+"@client.localhost>\r\n"+
		"\r\n"+
		"Testing "+strconv.Quote(v.eod)+" as a fake end of data.\r\n"+
		v.eod+v.after+
		"MAIL FROM:<"+smuggledSender+">\r\n"+
		"RCPT TO:<rcpt@example.com>\r\n"+
		"DATA\r\n"+
		"From: <"+smuggledSender+">\r\n"+
		"To: <rcpt@example.com>\r\n"+
		"Subject: SMUGGLED "+token+"\r\n"+
		"\r\n"+
		"Smuggled with "+strconv.Quote(v.eod)+".\r\n"+
		".\r\n")
	t.Logf("replies after DATA: %v", s.quit(t))
}

// checkSession waits for Postfix's end of the session from ip and compares
// what Postfix accepted (its disconnect line's counts, and the messages it
// relayed, which carry ip in their Received: line) with the edge's access
// line for the session. wantMessages < 0 leaves the number to the others'
// agreement. It returns the relayed messages.
func (env *smugglingEnv) checkSession(t *testing.T, ip string, wantMessages int) []recordedMessage {
	t.Helper()
	stats := env.postfixSession(t, ip)
	stored := env.sink.wait(t, ip, stats["data"])
	access := env.proc.waitLogEntry(t, "access line of "+ip, func(e map[string]any) bool {
		return e["logger"] == "layer4.handlers.smtp.access" && e["remote_ip"] == ip
	})
	messages, _ := access["messages"].(float64)
	recipients, _ := access["recipients"].(float64)
	var senders []string
	for _, m := range stored {
		senders = append(senders, m.from)
	}
	t.Logf("Postfix: %v; stored from %q; edge: messages %v, recipients %v", stats, senders, messages, recipients)
	if wantMessages >= 0 && len(stored) != wantMessages {
		t.Errorf("Postfix stored %d messages (from %q), want %d", len(stored), senders, wantMessages)
	}
	if int(messages) != len(stored) {
		t.Errorf("the edge's access line counts %v messages, Postfix stored %d", messages, len(stored))
	}
	if int(recipients) != stats["rcpt"] {
		t.Errorf("the edge's access line counts %v recipients, Postfix accepted %d", recipients, stats["rcpt"])
	}
	return stored
}

// postfixSession waits for the line Postfix's smtpd logs at the end of the
// session from ip, with its command counts ("mail=1 rcpt=1 data=1" or, with
// failures, "data=0/1": succeeded/all), and returns the number of successful
// commands by name: "data" is the number of messages Postfix accepted (its
// 250 after the end of data).
func (env *smugglingEnv) postfixSession(t *testing.T, ip string) map[string]int {
	t.Helper()
	re := regexp.MustCompile(`/smtpd\[\d+\]: disconnect from \S*\[` + regexp.QuoteMeta(ip) +
		`\]((?: [a-z]+=\d+(?:/\d+)?)*)$`)
	m := env.postfix.log.wait(t, re)
	stats := map[string]int{}
	for _, field := range strings.Fields(m[1]) {
		name, value, _ := strings.Cut(field, "=")
		ok, _, _ := strings.Cut(value, "/")
		stats[name], _ = strconv.Atoi(ok)
	}
	return stats
}

// dotStuff doubles the dot at the start of every line (RFC 5321 4.5.2).
func dotStuff(msg []byte) []byte {
	var b bytes.Buffer
	for _, line := range bytes.SplitAfter(msg, []byte("\r\n")) {
		if bytes.HasPrefix(line, []byte(".")) {
			b.WriteByte('.')
		}
		b.Write(line)
	}
	return b.Bytes()
}

// smugglingSession is a session driven byte by byte: the smuggling needs
// bytes no SMTP client library sends.
type smugglingSession struct {
	conn net.Conn
	r    *bufio.Reader
}

// dialEdge connects to the edge listener l from ip, completes TLS and
// EHLO.
func (env *smugglingEnv) dialEdge(t *testing.T, l postfixListener, ip string) *smugglingSession {
	t.Helper()
	conn, err := dialTLSFrom(l.listener, env.proc.tlsConfig(firstHost), ip)
	if err != nil {
		t.Fatalf("%s (%s) from %s: %v", l.name, l.addr, ip, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	s := &smugglingSession{conn: conn, r: bufio.NewReader(conn)}
	if l.mode == implicitTLS {
		s.expect(t, 220)
	}
	s.cmd(t, 250, "EHLO client.localhost")
	return s
}

// dialPostfixDirect connects to Postfix's listener with a PROXY v1 header
// that names ip as the client, and says EHLO.
func dialPostfixDirect(t *testing.T, addr, ip string) *smugglingSession {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	_, port, _ := net.SplitHostPort(addr)
	s := &smugglingSession{conn: conn, r: bufio.NewReader(conn)}
	s.send(t, fmt.Sprintf("PROXY TCP4 %s 127.0.0.1 40000 %s\r\n", ip, port))
	s.expect(t, 220)
	s.cmd(t, 250, "EHLO client.localhost")
	return s
}

func (s *smugglingSession) authenticate(t *testing.T) {
	t.Helper()
	s.cmd(t, 235, "AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00"+postfixUser+"\x00"+postfixPassword)))
}

func (s *smugglingSession) send(t *testing.T, data string) {
	t.Helper()
	if _, err := io.WriteString(s.conn, data); err != nil {
		t.Fatalf("sending: %v", err)
	}
}

// reply reads one reply and returns its code.
func (s *smugglingSession) reply(t *testing.T) int {
	t.Helper()
	code, _, err := textproto.NewReader(s.r).ReadResponse(0)
	if err != nil && code == 0 {
		t.Fatalf("reading a reply: %v", err)
	}
	return code
}

func (s *smugglingSession) expect(t *testing.T, want int) {
	t.Helper()
	code, msg, err := textproto.NewReader(s.r).ReadResponse(want)
	if err != nil {
		t.Fatalf("got %d %q (%v), want a %d reply", code, msg, err, want)
	}
}

func (s *smugglingSession) cmd(t *testing.T, want int, line string) {
	t.Helper()
	s.send(t, line+"\r\n")
	s.expect(t, want)
}

// quit sends QUIT and reads the replies until its 221 (the replies to
// whatever the backend read as commands before it come first), or until the
// backend hangs up. It returns the codes of the replies before the 221.
func (s *smugglingSession) quit(t *testing.T) []int {
	t.Helper()
	s.send(t, "QUIT\r\n")
	var codes []int
	tp := textproto.NewReader(s.r)
	for {
		code, _, err := tp.ReadResponse(0)
		if code == 221 {
			return codes
		}
		if err != nil && code == 0 {
			t.Logf("the session ended without a reply to QUIT (%v), after %v", err, codes)
			return codes
		}
		codes = append(codes, code)
	}
}

// recordingSink is an SMTP server that Postfix relays into; it keeps every
// message with its envelope sender.
type recordingSink struct {
	addr string

	mu       sync.Mutex
	messages []recordedMessage
	arrived  chan struct{} // closed and replaced on each message
}

type recordedMessage struct {
	from string
	data []byte
}

func startRecordingSink(t *testing.T) *recordingSink {
	t.Helper()
	s := &recordingSink{arrived: make(chan struct{})}
	s.addr = serveSink(t, s)
	return s
}

func (s *recordingSink) NewSession(*gosmtp.Conn) (gosmtp.Session, error) {
	return &recordingSession{sink: s}, nil
}

// wait returns the messages that Postfix received from ip (its Received:
// line names the address), once there are n of them.
func (s *recordingSink) wait(t *testing.T, ip string, n int) []recordedMessage {
	t.Helper()
	timer := time.NewTimer(mtaLogTimeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		var from []recordedMessage
		for _, m := range s.messages {
			end := bytes.Index(m.data, []byte("\r\n\r\n"))
			if end >= 0 && bytes.Contains(m.data[:end], []byte("(unknown ["+ip+"])")) {
				from = append(from, m)
			}
		}
		arrived := s.arrived
		s.mu.Unlock()
		if len(from) >= n {
			return from
		}
		select {
		case <-arrived:
		case <-timer.C:
			t.Fatalf("%d of the %d messages from %s arrived in the sink within %s", len(from), n, ip, mtaLogTimeout)
		}
	}
}

type recordingSession struct {
	sink *recordingSink
	from string
}

func (r *recordingSession) Mail(from string, _ *gosmtp.MailOptions) error {
	r.from = from
	return nil
}
func (*recordingSession) Rcpt(string, *gosmtp.RcptOptions) error { return nil }
func (*recordingSession) Reset()                                 {}
func (*recordingSession) Logout() error                          { return nil }

func (r *recordingSession) Data(rd io.Reader) error {
	data, err := io.ReadAll(rd)
	if err != nil {
		return err
	}
	r.sink.mu.Lock()
	defer r.sink.mu.Unlock()
	r.sink.messages = append(r.sink.messages, recordedMessage{from: r.from, data: data})
	close(r.sink.arrived)
	r.sink.arrived = make(chan struct{})
	return nil
}
