package l4smtp

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zapcore"
)

// The edge's one reading of the session after TLS, through the relay: the
// commands it answers itself, the order of replies, line ends, and XCLIENT.

func requireAuthOn(h *Handler) { h.RequireAuth = nil }

// ehloExchange greets and answers the client's EHLO on the backend's side.
func ehloExchange(b *backend) {
	b.send("220 backend ESMTP\r\n")
	b.expect("EHLO client.example")
	b.send("250-backend\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n")
}

// Before AUTH, mail commands get 530 from the edge and never reach the
// backend, in command order with the backend's replies; after the backend's
// 235 they pass.
func TestRequireAuth(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, func(h *Handler) { via.configure(h); requireAuthOn(h) })
		transcript := make(chan string, 1)
		conn, r, done := serveRelay(t, h, via, true, func(b *backend) error {
			ehloExchange(b)
			b.expect("NOOP")
			b.send("250 2.0.0 Ok\r\n")
			b.expect("AUTH PLAIN " + b64("\x00alice\x00secret"))
			b.send("235 2.7.0 Authentication successful\r\n")
			b.expect("MAIL FROM:<a@example.com>")
			b.send("250 2.1.0 Ok\r\n")
			b.expect("QUIT")
			b.send("221 2.0.0 Bye\r\n")
			b.finish()
			transcript <- backendTranscript(b)
			return nil
		})
		io.WriteString(conn, "EHLO client.example\r\n")
		readReplies(t, r, 3)
		// pipelined: the edge's 530s wait for the backend's 250 before them
		io.WriteString(conn, "NOOP\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nBDAT 5 LAST\r\nhello")
		got := readReplies(t, r, 5)
		want := []string{"250 2.0.0 Ok", "530 5.7.0 Authentication required", "530 5.7.0 Authentication required",
			"530 5.7.0 Authentication required", "530 5.7.0 Authentication required"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("replies %q, want %q", got, want)
		}
		io.WriteString(conn, "AUTH PLAIN "+b64("\x00alice\x00secret")+"\r\n")
		readReplies(t, r, 1)
		io.WriteString(conn, "MAIL FROM:<a@example.com>\r\nQUIT\r\n")
		if got := readReplies(t, r, 2); got[0] != "250 2.1.0 Ok" || got[1] != "221 2.0.0 Bye" {
			t.Fatalf("after AUTH: %q", got)
		}
		expectClosed(t, r)
		if rest := <-transcript; rest != "" {
			t.Errorf("the backend got %q after QUIT", rest)
		}
		<-done
	})
}

// A client certificate verified under client_auth counts as authenticated.
func TestRequireAuthClientCertificate(t *testing.T) {
	var tr transactionTracker
	h, _ := newTestHandler(t, requireAuthOn)
	sess := newTestSession(h, nil)
	h.setupTracker(&tr, sess)
	if answer, _ := tr.edgeAnswer([]byte("MAIL FROM:<a@x>")); answer == nil {
		t.Fatal("MAIL passes without AUTH")
	}
	sess.tls = verifiedState()
	tr = transactionTracker{}
	h.setupTracker(&tr, sess)
	if got, _ := tr.edgeAnswer([]byte("MAIL FROM:<a@x>")); got != nil {
		t.Fatalf("with a verified client certificate MAIL gets %q", got)
	}
}

// A client's XCLIENT, XFORWARD or a second STARTTLS never reaches the
// backend, whatever the AUTH state.
func TestEdgeAnswersIdentityAndSTARTTLS(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, via.configure)
		sess := newTestSession(h, nil)
		transcript := make(chan string, 1)
		conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
			ehloExchange(b)
			b.expect("NOOP")
			b.send("250 2.0.0 Ok\r\n")
			b.expect("QUIT")
			b.send("221 2.0.0 Bye\r\n")
			b.finish()
			transcript <- backendTranscript(b)
			return nil
		})
		io.WriteString(conn, "EHLO client.example\r\n")
		readReplies(t, r, 3)
		io.WriteString(conn, "xclient ADDR=1.2.3.4 NAME=trusted.example\r\nXFORWARD ADDR=1.2.3.4\r\nNOOP\r\nSTARTTLS\r\nQUIT\r\n")
		got := readReplies(t, r, 5)
		want := []string{"502 5.5.1 Command not implemented", "502 5.5.1 Command not implemented", "250 2.0.0 Ok",
			"503 5.5.1 TLS already active", "221 2.0.0 Bye"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("replies %q, want %q", got, want)
		}
		expectClosed(t, r)
		if rest := <-transcript; rest != "" {
			t.Errorf("the backend got %q after QUIT", rest)
		}
		<-done
		fields := sessionAccessFields(sess)
		if fields["refused_identity"] != int64(2) || fields["refused_starttls"] != int64(1) || fields["refused_auth_required"] != nil {
			t.Errorf("access line %v, want refused_identity 2, refused_starttls 1", fields)
		}
	})
}

// sessionAccessFields is the session's access line as a map.
func sessionAccessFields(sess *session) map[string]any {
	why, detail := sess.howEnded()
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range sess.accessFields(sess.mode(), why, detail) {
		f.AddTo(enc)
	}
	return enc.Fields
}

// With implicit TLS a client that talks before the backend's greeting gets
// the edge's answers after the greeting, never before it.
func TestEdgeAnswersAfterGreeting(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, via.configure)
		greet := make(chan struct{})
		conn, r, done := serveRelay(t, h, via, false, func(b *backend) error {
			<-greet
			b.send("220 backend ESMTP\r\n")
			b.expect("NOOP")
			b.send("250 2.0.0 Ok\r\n")
			b.finish()
			return nil
		})
		io.WriteString(conn, "XCLIENT ADDR=1.2.3.4\r\nNOOP\r\n")
		close(greet)
		got := readReplies(t, r, 3)
		want := []string{"220 backend ESMTP", "502 5.5.1 Command not implemented", "250 2.0.0 Ok"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("replies %q, want %q", got, want)
		}
		<-done
	})
}

// Bare LF and bare CR reach the backend as CRLF; a "." line that is not
// CRLF "." CRLF stays content; BDAT chunks pass untouched.
func TestNormalizedLineEnds(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, via.configure)
		sess := newTestSession(h, nil)
		got := make(chan string, 1)
		conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
			ehloExchange(b)
			b.expect("MAIL FROM:<a@example.com>")
			b.expect("RCPT TO:<b@example.com>")
			b.expect("DATA")
			b.send("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
			var content strings.Builder
			for {
				line, err := b.r.ReadString('\n')
				if err != nil {
					t.Errorf("reading the content: %v", err)
					return nil
				}
				if line == ".\r\n" {
					break
				}
				content.WriteString(line)
			}
			b.send("250 2.0.0 Ok: queued\r\n")
			b.expect("BDAT 4 LAST")
			chunk := make([]byte, 4)
			io.ReadFull(b.r, chunk)
			content.Write(chunk)
			b.send("250 2.0.0 Ok: queued\r\n")
			got <- content.String()
			b.finish()
			return nil
		})
		io.WriteString(conn, "EHLO client.example\r\n")
		readReplies(t, r, 3)
		io.WriteString(conn, "MAIL FROM:<a@example.com>\nRCPT TO:<b@example.com>\rDATA\r\n")
		readReplies(t, r, 3)
		io.WriteString(conn, "a\nb\rc\r\r\n.\nMAIL FROM:<smuggled@example.com>\r\n\n.\r\n..\r\n.\r\r\nd\r\n.\r\n")
		readReplies(t, r, 1)
		io.WriteString(conn, "BDAT 4 LAST\r\n\n.\r\n")
		readReplies(t, r, 1)
		want := "a\r\nb\r\nc\r\n\r\n..\r\nMAIL FROM:<smuggled@example.com>\r\n\r\n..\r\n..\r\n..\r\n\r\nd\r\n" + "\n.\r\n"
		if content := <-got; content != want {
			t.Errorf("the backend got\n%q\nwant\n%q", content, want)
		}
		<-done
		// two in the commands, six in the content, none in the chunk
		if n := sessionAccessFields(sess)["bare_line_ends"]; n != int64(8) {
			t.Errorf("bare_line_ends %v, want 8", n)
		}
	})
}

// Content sent before DATA's 354 (against RFC 2920) is held until the 354
// says it is content: a shutdown then waits for the message to end, where
// the edge once took the session for idle while the backend was inside a
// message (the defect of the issue, reproduced as it was reported).
func TestShutdownContentBeforeDATAReply(t *testing.T) {
	forEachRelay(t, func(t *testing.T, via relayVia) {
		h, _ := newTestHandler(t, func(h *Handler) { via.configure(h); h.Timeouts.Shutdown = caddy.Duration(time.Hour) })
		sess := newTestSession(h, nil)
		inMessage := make(chan struct{})
		finish := make(chan struct{})
		conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
			ehloExchange(b)
			b.expect("MAIL FROM:<a@example.com>")
			b.send("250 2.1.0 Ok\r\n")
			b.expect("RCPT TO:<b@example.com>")
			b.send("250 2.1.5 Ok\r\n")
			for i := range 2 {
				b.expect("DATA")
				b.send("354 go ahead\r\n")
				for {
					line, err := b.r.ReadString('\n')
					if err != nil || line == ".\r\n" {
						break
					}
				}
				b.send("250 2.0.0 Ok: queued\r\n")
				if i == 0 {
					b.expect("MAIL FROM:<x@example.org>")
					b.expect("RCPT TO:<y@example.org>")
					b.send("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
					close(inMessage)
					<-finish
				}
			}
			b.finish()
			return nil
		})
		io.WriteString(conn, "EHLO client.example\r\n")
		readReplies(t, r, 3)
		io.WriteString(conn, "MAIL FROM:<a@example.com>\r\n")
		readReplies(t, r, 1)
		io.WriteString(conn, "RCPT TO:<b@example.com>\r\n")
		readReplies(t, r, 1)
		io.WriteString(conn, "DATA\r\nSubject: a\r\n\r\n.\r\n")
		io.WriteString(conn, "MAIL FROM:<x@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nSubject: b\r\n\r\nz\r\r\n.\r\n")
		if got := readReplies(t, r, 4); got[1] != "250 2.0.0 Ok: queued" || got[3] != "250 2.1.5 Ok" {
			t.Fatalf("replies %q", got)
		}
		<-inMessage
		sess.drain() // the second DATA is on its way: not idle
		close(finish)
		got := readReplies(t, r, 3)
		if got[0] != "354 go ahead" || got[1] != "250 2.0.0 Ok: queued" || got[2] != shutdownReply {
			t.Fatalf("after the shutdown: %q, want the 354, the message's 250, then %q", got, shutdownReply)
		}
		<-done
	})
}

// xclientBackend greets, answers the edge's EHLO offering XCLIENT, and
// returns the XCLIENT line it got.
func xclientBackend(b *backend, offer string) string {
	b.send("220 backend ESMTP\r\n")
	b.expect("EHLO mail.test")
	b.send("250-backend\r\n250-PIPELINING\r\n250-" + offer + "\r\n250 8BITMIME\r\n")
	line, _ := b.r.ReadString('\n')
	b.send("220 backend ESMTP\r\n")
	return strings.TrimSuffix(line, "\r\n")
}

// With xclient, the backend learns the client's address before any client
// byte, and the client sees none of the edge's own exchange.
func TestXClient(t *testing.T) {
	for _, implicit := range []bool{false, true} {
		t.Run(fmt.Sprintf("implicit %v", implicit), func(t *testing.T) {
			forEachRelay(t, func(t *testing.T, via relayVia) {
				h, _ := newTestHandler(t, func(h *Handler) { via.configure(h); h.XClient = true })
				xclient := make(chan string, 1)
				conn, r, done := serveRelay(t, h, via, !implicit, func(b *backend) error {
					xclient <- xclientBackend(b, "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT")
					b.expect("EHLO client.example")
					b.send("250-backend\r\n250-XCLIENT ADDR\r\n250 PIPELINING\r\n")
					b.expect("QUIT")
					b.send("221 2.0.0 Bye\r\n")
					b.finish()
					return nil
				})
				if implicit {
					if got := readReplies(t, r, 1)[0]; got != "220 backend ESMTP" {
						t.Fatalf("greeting %q", got)
					}
				}
				io.WriteString(conn, "EHLO client.example\r\nQUIT\r\n")
				got := readReplies(t, r, 3)
				if fmt.Sprint(got) != fmt.Sprint([]string{"250-backend", "250 PIPELINING", "221 2.0.0 Bye"}) {
					t.Fatalf("the client got %q", got)
				}
				line := <-xclient
				host, port, _ := net.SplitHostPort(conn.LocalAddr().String())
				dhost, dport, _ := net.SplitHostPort(conn.RemoteAddr().String())
				want := "XCLIENT NAME=[UNAVAILABLE] ADDR=" + host + " PORT=" + port + " DESTADDR=" + dhost + " DESTPORT=" + dport
				if line != want {
					t.Errorf("the backend got %q, want %q", line, want)
				}
				<-done
			})
		})
	}
}

// A backend that does not offer XCLIENT to the edge, or refuses it, gets
// the client a 421 and the operator an Error; the client's bytes never reach
// it.
func TestXClientRefused(t *testing.T) {
	for _, tc := range []struct{ name, offer, reply string }{
		{"not offered", "SIZE 1000", ""},
		{"refused", "XCLIENT ADDR PORT", "550 5.7.0 Error: insufficient authorization\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forEachRelay(t, func(t *testing.T, via relayVia) {
				h, logs := newTestHandler(t, func(h *Handler) { via.configure(h); h.XClient = true })
				sess := newTestSession(h, nil)
				transcript := make(chan string, 1)
				conn, r, done := serveRelayIn(t, h, via, sess, true, func(b *backend) error {
					b.send("220 backend ESMTP\r\n")
					b.expect("EHLO mail.test")
					b.send("250-backend\r\n250 " + tc.offer + "\r\n")
					if tc.reply != "" {
						b.r.ReadString('\n')
						b.send(tc.reply)
					}
					transcript <- backendTranscript(b)
					return nil
				})
				io.WriteString(conn, "EHLO client.example\r\n")
				if got := readReplies(t, r, 1)[0]; !strings.HasPrefix(got, "421 4.4.1 ") {
					t.Fatalf("the client got %q, want 421 4.4.1", got)
				}
				expectClosed(t, r)
				if rest := <-transcript; rest != "" {
					t.Errorf("the backend got the client's %q", rest)
				}
				<-done
				if why, _ := sess.howEnded(); why != outcomeBackendRefused {
					t.Errorf("outcome %q, want %q", why, outcomeBackendRefused)
				}
				if logs.FilterLevelExact(zapcore.ErrorLevel).Len() != 1 {
					t.Errorf("want one Error; log: %v", logs.All())
				}
			})
		})
	}
}

func TestXText(t *testing.T) {
	if got := xtext("[UNAVAILABLE] a+b=c\x01é"); got != "[UNAVAILABLE]+20a+2Bb+3Dc+01+C3+A9" {
		t.Errorf("xtext = %q", got)
	}
}

func verifiedState() *tls.ConnectionState {
	return &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{}}}}
}
