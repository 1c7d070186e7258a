package integration

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"net"
	"net/textproto"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// shutdownTimeout is the edge's `timeouts shutdown` in TestShutdown: long
// enough for a session to finish the message it is sending, short enough
// to wait for a session that stalls in the middle of one.
const shutdownTimeout = 5 * time.Second

// TestShutdown stops a running caddy with SIGTERM while sessions are in
// every state, and checks what each client and the backend see: sessions
// between transactions get "421 4.3.2" before the close, new connections
// are refused, a transaction in progress finishes and its message is
// delivered once, a message cut by the shutdown timeout is not delivered at
// all, and caddy exits once the last session has ended.
func TestShutdown(t *testing.T) {
	backend := startAuthBackend(t)
	implicit := listener{name: "submissions", mode: implicitTLS}
	starttls := listener{name: "submission", mode: startTLS}
	proc := startCaddy(t, func() caddySetup {
		implicit.addr, starttls.addr = freeAddr(t), freeAddr(t)
		opts := []string{"timeouts {\n\t\t\t\t\t\tshutdown " + shutdownTimeout.String() + "\n\t\t\t\t\t}"}
		return caddySetup{
			config: caddyConfig{Edges: []edgeConfig{
				{Addrs: []string{implicit.addr}, Hostnames: []string{firstHost}, ImplicitTLS: true, Options: opts, Backend: backend.addr},
				{Addrs: []string{starttls.addr}, Hostnames: []string{firstHost}, Options: opts, Backend: backend.addr},
			}},
			addrs:     []string{implicit.addr, starttls.addr},
			probe:     implicit,
			hostnames: []string{firstHost},
		}
	})
	cfg := proc.tlsConfig(firstHost)

	// between transactions, after TLS
	idle := rawTLSSession(t, implicit, cfg)
	if _, _, err := idle.tp.ReadResponse(220); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	idle.ehlo(t)

	// before TLS
	plain := dialRaw(t, starttls.addr)
	plainReader := &unbufferedLineReader{r: plain}
	if _, err := plainReader.readReply(220); err != nil {
		t.Fatalf("greeting before TLS: %v", err)
	}

	// in a transaction that finishes, and in one that stalls
	finishing, finishingToken := openMessage(t, starttls, cfg)
	stalled, stalledToken := openMessage(t, implicit, cfg)

	if err := proc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	expectShutdownReply(t, "idle session after TLS", idle.tp)
	expectClosed(t, idle.conn)
	if lines, err := plainReader.readReply(421); err != nil || !strings.HasPrefix(lines[0], "4.3.2 ") {
		t.Errorf("idle session before TLS: %q, %v; want 421 4.3.2", lines, err)
	}
	expectClosed(t, plain)

	// the idle sessions were told, so the listeners are closed
	for _, l := range []listener{implicit, starttls} {
		conn, err := net.DialTimeout("tcp", l.addr, 10*time.Second)
		if err == nil {
			conn.Close()
			t.Errorf("%s: a new connection was accepted during the shutdown", l.name)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: a new connection failed with %v, want it refused", l.name, err)
		}
	}

	// the transaction in progress is finished and answered, then the 421
	if err := finishing.tp.PrintfLine("The end.\r\n."); err != nil {
		t.Fatal(err)
	}
	if _, msg, err := finishing.tp.ReadResponse(250); err != nil {
		t.Errorf("end of the message during the shutdown: %v %v, want 250", msg, err)
	}
	expectShutdownReply(t, "session after its transaction", finishing.tp)
	expectClosed(t, finishing.conn)

	// the stalled one gets its 421 at the end of the shutdown timeout
	expectShutdownReply(t, "session stalled in its message", stalled.tp)
	_ = stalled.tp.PrintfLine(".") // too late: must not reach the backend
	expectClosed(t, stalled.conn)

	select {
	case <-proc.exited:
	case <-time.After(shutdownTimeout + stopTimeout):
		t.Fatal("caddy did not exit after its last session ended")
	}
	if proc.waitErr != nil {
		t.Errorf("caddy exited with %v", proc.waitErr)
	}
	if n := backend.messagesWith(finishingToken); n != 1 {
		t.Errorf("the message finished during the shutdown was delivered %d times, want once", n)
	}
	if n := backend.messagesWith(stalledToken); n != 0 {
		t.Errorf("the message cut by the shutdown timeout was delivered %d times, want never", n)
	}
	log, err := os.ReadFile(proc.logPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "shutdown timeout over; ending a session in a transaction") {
		t.Error("caddy's log does not warn about the session cut by the shutdown timeout")
	}
}

// openMessage starts a session on l, authenticates, and sends MAIL, RCPT,
// DATA and the start of a message, which it returns with the message's
// token.
func openMessage(t *testing.T, l listener, cfg *tls.Config) (*rawSession, string) {
	t.Helper()
	s := rawTLSSession(t, l, cfg)
	if l.mode == implicitTLS {
		if _, _, err := s.tp.ReadResponse(220); err != nil {
			t.Fatalf("greeting: %v", err)
		}
	}
	s.ehlo(t)
	token := uniqueToken(t)
	auth := base64.StdEncoding.EncodeToString([]byte("\x00" + backendUser + "\x00" + backendPassword))
	steps := []struct {
		line string
		code int
	}{
		{"AUTH PLAIN " + auth, 235},
		{"MAIL FROM:<sender@example.com>", 250},
		{"RCPT TO:<rcpt@example.com>", 250},
		{"DATA", 354},
	}
	for _, step := range steps {
		if err := s.tp.PrintfLine("%s", step.line); err != nil {
			t.Fatal(err)
		}
		if _, msg, err := s.tp.ReadResponse(step.code); err != nil {
			t.Fatalf("%s: %s %v", strings.Fields(step.line)[0], msg, err)
		}
	}
	if err := s.tp.PrintfLine("Subject: %s\r\n\r\nThe start of %s.", token, token); err != nil {
		t.Fatal(err)
	}
	return s, token
}

func expectShutdownReply(t *testing.T, what string, tp *textproto.Conn) {
	t.Helper()
	if _, msg, err := tp.ReadResponse(421); err != nil || !strings.HasPrefix(msg, "4.3.2 ") {
		t.Errorf("%s: %q, %v; want 421 4.3.2", what, msg, err)
	}
}

// messagesWith counts the messages whose data contains token.
func (b *authBackend) messagesWith(token string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, m := range b.messages {
		if bytes.Contains(m.data, []byte(token)) {
			n++
		}
	}
	return n
}
