package l4smtp

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
)

// trackerStep is client bytes ("C:...") or a backend reply code ("S:250"),
// and whether the session is between transactions afterwards.
type trackerStep struct {
	event string
	idle  bool
}

// trackerFeed feeds a tracker as the relay does: client bytes it cannot
// read yet (it waits for a reply) are held and fed again after each reply.
type trackerFeed struct {
	tr   *transactionTracker
	held []byte
	out  []byte // what the backend got
}

func (f *trackerFeed) client(p []byte) {
	f.held = append(f.held, p...)
	f.pump()
}

func (f *trackerFeed) reply(code string) {
	f.tr.reply([3]byte{code[0], code[1], code[2]})
	f.pump()
}

func (f *trackerFeed) pump() {
	var n int
	f.out, n = f.tr.client(f.out, f.held)
	f.held = f.held[n:]
}

func runTracker(t *testing.T, steps []trackerStep) *transactionTracker {
	t.Helper()
	var tr transactionTracker
	feed := trackerFeed{tr: &tr}
	for i, step := range steps {
		what, arg, _ := strings.Cut(step.event, ":")
		switch what {
		case "C":
			feed.client([]byte(arg))
		case "S":
			feed.reply(arg)
		default:
			t.Fatalf("bad step %q", step.event)
		}
		if got := tr.idle(); got != step.idle {
			t.Fatalf("after step %d (%q): idle() = %v, want %v (state %+v)", i, step.event, got, step.idle, tr)
		}
	}
	return &tr
}

func TestTransactionTracker(t *testing.T) {
	tests := []struct {
		name  string
		steps []trackerStep
	}{
		{"EHLO and NOOP", []trackerStep{
			{"C:EHLO client\r\n", false}, {"S:250", true},
			{"C:NOOP\r\n", false}, {"S:250", true},
		}},
		{"a command split anywhere", []trackerStep{
			{"C:NO", true}, {"C:OP\r", true}, {"C:\n", false}, {"S:250", true},
		}},
		{"DATA transaction", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\n", false}, {"S:250", false},
			{"C:RCPT TO:<b@x>\r\n", false}, {"S:250", false},
			{"C:DATA\r\n", false}, {"S:354", false},
			{"C:Subject: x\r\n\r\nbody\r\n", false},
			{"C:.\r\n", false},
			{"S:250", true},
		}},
		{"pipelined transaction, end of content split", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n", false},
			{"S:250", false}, {"S:250", false}, {"S:354", false},
			{"C:line\r", false}, {"C:\n.", false}, {"C:\r", false}, {"C:\nQUIT\r\n", false},
			{"S:250", false}, // QUIT is in flight
			{"S:221", true},
		}},
		{"content lines that look like commands", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\n", false}, {"S:250", false},
			{"C:DATA\r\n", false}, {"S:354", false},
			{"C:RSET\r\n..\r\n.x\r\nQUIT\r\n", false},
			{"S:250", false}, // a reply to nothing that was sent: the state is unknown
		}},
		{"refused MAIL opens nothing", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\n", false}, {"S:550", true},
		}},
		{"DATA refused", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\n", false}, {"S:250", false},
			{"C:DATA\r\n", false}, {"S:554", false},
			{"C:RSET\r\n", false}, {"S:250", true},
		}},
		{"BDAT chunks", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n", false}, {"S:250", false}, {"S:250", false},
			{"C:BDAT 10\r\n0123", false}, {"C:456789", false},
			{"C:BDAT 5 LAST\r\nab\r\n.", false},
			{"S:250", false}, // the first chunk
			{"S:250", true},  // the last
		}},
		{"BDAT LAST with an empty chunk", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\n", false}, {"S:250", false},
			{"C:bdat 0 last\r\n", false}, {"S:250", true},
		}},
		{"bad BDAT takes no chunk", []trackerStep{
			{"C:BDAT x\r\n", false}, {"S:501", true},
		}},
		{"RSET ends a transaction", []trackerStep{
			{"C:MAIL FROM:<a@x>\r\n", false}, {"S:250", false},
			{"C:RSET\r\n", false}, {"S:250", true},
		}},
		{"AUTH exchange", []trackerStep{
			{"C:AUTH LOGIN\r\n", false}, {"S:334", true},
			{"C:dXNlcg==\r\n", false}, {"S:334", true},
			{"C:cGFzcw==\r\n", false}, {"S:235", true},
		}},
		{"unsolicited reply", []trackerStep{
			{"S:421", false},
			{"C:NOOP\r\n", false}, {"S:250", false},
		}},
		{"over-long line", []trackerStep{
			{"C:MAIL FROM:<" + strings.Repeat("a", 3000) + "@x>", true},
			{"C:\r\n", false}, {"S:250", false},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { runTracker(t, tc.steps) })
	}
}

func TestTransactionTrackerAwaitingEnd(t *testing.T) {
	var tr transactionTracker
	feed := trackerFeed{tr: &tr}
	feed.client([]byte("MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"))
	for range 2 {
		feed.reply("250")
	}
	feed.reply("354")
	feed.client([]byte("body\r\n"))
	if tr.awaitingEnd() {
		t.Error("awaitingEnd() before the end of the content")
	}
	feed.client([]byte(".\r\n"))
	if !tr.awaitingEnd() {
		t.Error("awaitingEnd() = false after the end of the content")
	}
	feed.reply("451")
	if tr.awaitingEnd() || !tr.idle() {
		t.Errorf("after the reply to the content: awaitingEnd %v, idle %v; want false, true", tr.awaitingEnd(), tr.idle())
	}
}

// TestTransactionTrackerWaitsOnTooManyCommands: a client with more
// commands in flight than are tracked is read no further until replies
// come, and nothing is lost.
func TestTransactionTrackerWaitsOnTooManyCommands(t *testing.T) {
	var tr transactionTracker
	feed := trackerFeed{tr: &tr}
	feed.client([]byte(strings.Repeat("NOOP\r\n", maxTrackedCommands+1)))
	if !tr.waiting() || len(feed.held) != len("NOOP\r\n") {
		t.Fatalf("waiting %v with %d bytes held, want the last NOOP held", tr.waiting(), len(feed.held))
	}
	for range maxTrackedCommands + 1 {
		feed.reply("250")
	}
	if !tr.idle() || len(feed.held) != 0 {
		t.Errorf("idle %v with %d bytes held after every reply", tr.idle(), len(feed.held))
	}
}

// FuzzTransactionTracker checks that what the tracker concludes, and what
// the backend gets, does not depend on how the client's bytes are cut into
// reads: in commands, BDAT chunks and (starting in it) message content,
// normalising or not, with the edge's answers or not. The replies are
// scripted: each time the tracker waits, the next code in replies answers.
func FuzzTransactionTracker(f *testing.F) {
	f.Add([]byte("MAIL FROM:<a@x>\r\nDATA\r\nBDAT 3 LAST\r\nabcNOOP\r\n"), []byte{3, 1, 7, 2, 40}, false, uint8(0))
	f.Add([]byte("x\r\n.\r\r\n..\r\n.\r\nNOOP\n"), []byte{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, true, uint8(1))
	f.Add([]byte("EHLO c.example\r\nAUTH PLAIN "+b64("\x00"+strings.Repeat("u", 40)+"\x00pw")+"\r\nRCPT TO:<b@x>\r\n"), []byte{5, 30, 2, 9}, false, uint8(3))
	f.Add([]byte("a\n.\nMAIL FROM:<x>\r\n\r.\r\r\n.\r\nXCLIENT ADDR=1.2.3.4\rBDAT 2\r\nxyDATA\r\n"), []byte{2, 3, 1, 1, 5}, true, uint8(3))
	f.Fuzz(func(t *testing.T, client, cuts []byte, content bool, mode uint8) {
		run := func(pieces [][]byte) (string, []byte) {
			tr := &transactionTracker{inBody: content, normalize: mode&1 != 0, requireAuth: mode&2 != 0}
			if mode&2 != 0 {
				tr.edge = &defaultEdgeAnswers
			}
			feed := trackerFeed{tr: tr}
			replies := []string{"250", "354", "334", "235", "250", "354", "535", "250"}
			for _, p := range pieces {
				feed.client(p)
				for tr.waiting() && len(replies) > 0 {
					feed.reply(replies[0])
					replies = replies[1:]
				}
			}
			return summary(tr), feed.out
		}
		var pieces [][]byte
		rest := client
		for _, c := range cuts {
			n := min(int(c), len(rest))
			pieces = append(pieces, rest[:n])
			rest = rest[n:]
		}
		pieces = append(pieces, rest)
		wholeState, wholeOut := run([][]byte{client})
		piecesState, piecesOut := run(pieces)
		if wholeState != piecesState {
			t.Fatalf("whole: %s\npieces: %s", wholeState, piecesState)
		}
		if !bytes.Equal(wholeOut, piecesOut) {
			t.Fatalf("the backend got\n%q whole,\n%q in pieces", wholeOut, piecesOut)
		}
		if mode&1 != 0 && content {
			checkNormalized(t, wholeOut)
		}
	})
}

// checkNormalized: what a normalising tracker passes on has no bare CR or
// LF outside BDAT chunks.
func checkNormalized(t *testing.T, out []byte) {
	t.Helper()
	if bytes.Contains(out, []byte("BDAT")) {
		return // chunks pass unchanged
	}
	for i, c := range out {
		if (c == '\r' && (i+1 == len(out) || out[i+1] != '\n')) || (c == '\n' && (i == 0 || out[i-1] != '\r')) {
			t.Fatalf("bare line end at %d in %q", i, out)
		}
	}
}

func summary(tr *transactionTracker) string {
	return fmt.Sprintf("queue %v body %v/%d chunk %d/%d/%v line %d txn %v lost %v wait %v facts %+v sasl %v/%d/%d user %q answers %q",
		tr.queue[tr.head:], tr.inBody, tr.body, tr.chunkLeft, tr.chunkKind, tr.chunkDrop, tr.lineLen, tr.inTransaction, tr.lost,
		tr.barrier, tr.facts, tr.sasl, tr.saslMech, tr.saslStep, tr.authUser+"|"+tr.ehloPending, tr.answers)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// TestTrackerFacts: what the access log reports of a session after TLS, as
// the backend's replies confirmed it, with no secret kept.
func TestTrackerFacts(t *testing.T) {
	longUser := strings.Repeat("u", 100) + "@example.com"
	tests := []struct {
		name   string
		events []string // "C:" client bytes, "S:" reply code
		want   sessionFacts
	}{
		{"EHLO", []string{"C:EHLO client.example\r\n", "S:250"}, sessionFacts{ehlo: "client.example"}},
		{"refused EHLO, then HELO", []string{"C:EHLO\r\n", "S:501", "C:HELO other.example\r\n", "S:250"}, sessionFacts{ehlo: "other.example"}},
		{"AUTH PLAIN with an initial response", []string{"C:AUTH PLAIN " + b64("\x00alice\x00secret") + "\r\n", "S:235"},
			sessionFacts{authAttempts: 1, authSuccesses: 1, user: "alice"}},
		{"AUTH PLAIN, wrong password", []string{"C:AUTH PLAIN " + b64("\x00alice\x00wrong") + "\r\n", "S:535"},
			sessionFacts{authAttempts: 1, authFailures: 1}},
		{"AUTH PLAIN after 334, a long user name split", []string{"C:auth plain\r\n", "S:334",
			"C:" + b64("\x00" + longUser + "\x00secret")[:20], "C:" + b64("\x00" + longUser + "\x00secret")[20:] + "\r\n", "S:235"},
			sessionFacts{authAttempts: 1, authSuccesses: 1, user: longUser}},
		{"AUTH LOGIN", []string{"C:AUTH LOGIN\r\n", "S:334", "C:" + b64("alice") + "\r\n", "S:334", "C:" + b64("secret") + "\r\n", "S:235"},
			sessionFacts{authAttempts: 1, authSuccesses: 1, user: "alice"}},
		{"AUTH LOGIN with an initial response", []string{"C:AUTH LOGIN " + b64("alice") + "\r\n", "S:334", "C:" + b64("secret") + "\r\n", "S:235"},
			sessionFacts{authAttempts: 1, authSuccesses: 1, user: "alice"}},
		{"AUTH XOAUTH2", []string{"C:AUTH XOAUTH2 " + b64("user=bob@example.com\x01auth=Bearer token\x01\x01") + "\r\n", "S:235"},
			sessionFacts{authAttempts: 1, authSuccesses: 1, user: "bob@example.com"}},
		{"AUTH CRAM-MD5: no user name read", []string{"C:AUTH CRAM-MD5\r\n", "S:334", "C:" + b64("alice 0123456789abcdef") + "\r\n", "S:235"},
			sessionFacts{authAttempts: 1, authSuccesses: 1}},
		{"a SASL line that reads like a command is not one", []string{"C:AUTH LOGIN\r\n", "S:334", "C:EHLO\r\n", "S:334", "C:RSET\r\n", "S:535"},
			sessionFacts{authAttempts: 1, authFailures: 1}},
		{"three guesses", []string{
			"C:AUTH PLAIN " + b64("\x00a\x00x") + "\r\n", "S:535",
			"C:AUTH PLAIN " + b64("\x00a\x00y") + "\r\n", "S:535",
			"C:AUTH PLAIN " + b64("\x00a\x00z") + "\r\n", "S:535"},
			sessionFacts{authAttempts: 3, authFailures: 3}},
		{"messages and recipients", []string{
			"C:MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n", "S:250", "S:250", "S:550", "S:250", "S:354",
			"C:body\r\n.\r\n", "S:250",
			"C:MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 4 LAST\r\nbody", "S:250", "S:250", "S:250",
			"C:MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n", "S:250", "S:250", "S:354", "C:spam\r\n.\r\n", "S:554"},
			sessionFacts{messages: 2, recipients: 4}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var tr transactionTracker
			feed := trackerFeed{tr: &tr}
			for _, e := range tt.events {
				what, arg, _ := strings.Cut(e, ":")
				if what == "C" {
					feed.client([]byte(arg))
				} else {
					feed.reply(arg)
				}
			}
			if tr.facts != tt.want {
				t.Errorf("facts %+v, want %+v", tr.facts, tt.want)
			}
			// the password, in any form the exchange carried it
			for _, secret := range []string{"secret", b64("secret"), b64("\x00alice\x00secret")[:16]} {
				if bytes.Contains(tr.line[:], []byte(secret)) || bytes.Contains(tr.authLine[:cap(tr.authLine)], []byte(secret)) ||
					strings.Contains(fmt.Sprintf("%+v", tr), secret) {
					t.Errorf("the tracker kept the password (%q)", secret)
				}
			}
		})
	}
}
