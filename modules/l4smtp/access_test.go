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
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// accessLine is the one access line a session wrote.
func accessLine(t *testing.T, logs *observer.ObservedLogs) map[string]any {
	t.Helper()
	lines := logs.FilterLoggerName("access").All()
	if len(lines) != 1 {
		t.Fatalf("%d access lines, want 1: %v", len(lines), lines)
	}
	if lines[0].Level != zapcore.InfoLevel || lines[0].Message != "handled session" {
		t.Errorf("access line %v %q, want Info \"handled session\"", lines[0].Level, lines[0].Message)
	}
	return lines[0].ContextMap()
}

// a client's moves, for the table below
func clientQuits(t *testing.T, conn net.Conn) {
	r := bufio.NewReader(conn)
	readReplies(t, r, 1)
	io.WriteString(conn, "QUIT\r\n")
	readReplies(t, r, 1)
}

func clientSilent(t *testing.T, conn net.Conn) { io.Copy(io.Discard, conn) }

func clientSends(s string) func(*testing.T, net.Conn) {
	return func(t *testing.T, conn net.Conn) {
		io.WriteString(conn, s)
		io.Copy(io.Discard, conn)
	}
}

// clientTLS starts TLS on an implicit TLS listener with cfg and reads the
// mail server's greeting.
func clientTLS(t *testing.T, conn net.Conn, cfg *tls.Config) (*tls.Conn, *bufio.Reader, error) {
	tlsConn := tls.Client(conn, cfg)
	if err := tlsConn.Handshake(); err != nil {
		return nil, nil, err
	}
	r := bufio.NewReader(tlsConn)
	readReplies(t, r, 1)
	return tlsConn, r, nil
}

// TestAccessLine: every way a session ends has its outcome in the session's
// one access line.
func TestAccessLine(t *testing.T) {
	implicit := func(h *Handler) { h.ImplicitTLS = true }
	greetAndWait := func(b *backend) {
		b.send("220 backend.internal ESMTP\r\n")
		io.Copy(io.Discard, b.r)
	}
	tests := []struct {
		name      string
		configure func(*Handler)
		script    func(*backend) // the mail server, as the next handler; nil: one that greets and waits
		client    func(*testing.T, net.Conn)
		outcome   outcome
		detail    string // a part of the detail
	}{
		{"QUIT before TLS", nil, nil, clientQuits, outcomeQuit, ""},
		{"client closed", nil, nil, func(t *testing.T, conn net.Conn) {
			readReplies(t, bufio.NewReader(conn), 1)
		}, outcomeClientClosed, ""},
		{"command timeout", func(h *Handler) { h.Timeouts.Command = caddy.Duration(20 * time.Millisecond) }, nil,
			clientSilent, outcomeTimeout, "command"},
		{"too many errors", func(h *Handler) { h.MaxErrors = 2 }, nil,
			clientSends("MAIL FROM:<a@x>\r\nMAIL FROM:<a@x>\r\n"), outcomeTooManyErrors, ""},
		{"STARTTLS injection", nil, nil, clientSends("STARTTLS\r\nMAIL FROM:<a@x>\r\n"), outcomeInjection, "pipelined"},
		{"early talker", func(h *Handler) { h.EarlyTalker, h.DetectTLS = "reject", -1 }, nil,
			clientSends("EHLO spambot\r\n"), outcomeEarlyTalker, ""},
		{"ClientHello on a STARTTLS listener without detect_tls", func(h *Handler) { h.DetectTLS = -1 }, nil,
			clientSends("\x16\x03\x01\x00\x05hello\r\n"), outcomeUnexpectedTLS, ""},
		{"a long ClientHello with no line end", func(h *Handler) { h.DetectTLS = -1 }, nil, func(t *testing.T, conn net.Conn) {
			io.WriteString(conn, "\x16\x03\x01\x06\xc0"+strings.Repeat("k", 1700))
			readReplies(t, bufio.NewReader(conn), 1) // the greeting, taken for a TLS record
		}, outcomeUnexpectedTLS, ""},
		{"TLS 1.1 client", implicit, nil, func(t *testing.T, conn net.Conn) {
			cfg := testClientTLS()
			cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS11, tls.VersionTLS11
			if _, _, err := clientTLS(t, conn, cfg); err == nil {
				t.Error("a TLS 1.1 handshake succeeded")
			}
		}, outcomeTLSVersion, "TLS 1.1"},
		{"client refuses the certificate", implicit, nil, func(t *testing.T, conn net.Conn) {
			if _, _, err := clientTLS(t, conn, &tls.Config{ServerName: "mail.test"}); err == nil {
				t.Error("a handshake with an untrusted certificate succeeded")
			}
		}, outcomeHandshakeFailed, "client_alert"},
		{"plaintext on an implicit TLS listener", func(h *Handler) { h.ImplicitTLS, h.DetectTLS = true, -1 }, nil,
			clientSends("EHLO client.example\r\n"), outcomeHandshakeFailed, "not_tls"},
		{"handshake timeout", func(h *Handler) {
			h.ImplicitTLS, h.DetectTLS, h.Timeouts.Handshake = true, -1, caddy.Duration(20*time.Millisecond)
		}, nil, clientSilent, outcomeTimeout, "handshake"},
		{"idle timeout after TLS", func(h *Handler) { h.ImplicitTLS, h.Timeouts.Idle = true, caddy.Duration(20*time.Millisecond) },
			greetAndWait, func(t *testing.T, conn net.Conn) {
				if _, r, err := clientTLS(t, conn, testClientTLS()); err == nil {
					io.Copy(io.Discard, r)
				}
			}, outcomeTimeout, "idle"},
		{"backend gone mid-session", implicit, func(b *backend) {
			b.send("220 backend.internal ESMTP\r\n")
			b.expect("NOOP")
			b.finish()
		}, func(t *testing.T, conn net.Conn) {
			tlsConn, r, err := clientTLS(t, conn, testClientTLS())
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(tlsConn, "NOOP\r\n")
			if got := readReplies(t, r, 1)[0]; !strings.HasPrefix(got, "421 4.4.2") {
				t.Errorf("got %q, want 421 4.4.2", got)
			}
		}, outcomeBackendLost, ""},
		{"backend ends with 421", implicit, func(b *backend) {
			b.send("220 backend.internal ESMTP\r\n")
			b.expect("NOOP")
			b.send("421 4.7.0 backend.internal Too many errors\r\n")
			b.finish()
		}, func(t *testing.T, conn net.Conn) {
			tlsConn, r, err := clientTLS(t, conn, testClientTLS())
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(tlsConn, "NOOP\r\n")
			readReplies(t, r, 1)
		}, outcomeBackendEnded, "421"},
		{"backend closes before its greeting", implicit, func(b *backend) { b.finish() }, func(t *testing.T, conn net.Conn) {
			if _, r, err := clientTLS(t, conn, testClientTLS()); err == nil {
				io.Copy(io.Discard, r)
			}
		}, outcomeBackendUnreachable, "before its greeting"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, logs := newTestHandler(t, tt.configure)
			script := tt.script
			if script == nil {
				script = greetAndWait
			}
			conn, done := serveHandleWith(t, h, script)
			tt.client(t, conn)
			conn.Close()
			<-done
			line := accessLine(t, logs)
			if line["outcome"] != string(tt.outcome) {
				t.Errorf("outcome %v, want %s (line %v)", line["outcome"], tt.outcome, line)
			}
			if detail, _ := line["detail"].(string); !strings.Contains(detail, tt.detail) {
				t.Errorf("detail %q, want one with %q", detail, tt.detail)
			}
			for _, field := range []string{"session_id", "remote_ip", "remote_port", "client_ip", "listener", "mode", "duration"} {
				if _, ok := line[field]; !ok {
					t.Errorf("no %s in %v", field, line)
				}
			}
		})
	}
}

// TestAccessLineSession: a whole session's facts in its access line.
func TestAccessLineSession(t *testing.T) {
	h, logs := newTestHandler(t, func(h *Handler) { h.ImplicitTLS = true })
	conn, done := serveHandleWith(t, h, func(b *backend) {
		b.send("220 backend.internal ESMTP\r\n")
		b.expect("EHLO client.example")
		b.send("250-backend.internal\r\n250 AUTH PLAIN\r\n")
		b.expect("AUTH PLAIN " + b64("\x00alice\x00wrong"))
		b.send("535 5.7.8 Authentication failed\r\n")
		b.expect("AUTH PLAIN " + b64("\x00alice\x00secret"))
		b.send("235 2.7.0 Authentication successful\r\n")
		b.expect("MAIL FROM:<alice@example.com>")
		b.send("250 2.1.0 Ok\r\n")
		b.expect("RCPT TO:<bob@example.com>")
		b.send("250 2.1.5 Ok\r\n")
		b.expect("DATA")
		b.send("354 End data with <CR><LF>.<CR><LF>\r\n")
		b.expect("Subject: hello")
		b.expect("")
		b.expect("body")
		b.expect(".")
		b.send("250 2.0.0 Ok: queued\r\n")
		b.expect("QUIT")
		b.send("221 2.0.0 Bye\r\n")
		b.finish()
	})
	tlsConn, r, err := clientTLS(t, conn, testClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct{ send, reply string }{
		{"EHLO client.example", "250 AUTH PLAIN"},
		{"AUTH PLAIN " + b64("\x00alice\x00wrong"), "535 5.7.8 Authentication failed"},
		{"AUTH PLAIN " + b64("\x00alice\x00secret"), "235 2.7.0 Authentication successful"},
		{"MAIL FROM:<alice@example.com>", "250 2.1.0 Ok"},
		{"RCPT TO:<bob@example.com>", "250 2.1.5 Ok"},
		{"DATA", "354 End data with <CR><LF>.<CR><LF>"},
		{"Subject: hello\r\n\r\nbody\r\n.", "250 2.0.0 Ok: queued"},
		{"QUIT", "221 2.0.0 Bye"},
	} {
		io.WriteString(tlsConn, step.send+"\r\n")
		var got string
		for got == "" || got[3] == '-' {
			got = readReplies(t, r, 1)[0]
		}
		if got != step.reply {
			t.Fatalf("after %q: %q, want %q", step.send, got, step.reply)
		}
	}
	tlsConn.Close()
	<-done
	line := accessLine(t, logs)
	listener := line["listener"].(string)
	for name, c := range map[string]struct {
		got  prometheus.Collector
		want float64
	}{
		"sessions_total":       {metrics.sessions.WithLabelValues(listener, "implicit", "quit"), 1},
		"active_sessions":      {metrics.activeSessions.WithLabelValues(listener), 0},
		"tls_handshakes_total": {metrics.handshakes.WithLabelValues(listener, "tls1.3", "full"), 1},
		"auth_total success":   {metrics.auth.WithLabelValues(listener, "success"), 1},
		"auth_total failure":   {metrics.auth.WithLabelValues(listener, "failure"), 1},
		"messages_total":       {metrics.messages.WithLabelValues(listener), 1},
		"recipients_total":     {metrics.recipients.WithLabelValues(listener), 1},
	} {
		if got := testutil.ToFloat64(c.got); got != c.want {
			t.Errorf("%s = %v, want %v", name, got, c.want)
		}
	}
	if got := testutil.ToFloat64(metrics.bytes.WithLabelValues(listener, "to_client")); got != float64(line["bytes_written"].(int64)) {
		t.Errorf("bytes_total to_client %v, the access line %v", got, line["bytes_written"])
	}
	for field, want := range map[string]any{
		"outcome": "quit", "mode": "implicit", "ehlo": "client.example",
		"auth_attempts": int64(2), "auth_failures": int64(1), "user_id": "alice",
		"messages": int64(1), "recipients": int64(1),
	} {
		if line[field] != want {
			t.Errorf("%s = %#v, want %#v", field, line[field], want)
		}
	}
	tlsFacts, _ := line["tls"].(map[string]any)
	if tlsFacts["server_name"] != "mail.test" || tlsFacts["version"] != "tls1.3" || tlsFacts["resumed"] != false ||
		!strings.HasPrefix(tlsFacts["cipher_suite"].(string), "TLS_") {
		t.Errorf("tls %v", tlsFacts)
	}
	if read, _ := line["bytes_read"].(int64); read < int64(len("EHLO client.example\r\nQUIT\r\n")) {
		t.Errorf("bytes_read %v", line["bytes_read"])
	}
	if written, _ := line["bytes_written"].(int64); written < int64(len("221 2.0.0 Bye\r\n")) {
		t.Errorf("bytes_written %v", line["bytes_written"])
	}
	for _, e := range logs.All() {
		for k, v := range e.ContextMap() {
			if s, ok := v.(string); ok && (strings.Contains(s, "secret") || strings.Contains(s, b64("\x00alice\x00secret"))) {
				t.Errorf("a log line carries the password in %s: %v", k, e)
			}
		}
	}
}

// The collectors are process-wide: a reload registers them in the new
// config's registry, counts and all; a second handler of one config finds
// them there.
func TestMetricsRegistration(t *testing.T) {
	first := prometheus.NewPedanticRegistry()
	if err := metrics.register(first); err != nil {
		t.Fatal(err)
	}
	if err := metrics.register(first); err != nil {
		t.Fatalf("a second handler of the same config: %v", err)
	}
	metrics.turnedAway.WithLabelValues("test-listener", "early_talker").Inc()
	reloaded := prometheus.NewPedanticRegistry()
	if err := metrics.register(reloaded); err != nil {
		t.Fatalf("after a reload: %v", err)
	}
	families, err := reloaded.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, f := range families {
		if f.GetName() == "caddy_layer4_smtp_turned_away_total" {
			for _, m := range f.GetMetric() {
				found = found || m.GetCounter().GetValue() >= 1
			}
		}
	}
	if !found {
		t.Error("the count from before the reload is not in the new registry")
	}
}

// TestPanicInSession: a panic in a session gets the client 421 4.3.0 (inside
// TLS when TLS is up), an Error in the log and an access line; the process
// lives on.
func TestPanicInSession(t *testing.T) {
	h, logs := newTestHandler(t, func(h *Handler) { h.ImplicitTLS = true })
	next := layer4.HandlerFunc(func(cx *layer4.Connection) error { panic("a fault of the edge") })
	client, done := serveOne(t, func(cx *layer4.Connection) error { return h.Handle(cx, next) })
	tlsConn := tls.Client(client, testClientTLS())
	if err := tlsConn.Handshake(); err != nil {
		t.Fatal(err)
	}
	if got := readReplies(t, bufio.NewReader(tlsConn), 1)[0]; !strings.HasPrefix(got, "421 4.3.0 ") {
		t.Errorf("got %q, want 421 4.3.0", got)
	}
	if err := <-done; err != nil {
		t.Errorf("Handle returned %v", err)
	}
	if logs.FilterLevelExact(zap.ErrorLevel).FilterMessageSnippet("panic").Len() != 1 {
		t.Errorf("the panic is not logged at Error: %v", logs.All())
	}
	if line := accessLine(t, logs); line["outcome"] != string(outcomeInternalError) {
		t.Errorf("outcome %v", line["outcome"])
	}
}
