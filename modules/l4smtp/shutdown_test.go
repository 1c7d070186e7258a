package l4smtp

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
)

const shutdownReply = "421 4.3.2 mail.test Service shutting down, closing transmission channel"

// backendTranscript reads what reaches the backend until the relay closes
// its side, and returns it.
func backendTranscript(b *backend) string {
	rest, _ := io.ReadAll(b.r)
	return string(rest)
}

// startTransaction runs EHLO, MAIL, RCPT and DATA through the relay to a
// backend that accepts them.
func startTransaction(t *testing.T, b *backend) {
	b.send("220 backend.internal ESMTP\r\n")
	b.expect("EHLO client.example")
	b.send("250-backend.internal\r\n250 PIPELINING\r\n")
	b.expect("MAIL FROM:<a@example.com>")
	b.send("250 2.1.0 Ok\r\n")
	b.expect("RCPT TO:<b@example.com>")
	b.send("250 2.1.5 Ok\r\n")
	b.expect("DATA")
	b.send("354 End data with <CR><LF>.<CR><LF>\r\n")
}

func clientTransaction(t *testing.T, conn io.Writer, r *bufio.Reader) {
	t.Helper()
	io.WriteString(conn, "EHLO client.example\r\n")
	readReplies(t, r, 2)
	io.WriteString(conn, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
	if got := readReplies(t, r, 3); !strings.HasPrefix(got[2], "354 ") {
		t.Fatalf("replies %q, want 250, 250, 354", got)
	}
}

// Between transactions, a shutdown ends the session at once with 421, and
// the backend just sees the end of the connection.
func TestShutdownBetweenTransactions(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, via.configure)
		sess := newTestSession(h, nil)
		transcript := make(chan string, 1)
		conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
			b.send("220 backend.internal ESMTP\r\n")
			b.expect("EHLO client.example")
			b.send("250-backend.internal\r\n250 PIPELINING\r\n")
			transcript <- backendTranscript(b)
			return nil
		})
		io.WriteString(conn, "EHLO client.example\r\n")
		readReplies(t, r, 2)
		sess.drain()
		if got := readReplies(t, r, 1)[0]; got != shutdownReply {
			t.Fatalf("after the shutdown: %q, want %q", got, shutdownReply)
		}
		expectClosed(t, r)
		if got := <-transcript; got != "" {
			t.Errorf("the backend got %q after the shutdown, want nothing", got)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

// A session in a transaction finishes it: the client gets the backend's
// reply to its message, and then the 421.
func TestShutdownWaitsForTransaction(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, func(h *Handler) { via.configure(h); h.Timeouts.Shutdown = caddy.Duration(time.Hour) })
		sess := newTestSession(h, nil)
		conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
			startTransaction(t, b)
			b.expect("Subject: test")
			b.expect("")
			b.expect("body")
			b.expect(".")
			b.send("250 2.0.0 Ok: queued as 1234\r\n")
			if rest := backendTranscript(b); rest != "" {
				t.Errorf("the backend got %q after the message", rest)
			}
			return nil
		})
		clientTransaction(t, conn, r)
		sess.drain()
		io.WriteString(conn, "Subject: test\r\n\r\nbody\r\n.\r\n")
		got := readReplies(t, r, 2)
		if got[0] != "250 2.0.0 Ok: queued as 1234" || got[1] != shutdownReply {
			t.Fatalf("after the message: %q, want the backend's 250, then %q", got, shutdownReply)
		}
		expectClosed(t, r)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

// When the shutdown timeout is over in the middle of a message, the client
// gets 421 and the backend never gets the end of the message, so it cannot
// accept part of it.
func TestShutdownTimeoutInMessage(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, logs := newTestHandler(t, func(h *Handler) { via.configure(h); h.Timeouts.Shutdown = caddy.Duration(50 * time.Millisecond) })
		sess := newTestSession(h, nil)
		transcript := make(chan string, 1)
		conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
			startTransaction(t, b)
			transcript <- backendTranscript(b)
			return nil
		})
		clientTransaction(t, conn, r)
		io.WriteString(conn, "Subject: test\r\n\r\npart of the body\r\n")
		sess.drain()
		if got := readReplies(t, r, 1)[0]; got != shutdownReply {
			t.Fatalf("at the end of the shutdown timeout: %q, want %q", got, shutdownReply)
		}
		io.WriteString(conn, ".\r\n") // too late: must not reach the backend
		expectClosed(t, r)
		got := <-transcript
		if strings.Contains("\r\n"+got, "\r\n.\r\n") {
			t.Errorf("the backend got the end of the message: %q", got)
		}
		<-done
		if logs.FilterMessage("shutdown timeout over; ending a session in a transaction").Len() != 1 {
			t.Errorf("no warning about the session cut in its transaction; log: %v", logs.All())
		}
	})
}

// Before TLS there is no transaction: the dialogue ends at once, and a
// session that begins during the shutdown is greeted with the 421.
func TestShutdownBeforeTLS(t *testing.T) {
	h, _ := newTestHandler(t, nil)
	t.Run("waiting for a command", func(t *testing.T) {
		var sess *session
		ready := make(chan struct{})
		client, done := serveOne(t, func(cx *layer4.Connection) net.Conn {
			sess = newTestSession(h, cx)
			close(ready)
			return h.plaintextDialogue(sess, nil)
		})
		r := bufio.NewReader(client)
		readReplies(t, r, 1)
		io.WriteString(client, "EHLO client.example\r\n")
		readReplies(t, r, 3)
		<-ready
		sess.drain()
		if got := readReplies(t, r, 1)[0]; got != shutdownReply {
			t.Fatalf("after the shutdown: %q, want %q", got, shutdownReply)
		}
		expectClosed(t, r)
		if conn := <-done; conn != nil {
			t.Fatal("the dialogue went on to TLS")
		}
	})
	t.Run("new session", func(t *testing.T) {
		client, done := serveOne(t, func(cx *layer4.Connection) net.Conn {
			sess := newTestSession(h, cx)
			sess.drain()
			return h.plaintextDialogue(sess, nil)
		})
		r := bufio.NewReader(client)
		if got := readReplies(t, r, 1)[0]; got != shutdownReply {
			t.Fatalf("greeting %q, want %q", got, shutdownReply)
		}
		expectClosed(t, r)
		<-done
	})
}
