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
)

// serveHandle runs h.Handle on one loopback connection, as the layer4
// server would, with a mail server scripted as the next handler: it greets,
// answers one EHLO and QUIT. It returns the client side and whether the
// mail server was reached.
func serveHandle(t *testing.T, h *Handler) (net.Conn, <-chan bool) {
	t.Helper()
	return serveHandleWith(t, h, func(b *backend) {
		b.send("220 backend.internal ESMTP\r\n")
		b.expect("EHLO client.example")
		b.send("250 backend.internal\r\n")
		b.expect("QUIT")
		b.send("221 2.0.0 Bye\r\n")
		b.finish()
	})
}

// serveHandleWith is serveHandle with the mail server's script. The result
// comes when Handle has returned.
func serveHandleWith(t *testing.T, h *Handler, script func(*backend)) (net.Conn, <-chan bool) {
	t.Helper()
	reached := make(chan bool, 1)
	next := layer4.HandlerFunc(func(cx *layer4.Connection) error {
		reached <- true
		script(&backend{t: t, conn: cx, r: bufio.NewReader(cx),
			closeWrite: cx.Conn.(interface{ CloseWrite() error }).CloseWrite})
		return nil
	})
	client, done := serveOne(t, func(cx *layer4.Connection) error { return h.Handle(cx, next) })
	result := make(chan bool, 1)
	go func() {
		<-done
		select {
		case <-reached:
			result <- true
		default:
			result <- false
		}
	}()
	return client, result
}

// speakImplicitTLS is a client configured for implicit TLS: it starts TLS at
// once and is greeted by the mail server inside TLS.
func speakImplicitTLS(t *testing.T, conn net.Conn) {
	t.Helper()
	tlsConn := tls.Client(conn, testClientTLS())
	if err := tlsConn.Handshake(); err != nil {
		t.Fatalf("implicit TLS handshake: %v", err)
	}
	r := bufio.NewReader(tlsConn)
	if got := readReplies(t, r, 1)[0]; got != "220 backend.internal ESMTP" {
		t.Fatalf("greeting inside TLS %q", got)
	}
	finishSession(t, tlsConn, r)
}

// speakSTARTTLS is a client configured for STARTTLS: it waits for the
// greeting, says EHLO, starts TLS and says EHLO again.
func speakSTARTTLS(t *testing.T, conn net.Conn) {
	t.Helper()
	r := bufio.NewReader(conn)
	if got := readReplies(t, r, 1)[0]; got != "220 mail.test ESMTP" {
		t.Fatalf("plaintext greeting %q", got)
	}
	io.WriteString(conn, "EHLO client.example\r\n")
	if got := readReplies(t, r, 3); got[2] != "250 STARTTLS" {
		t.Fatalf("EHLO before TLS: %q", got)
	}
	io.WriteString(conn, "STARTTLS\r\n")
	if got := readReplies(t, r, 1)[0]; got != readyToTLS {
		t.Fatalf("STARTTLS: %q", got)
	}
	tlsConn := tls.Client(conn, testClientTLS())
	if err := tlsConn.Handshake(); err != nil {
		t.Fatalf("handshake after STARTTLS: %v", err)
	}
	finishSession(t, tlsConn, bufio.NewReader(tlsConn))
}

// finishSession says EHLO and QUIT to the mail server inside TLS.
func finishSession(t *testing.T, conn net.Conn, r *bufio.Reader) {
	t.Helper()
	io.WriteString(conn, "EHLO client.example\r\n")
	if got := readReplies(t, r, 1)[0]; got != "250 backend.internal" {
		t.Fatalf("EHLO inside TLS: %q", got)
	}
	io.WriteString(conn, "QUIT\r\n")
	if got := readReplies(t, r, 1)[0]; got != "221 2.0.0 Bye" {
		t.Fatalf("QUIT: %q", got)
	}
}

// TestDetectTLS: each kind of listener serves each kind of client with
// detect_tls, and treats other first bytes as its own mode does. The waits
// are long where the test must not depend on them: a client that sends
// first ends the wait, however long it is.
func TestDetectTLS(t *testing.T) {
	const forever = caddy.Duration(time.Hour)
	implicitListener := func(detect caddy.Duration) func(*Handler) {
		return func(h *Handler) { h.ImplicitTLS, h.DetectTLS = true, detect }
	}
	startTLSListener := func(detect caddy.Duration) func(*Handler) {
		return func(h *Handler) { h.DetectTLS = detect }
	}
	tests := []struct {
		name      string
		configure func(*Handler)
		reached   bool // the session reaches the mail server
		client    func(t *testing.T, conn net.Conn)
	}{
		{"implicit listener, TLS client", implicitListener(forever), true, speakImplicitTLS},
		{"implicit listener, STARTTLS client", implicitListener(caddy.Duration(20 * time.Millisecond)), true, speakSTARTTLS},
		{"STARTTLS listener, TLS client", startTLSListener(forever), true, speakImplicitTLS},
		{"STARTTLS listener, STARTTLS client", startTLSListener(caddy.Duration(20 * time.Millisecond)), true, speakSTARTTLS},
		{"STARTTLS listener, client that talks before the greeting", startTLSListener(forever), false, func(t *testing.T, conn net.Conn) {
			// as without detection: greeted, then its command answered
			io.WriteString(conn, "NOOP\r\n")
			r := bufio.NewReader(conn)
			if got := readReplies(t, r, 2); got[0] != "220 mail.test ESMTP" || got[1] != ok {
				t.Fatalf("replies %q", got)
			}
			io.WriteString(conn, "QUIT\r\n")
			if got := readReplies(t, r, 1)[0]; got != bye {
				t.Fatalf("QUIT: %q", got)
			}
		}},
		{"implicit listener, plaintext before the greeting", implicitListener(forever), false, func(t *testing.T, conn net.Conn) {
			// as without detection: the handshake fails, no plaintext reply
			io.WriteString(conn, "EHLO client.example\r\n")
			expectClosed(t, conn)
		}},
		{"implicit listener without detection, STARTTLS client", func(h *Handler) {
			h.ImplicitTLS, h.DetectTLS = true, -1
			h.Timeouts.Handshake = caddy.Duration(20 * time.Millisecond)
		}, false, func(t *testing.T, conn net.Conn) {
			// waits for a greeting that never comes, until the handshake timeout
			expectClosed(t, conn)
		}},
		{"STARTTLS listener without detection, TLS client", startTLSListener(-1), false, func(t *testing.T, conn net.Conn) {
			// the greeting goes out before the ClientHello comes in;
			// nothing after it answers the TLS bytes
			conn.Write([]byte("\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03\r\n"))
			r := bufio.NewReader(conn)
			if got := readReplies(t, r, 1)[0]; got != "220 mail.test ESMTP" {
				t.Fatalf("greeting %q", got)
			}
			expectClosed(t, r)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, _ := newTestHandler(t, tt.configure)
			conn, reached := serveHandle(t, h)
			tt.client(t, conn)
			conn.Close()
			if got := <-reached; got != tt.reached {
				t.Errorf("mail server reached: %v, want %v", got, tt.reached)
			}
		})
	}
}

// With early_talker reject, detect_tls is the start of the pregreet wait: a
// ClientHello within it gets TLS, plaintext within it or after the first
// greeting line gets 521, and a ClientHello after the first greeting line
// gets no plaintext reply.
func TestDetectTLSEarlyTalker(t *testing.T) {
	earlyTalker := func(detect, pregreet time.Duration) func(*Handler) {
		return func(h *Handler) {
			h.EarlyTalker = "reject"
			h.DetectTLS, h.Timeouts.Pregreet = caddy.Duration(detect), caddy.Duration(pregreet)
		}
	}
	t.Run("TLS client", func(t *testing.T) {
		h, _ := newTestHandler(t, earlyTalker(time.Hour, 2*time.Hour))
		conn, reached := serveHandle(t, h)
		speakImplicitTLS(t, conn)
		if !<-reached {
			t.Error("mail server not reached")
		}
	})
	t.Run("plaintext talker", func(t *testing.T) {
		h, _ := newTestHandler(t, earlyTalker(time.Hour, 2*time.Hour))
		conn, reached := serveHandle(t, h)
		io.WriteString(conn, "EHLO spambot\r\n")
		r := bufio.NewReader(conn)
		if got := readReplies(t, r, 2); got[0] != "220-mail.test ESMTP" || got[1] != "521 5.5.1 Protocol error" {
			t.Fatalf("replies %q", got)
		}
		expectClosed(t, r)
		if <-reached {
			t.Error("mail server reached")
		}
	})
	t.Run("ClientHello after the first greeting line", func(t *testing.T) {
		h, logs := newTestHandler(t, earlyTalker(time.Millisecond, time.Hour))
		conn, reached := serveHandle(t, h)
		r := bufio.NewReader(conn)
		if got := readReplies(t, r, 1)[0]; got != "220-mail.test ESMTP" {
			t.Fatalf("first greeting line %q", got)
		}
		conn.Write([]byte{tlsHandshakeRecord, 3, 1})
		expectClosed(t, r)
		if <-reached {
			t.Error("mail server reached")
		}
		if logs.FilterMessageSnippet("TLS handshake after the first greeting line").Len() != 1 {
			t.Errorf("not logged: %v", logs.All())
		}
	})
	t.Run("patient STARTTLS client", func(t *testing.T) {
		h, _ := newTestHandler(t, earlyTalker(0, 40*time.Millisecond))
		if h.detectTLS != 20*time.Millisecond {
			t.Fatalf("detect_tls %s, want half the pregreet wait", h.detectTLS)
		}
		conn, reached := serveHandle(t, h)
		r := bufio.NewReader(conn)
		if got := readReplies(t, r, 1)[0]; got != "220-mail.test ESMTP" {
			t.Fatalf("first greeting line %q", got)
		}
		// the rest of speakSTARTTLS, from the final greeting line on
		speakSTARTTLS(t, &prereadConn{Conn: conn, r: r})
		if !<-reached {
			t.Error("mail server not reached")
		}
	})
}

// prereadConn reads through a bufio.Reader that has already consumed part
// of the stream.
type prereadConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *prereadConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func TestDetectTLSDefaults(t *testing.T) {
	for _, tt := range []struct {
		name string
		h    Handler
		want time.Duration
	}{
		{"implicit", Handler{ImplicitTLS: true}, time.Second},
		{"implicit, off", Handler{ImplicitTLS: true, DetectTLS: -1}, 0},
		{"implicit, set", Handler{ImplicitTLS: true, DetectTLS: caddy.Duration(3 * time.Second)}, 3 * time.Second},
		{"STARTTLS", Handler{}, 0},
		{"STARTTLS, set", Handler{DetectTLS: caddy.Duration(200 * time.Millisecond)}, 200 * time.Millisecond},
		{"STARTTLS, early talker", Handler{EarlyTalker: "reject"}, 200 * time.Millisecond},
		{"STARTTLS, early talker, short pregreet", Handler{EarlyTalker: "reject", Timeouts: Timeouts{Pregreet: caddy.Duration(300 * time.Millisecond)}}, 150 * time.Millisecond},
		{"STARTTLS, early talker, off", Handler{EarlyTalker: "reject", DetectTLS: -1}, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.h.Hostnames = []string{"m.example"}
			if _, err := tt.h.setup(); err != nil {
				t.Fatal(err)
			}
			if tt.h.detectTLS != tt.want {
				t.Errorf("detect_tls %s, want %s", tt.h.detectTLS, tt.want)
			}
		})
	}
	h := Handler{Hostnames: []string{"m.example"}, EarlyTalker: "reject", DetectTLS: caddy.Duration(time.Second)}
	if _, err := h.setup(); err == nil || !strings.Contains(err.Error(), "shorter than timeouts pregreet") {
		t.Errorf("detect_tls as long as the pregreet wait: %v", err)
	}
}
