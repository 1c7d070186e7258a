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
	"go.uber.org/zap"
)

// serveAll runs h.Handle, as the layer4 server would, on every loopback
// connection until the test ends. Each Handle that returns is reported on
// the channel.
func serveAll(t *testing.T, h *Handler) (string, <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ended := make(chan struct{}, 100)
	next := layer4.HandlerFunc(func(*layer4.Connection) error { return nil })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_ = h.Handle(layer4.WrapConnection(conn, nil, zap.NewNop()), next)
				ended <- struct{}{}
			}()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port, ended
}

// dialFrom connects from the given loopback address and returns the first
// reply line.
func dialFrom(t *testing.T, from, port string) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	conn, err := d.Dial("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r := bufio.NewReader(conn)
	return conn, r, readReplies(t, r, 1)[0]
}

const tooManyConns = "421 4.7.0 mail.test Too many connections, try again later"

func TestMaxConnections(t *testing.T) {
	h, _ := newTestHandler(t, func(h *Handler) { h.MaxConnections = 2 })
	port, ended := serveAll(t, h)
	first, r1, greeting := dialFrom(t, "127.0.0.1", port)
	if greeting != "220 mail.test ESMTP" {
		t.Fatalf("first client: %q", greeting)
	}
	dialFrom(t, "127.0.0.2", port)
	_, r3, refused := dialFrom(t, "127.0.0.3", port)
	if refused != tooManyConns {
		t.Fatalf("third client: %q", refused)
	}
	expectClosed(t, r3)
	<-ended // the refused one

	io.WriteString(first, "QUIT\r\n")
	readReplies(t, r1, 1)
	<-ended // the first one; its place is free again
	if _, _, greeting := dialFrom(t, "127.0.0.3", port); greeting != "220 mail.test ESMTP" {
		t.Fatalf("client after a place was freed: %q", greeting)
	}
}

func TestMaxConnectionsPerIP(t *testing.T) {
	h, logs := newTestHandler(t, func(h *Handler) { h.MaxConnectionsPerIP = 1 })
	port, _ := serveAll(t, h)
	if _, _, greeting := dialFrom(t, "127.0.0.1", port); greeting != "220 mail.test ESMTP" {
		t.Fatalf("first client: %q", greeting)
	}
	_, r, refused := dialFrom(t, "127.0.0.1", port)
	if refused != tooManyConns {
		t.Fatalf("second connection of the same client: %q", refused)
	}
	expectClosed(t, r)
	if _, _, greeting := dialFrom(t, "127.0.0.2", port); greeting != "220 mail.test ESMTP" {
		t.Fatalf("another client: %q", greeting)
	}
	if logs.FilterMessageSnippet("connection limit").FilterFieldKey("limit").Len() != 1 {
		t.Errorf("refusal not logged with its limit: %v", logs.All())
	}
}

func TestConnLimitsAccounting(t *testing.T) {
	l := &connLimits{max: 3, maxPerIP: 2}
	a := &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 1000}
	a2 := &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 1001}
	b := &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 1000}
	for i, want := range []limitExceeded{limitNone, limitNone, limitPerIP} {
		if got := l.acquire([]net.Addr{a, a2, a}[i]); got != want {
			t.Fatalf("acquire %d: %q, want %q", i, got, want)
		}
	}
	if got := l.acquire(b); got != limitNone {
		t.Fatalf("other client: %q", got)
	}
	if got := l.acquire(b); got != limitTotal {
		t.Fatalf("fourth session: %q", got)
	}
	l.release(a)
	l.release(a2)
	l.release(b)
	if l.total != 0 || len(l.perIP) != 0 {
		t.Fatalf("after releasing all: total %d, per IP %v", l.total, l.perIP)
	}
}

func TestEarlyTalker(t *testing.T) {
	t.Run("patient client", func(t *testing.T) {
		h, _ := newTestHandler(t, func(h *Handler) {
			h.EarlyTalker = "reject"
			h.Timeouts.Pregreet = caddy.Duration(20 * time.Millisecond)
		})
		client, done := serveOne(t, func(cx *layer4.Connection) net.Conn { return h.plaintextDialogue(newTestSession(h, cx), nil) })
		r := bufio.NewReader(client)
		got := readReplies(t, r, 2)
		if got[0] != "220-mail.test ESMTP" || got[1] != "220 mail.test ESMTP" {
			t.Fatalf("greeting %q", got)
		}
		io.WriteString(client, "EHLO x\r\nQUIT\r\n")
		if got := readReplies(t, r, 4); got[3] != bye {
			t.Fatalf("after the greeting: %q", got)
		}
		<-done
	})
	t.Run("talker", func(t *testing.T) {
		h, logs := newTestHandler(t, func(h *Handler) {
			h.EarlyTalker = "reject"
			h.Timeouts.Pregreet = caddy.Duration(time.Hour) // a talker is caught at once
		})
		client, done := serveOne(t, func(cx *layer4.Connection) net.Conn { return h.plaintextDialogue(newTestSession(h, cx), nil) })
		io.WriteString(client, "EHLO spambot\r\n")
		r := bufio.NewReader(client)
		got := readReplies(t, r, 2)
		if got[0] != "220-mail.test ESMTP" || got[1] != "521 5.5.1 Protocol error" {
			t.Fatalf("replies %q", got)
		}
		expectClosed(t, r)
		if <-done != nil {
			t.Fatal("the talker got a TLS handshake")
		}
		if logs.FilterMessageSnippet("before the greeting").Len() != 1 {
			t.Errorf("not logged: %v", logs.All())
		}
	})
}

func TestSetupAbuseControlErrors(t *testing.T) {
	for _, h := range []*Handler{
		{Hostnames: []string{"m.example"}, MaxConnections: -1},
		{Hostnames: []string{"m.example"}, MaxConnectionsPerIP: -1},
		{Hostnames: []string{"m.example"}, EarlyTalker: "drop"},
		{Hostnames: []string{"m.example"}, EarlyTalker: "reject", ImplicitTLS: true},
	} {
		if _, err := h.setup(); err == nil || !strings.Contains(err.Error(), "smtp:") {
			t.Errorf("%+v: error %v", h, err)
		}
	}
}
