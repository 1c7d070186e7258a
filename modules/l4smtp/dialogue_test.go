package l4smtp

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4tls"
	"go.uber.org/zap/zapcore"
)

var ehloReply = []string{"250-mail.test", "250-ENHANCEDSTATUSCODES", "250 STARTTLS"}

const (
	needTLS    = "530 5.7.0 Must issue a STARTTLS command first"
	unknown    = "500 5.5.2 Error: command not recognized"
	tooLong    = "500 5.5.6 Error: line too long"
	noParams   = "501 5.5.4 Syntax error, no parameters allowed"
	ok         = "250 2.0.0 OK"
	bye        = "221 2.0.0 Bye"
	tooMany    = "421 4.7.0 mail.test Error: too many errors"
	injected   = "421 4.5.0 mail.test Protocol error, closing connection"
	timedOut   = "421 4.4.2 mail.test Error: timeout exceeded"
	readyToTLS = "220 2.0.0 Ready to start TLS"
)

func TestDialogue(t *testing.T) {
	tests := []struct {
		name      string
		maxErrors int
		send      string
		want      []string // the replies after the greeting
		closed    bool     // the edge ends the session after them; else QUIT must work
	}{
		{name: "EHLO", send: "EHLO client.example\r\n", want: ehloReply},
		{name: "EHLO in lower case", send: "ehlo client.example\r\n", want: ehloReply},
		{name: "EHLO with an address literal", send: "EHLO [192.0.2.1]\r\n", want: ehloReply},
		{name: "EHLO without a name", send: "EHLO\r\n", want: []string{"501 5.5.4 Syntax: EHLO hostname"}},
		{name: "HELO", send: "HELO client.example\r\n", want: []string{"250 mail.test"}},
		{name: "HELO without a name", send: "HELO \r\n", want: []string{"501 5.5.4 Syntax: HELO hostname"}},
		{name: "NOOP", send: "NOOP\r\n", want: []string{ok}},
		{name: "NOOP with a string", send: "NOOP hello there\r\n", want: []string{ok}},
		{name: "RSET", send: "RSET\r\n", want: []string{ok}},
		{name: "RSET with parameters", send: "RSET now\r\n", want: []string{noParams}},
		{name: "QUIT", send: "QUIT\r\n", want: []string{bye}, closed: true},
		{name: "quit in lower case", send: "quit\r\n", want: []string{bye}, closed: true},
		{name: "MAIL", send: "MAIL FROM:<a@example.com>\r\n", want: []string{needTLS}},
		{name: "RCPT", send: "RCPT TO:<b@example.com>\r\n", want: []string{needTLS}},
		{name: "DATA", send: "DATA\r\n", want: []string{needTLS}},
		{name: "BDAT", send: "BDAT 10 LAST\r\n", want: []string{needTLS}},
		{name: "AUTH PLAIN with credentials", send: "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", want: []string{needTLS}},
		{name: "AUTH LOGIN", send: "auth login\r\n", want: []string{needTLS}},
		{name: "VRFY", send: "VRFY postmaster\r\n", want: []string{needTLS}},
		{name: "EXPN", send: "EXPN staff\r\n", want: []string{needTLS}},
		{name: "ETRN", send: "ETRN example.com\r\n", want: []string{needTLS}},
		{name: "unknown command", send: "HELP\r\n", want: []string{unknown}},
		{name: "empty line", send: "\r\n", want: []string{unknown}},
		{name: "NUL bytes", send: "\x00\x00NOOP\x00\r\n", want: []string{unknown}},
		{name: "8-bit bytes", send: "\xff\xfe\x80\r\n", want: []string{unknown}},
		{name: "HTTP request", send: "GET / HTTP/1.1\r\nHost: x\r\n\r\n", want: []string{unknown, unknown, unknown}},
		{name: "bare LF line ends", send: "NOOP\nEHLO x\n", want: append([]string{ok}, ehloReply...)},
		{name: "pipelined commands", send: "NOOP\r\nRSET\r\nHELO x\r\n", want: []string{ok, ok, "250 mail.test"}},
		{
			name: "line at the limit is a command",
			send: "NOOP " + strings.Repeat("x", maxCommandLine-len("NOOP \r\n")) + "\r\n",
			want: []string{ok},
		},
		{
			name: "line over the limit is refused and discarded to its end",
			send: "NOOP " + strings.Repeat("x", maxCommandLine-len("NOOP \r\n")+1) + "\r\nNOOP\r\n",
			want: []string{tooLong, ok},
		},
		{
			name: "100 KB without a line end, then a command",
			send: strings.Repeat("A", 100*1024) + "\r\nNOOP\r\n",
			want: []string{tooLong, ok},
		},
		{name: "STARTTLS with a parameter", send: "STARTTLS now\r\n", want: []string{noParams}},
		{
			name: "max_errors reached",
			send: strings.Repeat("FOO\r\n", 5),
			want: []string{unknown, unknown, unknown, unknown, unknown, tooMany}, closed: true,
		},
		{
			name:      "max_errors counts every kind of error and nothing else",
			maxErrors: 3,
			send:      "MAIL FROM:<a>\r\nNOOP\r\nEHLO\r\nRSET\r\nSTARTTLS x\r\nNOOP\r\n",
			want:      []string{needTLS, ok, "501 5.5.4 Syntax: EHLO hostname", ok, noParams, tooMany}, closed: true,
		},
		{
			name: "STARTTLS injection in one segment",
			send: "STARTTLS\r\nMAIL FROM:<attacker@example.com>\r\n",
			want: []string{injected}, closed: true,
		},
		{
			name: "STARTTLS injection after EHLO in one segment",
			send: "EHLO x\r\nSTARTTLS\r\nRSET\r\n",
			want: append(append([]string{}, ehloReply...), injected), closed: true,
		},
		{
			name: "STARTTLS injection with bare LF",
			send: "STARTTLS\nQUIT\n",
			want: []string{injected}, closed: true,
		},
		{
			name: "STARTTLS followed by a single stray byte",
			send: "STARTTLS\r\n\n",
			want: []string{injected}, closed: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, _ := newTestHandler(t, func(h *Handler) { h.MaxErrors = tt.maxErrors })
			client, done := serveOne(t, func(cx *layer4.Connection) net.Conn { return h.plaintextDialogue(newTestSession(h, cx), nil) })
			r := bufio.NewReader(client)
			if got := readReplies(t, r, 1)[0]; got != "220 mail.test ESMTP" {
				t.Fatalf("greeting %q", got)
			}
			if _, err := io.WriteString(client, tt.send); err != nil {
				t.Fatal(err)
			}
			got := readReplies(t, r, len(tt.want))
			for i := range tt.want {
				if got[i] != tt.want[i] {
					t.Fatalf("reply %d: got %q, want %q (all: %q)", i, got[i], tt.want[i], got)
				}
			}
			if !tt.closed {
				if _, err := io.WriteString(client, "QUIT\r\n"); err != nil {
					t.Fatal(err)
				}
				if got := readReplies(t, r, 1)[0]; got != bye {
					t.Fatalf("QUIT: got %q", got)
				}
			}
			expectClosed(t, r)
			if conn := <-done; conn != nil {
				t.Fatal("the dialogue asked for a TLS handshake")
			}
		})
	}
}

func TestDialogueGreeting(t *testing.T) {
	h, _ := newTestHandler(t, func(h *Handler) {
		h.Hostnames = []string{"MX1.Example.COM.", "mx2.example.com"}
		h.Greeting = "Ready for mail"
	})
	client, _ := serveOne(t, func(cx *layer4.Connection) net.Conn { return h.plaintextDialogue(newTestSession(h, cx), nil) })
	r := bufio.NewReader(client)
	if got := readReplies(t, r, 1)[0]; got != "220 mx1.example.com Ready for mail" {
		t.Fatalf("greeting %q", got)
	}
}

func TestDialogueCommandTimeout(t *testing.T) {
	h, logs := newTestHandler(t, func(h *Handler) { h.Timeouts.Command = caddy.Duration(50 * time.Millisecond) })
	client, done := serveOne(t, func(cx *layer4.Connection) net.Conn { return h.plaintextDialogue(newTestSession(h, cx), nil) })
	r := bufio.NewReader(client)
	readReplies(t, r, 1)
	// a partial line does not stop the clock
	if _, err := io.WriteString(client, "NOO"); err != nil {
		t.Fatal(err)
	}
	if got := readReplies(t, r, 1)[0]; got != timedOut {
		t.Fatalf("got %q, want %q", got, timedOut)
	}
	expectClosed(t, r)
	if <-done != nil {
		t.Fatal("handshake requested after a timeout")
	}
	if logs.FilterMessage("command timeout before TLS").Len() != 1 {
		t.Errorf("timeout not logged: %v", logs.All())
	}
}

// A client that sends plaintext after the 220 to STARTTLS, rather than a TLS
// ClientHello, is injecting commands it sent before the handshake: the edge
// closes without reading them as commands and without replying.
func TestDialoguePlaintextAfterReady(t *testing.T) {
	h, _ := newTestHandler(t, nil)
	sessions := make(chan *session, 1)
	client, done := serveOne(t, func(cx *layer4.Connection) net.Conn {
		sess := newTestSession(h, cx)
		sessions <- sess
		return h.plaintextDialogue(sess, nil)
	})
	r := bufio.NewReader(client)
	readReplies(t, r, 1)
	io.WriteString(client, "STARTTLS\r\n")
	if got := readReplies(t, r, 1)[0]; got != readyToTLS {
		t.Fatalf("got %q", got)
	}
	io.WriteString(client, "MAIL FROM:<attacker@example.com>\r\n")
	expectClosed(t, r)
	if <-done != nil {
		t.Fatal("handshake requested after plaintext")
	}
	if sess := <-sessions; sess.outcome != outcomeInjection {
		t.Fatalf("outcome %q, want %q", sess.outcome, outcomeInjection)
	}
}

// A client's misbehaviour is its session's outcome (in the access line),
// not a warning: warnings are for what the operator can fix.
func TestDialogueInjectionNotWarned(t *testing.T) {
	h, logs := newTestHandler(t, nil)
	sessions := make(chan *session, 1)
	client, done := serveOne(t, func(cx *layer4.Connection) net.Conn {
		sess := newTestSession(h, cx)
		sessions <- sess
		return h.plaintextDialogue(sess, nil)
	})
	r := bufio.NewReader(client)
	readReplies(t, r, 1)
	io.WriteString(client, "STARTTLS\r\nRSET\r\n")
	readReplies(t, r, 1)
	<-done
	if sess := <-sessions; sess.outcome != outcomeInjection || !strings.Contains(sess.detail, "pipelined") {
		t.Fatalf("outcome %q (%s), want %q", sess.outcome, sess.detail, outcomeInjection)
	}
	if warned := logs.FilterLevelExact(zapcore.WarnLevel); warned.Len() != 0 {
		t.Fatalf("a client's misbehaviour logged at Warn: %v", warned.All())
	}
}

// startTLSResult is what the server side of a STARTTLS test saw.
type startTLSResult struct {
	conn   *tls.Conn
	states []*tls.ConnectionState
	hellos []l4tls.ClientHelloInfo
}

func serveStartTLS(t *testing.T, h *Handler) (*bufio.Reader, *tlsClient, <-chan startTLSResult) {
	client, done := serveOne(t, func(cx *layer4.Connection) startTLSResult {
		conn := h.plaintextDialogue(newTestSession(h, cx), nil)
		if conn == nil {
			return startTLSResult{}
		}
		tlsConn := h.startTLS(newTestSession(h, cx), conn)
		if tlsConn == nil {
			return startTLSResult{}
		}
		// read what the client sends inside TLS, to prove the session works
		buf := make([]byte, 5)
		if _, err := io.ReadFull(tlsConn, buf); err != nil || string(buf) != "hello" {
			return startTLSResult{}
		}
		return startTLSResult{tlsConn, l4tls.GetConnectionStates(cx), l4tls.GetClientHelloInfos(cx)}
	})
	r := bufio.NewReader(client)
	readReplies(t, r, 1)
	io.WriteString(client, "EHLO client.example\r\n")
	readReplies(t, r, 3)
	io.WriteString(client, "STARTTLS\r\n")
	if got := readReplies(t, r, 1)[0]; got != readyToTLS {
		t.Fatalf("got %q", got)
	}
	if r.Buffered() > 0 {
		t.Fatalf("bytes after the 220: %d", r.Buffered())
	}
	return r, &tlsClient{raw: client}, done
}

type tlsClient struct{ raw io.ReadWriter }

func TestStartTLS(t *testing.T) {
	h, _ := newTestHandler(t, nil)
	_, c, done := serveStartTLS(t, h)
	conn := tls.Client(c.raw.(net.Conn), testClientTLS())
	if err := conn.Handshake(); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if got := conn.ConnectionState().NegotiatedProtocol; got != "" {
		t.Errorf("ALPN negotiated: %q", got)
	}
	io.WriteString(conn, "hello")
	res := <-done
	if res.conn == nil {
		t.Fatal("server side of the TLS session failed")
	}
	if len(res.states) != 1 || res.states[0].ServerName != "mail.test" {
		t.Errorf("connection state not recorded for later handlers: %+v", res.states)
	}
	if len(res.hellos) != 1 || res.hellos[0].ServerName != "mail.test" {
		t.Errorf("ClientHello not recorded for later handlers: %+v", res.hellos)
	}
}

func TestStartTLSRefusesOldTLS(t *testing.T) {
	for _, version := range []uint16{tls.VersionTLS10, tls.VersionTLS11} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			h, logs := newTestHandler(t, nil)
			_, c, done := serveStartTLS(t, h)
			cfg := testClientTLS()
			cfg.MinVersion, cfg.MaxVersion = version, version
			conn := tls.Client(c.raw.(net.Conn), cfg)
			if err := conn.Handshake(); err == nil {
				t.Fatalf("%s handshake succeeded", tls.VersionName(version))
			}
			if res := <-done; res.conn != nil {
				t.Fatal("server accepted the session")
			}
			if logs.FilterMessage("TLS handshake failed").FilterLevelExact(zapcore.DebugLevel).Len() != 1 {
				t.Errorf("failed handshake not logged at Debug: %v", logs.All())
			}
		})
	}
}

func TestStartTLSHandshakeTimeout(t *testing.T) {
	h, _ := newTestHandler(t, func(h *Handler) { h.Timeouts.Handshake = caddy.Duration(50 * time.Millisecond) })
	r, c, done := serveStartTLS(t, h)
	// one byte of a ClientHello, then silence
	c.raw.Write([]byte{tlsHandshakeRecord})
	if res := <-done; res.conn != nil {
		t.Fatal("stalled handshake succeeded")
	}
	expectClosed(t, r)
}

func TestImplicitTLS(t *testing.T) {
	h, _ := newTestHandler(t, func(h *Handler) { h.ImplicitTLS = true })
	client, done := serveOne(t, func(cx *layer4.Connection) *tls.Conn { return h.startTLS(implicitSession(h, cx), cx) })
	conn := tls.Client(client, testClientTLS())
	if err := conn.Handshake(); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if <-done == nil {
		t.Fatal("server handshake failed")
	}

	client, done = serveOne(t, func(cx *layer4.Connection) *tls.Conn { return h.startTLS(implicitSession(h, cx), cx) })
	io.WriteString(client, "EHLO plaintext.example\r\n")
	if <-done != nil {
		t.Fatal("plaintext accepted on the implicit TLS port")
	}
}
