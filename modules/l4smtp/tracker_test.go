package l4smtp

import (
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

func runTracker(t *testing.T, steps []trackerStep) *transactionTracker {
	t.Helper()
	var tr transactionTracker
	for i, step := range steps {
		what, arg, _ := strings.Cut(step.event, ":")
		switch what {
		case "C":
			tr.client([]byte(arg))
		case "S":
			tr.reply([3]byte{arg[0], arg[1], arg[2]})
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
	tr.client([]byte("MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"))
	for range 2 {
		tr.reply([3]byte{'2', '5', '0'})
	}
	tr.reply([3]byte{'3', '5', '4'})
	tr.client([]byte("body\r\n"))
	if tr.awaitingEnd() {
		t.Error("awaitingEnd() before the end of the content")
	}
	tr.client([]byte(".\r\n"))
	if !tr.awaitingEnd() {
		t.Error("awaitingEnd() = false after the end of the content")
	}
	tr.reply([3]byte{'4', '5', '1'})
	if tr.awaitingEnd() || !tr.idle() {
		t.Errorf("after the reply to the content: awaitingEnd %v, idle %v; want false, true", tr.awaitingEnd(), tr.idle())
	}
}

func TestTransactionTrackerGivesUpOnTooManyCommands(t *testing.T) {
	var tr transactionTracker
	tr.client([]byte(strings.Repeat("NOOP\r\n", maxTrackedCommands+1)))
	for range maxTrackedCommands + 1 {
		tr.reply([3]byte{'2', '5', '0'})
	}
	if tr.idle() {
		t.Error("idle() after more commands in flight than are tracked")
	}
}

// FuzzTransactionTracker checks that what the tracker concludes does not
// depend on how the client's bytes are cut into reads, in commands, BDAT
// chunks and (starting in it) message content.
func FuzzTransactionTracker(f *testing.F) {
	f.Add([]byte("MAIL FROM:<a@x>\r\nDATA\r\nBDAT 3 LAST\r\nabcNOOP\r\n"), []byte{3, 1, 7, 2, 40}, false)
	f.Add([]byte("x\r\n.\r\r\n..\r\n.\r\nNOOP\n"), []byte{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, true)
	f.Fuzz(func(t *testing.T, client, cuts []byte, content bool) {
		whole := &transactionTracker{inBody: content}
		pieces := &transactionTracker{inBody: content}
		rest := client
		for _, c := range cuts {
			n := min(int(c), len(rest))
			pieces.client(rest[:n])
			rest = rest[n:]
		}
		pieces.client(rest)
		whole.client(client)
		if summary(whole) != summary(pieces) {
			t.Fatalf("whole: %s\npieces: %s", summary(whole), summary(pieces))
		}
	})
}

func summary(tr *transactionTracker) string {
	return fmt.Sprintf("pending %v body %v/%d chunk %d/%d line %d txn %v lost %v",
		tr.pending[tr.head:], tr.inBody, tr.body, tr.chunkLeft, tr.chunkKind, tr.lineLen, tr.inTransaction, tr.lost)
}
