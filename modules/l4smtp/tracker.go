package l4smtp

import (
	"bytes"
	"strconv"
)

// maxTrackedCommands bounds how many commands may wait for their replies
// before a session stops being tracked. RFC 2920 clients pipeline a handful;
// a client with more in flight simply loses the early end at shutdown.
const maxTrackedCommands = 1024

// commandKind is what the reply to a client command means for the mail
// transaction.
type commandKind uint8

const (
	kindOther    commandKind = iota
	kindMail                 // MAIL: a 2xx opens a transaction
	kindData                 // DATA: a 354 starts the message content
	kindDataEnd              // the line "." that ends the content: its reply ends the transaction
	kindBDAT                 // BDAT without LAST, with its chunk
	kindBDATLast             // BDAT LAST, with its chunk: its reply ends the transaction
	kindReset                // RSET, EHLO, HELO: a 2xx ends any transaction
)

// bodyState is where the scan of message content after DATA stands in the
// search for the line "." (RFC 5321 4.1.1.4: CRLF "." CRLF).
type bodyState uint8

const (
	bodyLineStart bodyState = iota // after CRLF, or at the start of the content
	bodyMid
	bodyCR
	bodyDot
	bodyDotCR
)

// transactionTracker follows the session after TLS closely enough to tell
// when it is between mail transactions, which is when a shutdown may end it
// with 421 without losing a message or half-accepting one. It observes the
// client's bytes as the relay passes them on (they are never copied, held or
// changed) for command boundaries, message content after DATA and BDAT
// chunks, and counts the backend's replies against the commands. The backend
// frames the same stream the same way; whenever the counts disagree (a reply
// that answers nothing, too many commands in flight) the tracker gives up
// and the session is only ended when the shutdown grace period is over.
type transactionTracker struct {
	pending []commandKind // commands sent, in order, whose replies are due
	head    int           // pending[head:] are due

	line    [32]byte // the start of the command line being read: enough for "BDAT <size> LAST"
	lineLen int      // the length of that line so far

	inBody    bool // in message content after DATA's 354
	body      bodyState
	chunkLeft int64 // bytes of a BDAT chunk still to come
	chunkKind commandKind

	inTransaction bool // a MAIL command was accepted and its transaction has not ended
	lost          bool // the counts disagreed; the state is unknown
}

// idle reports whether the session is between transactions: nothing the
// client sent awaits a reply, no message content is on its way, and no
// transaction is open.
func (t *transactionTracker) idle() bool {
	return !t.lost && t.head == len(t.pending) && !t.inBody && t.chunkLeft == 0 && !t.inTransaction
}

// awaitingEnd reports whether the end of a message has been passed to the
// backend and its reply is due: ending the session now could leave the
// client without the answer to a message the backend accepts.
func (t *transactionTracker) awaitingEnd() bool {
	for _, k := range t.pending[t.head:] {
		if k == kindDataEnd || k == kindBDATLast {
			return true
		}
	}
	return t.lost
}

// client observes bytes the client sent, as they go to the backend.
func (t *transactionTracker) client(p []byte) {
	for len(p) > 0 && !t.lost {
		switch {
		case t.chunkLeft > 0:
			n := int64(len(p))
			if n > t.chunkLeft {
				n = t.chunkLeft
			}
			t.chunkLeft -= n
			p = p[n:]
			if t.chunkLeft == 0 {
				t.push(t.chunkKind)
			}
		case t.inBody:
			n, ended := t.scanBody(p)
			p = p[n:]
			if ended {
				t.inBody = false
				t.push(kindDataEnd)
			}
		default:
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				t.appendLine(p)
				return
			}
			t.appendLine(p[:i])
			p = p[i+1:]
			t.command()
		}
	}
}

// appendLine keeps the start of the command line.
func (t *transactionTracker) appendLine(p []byte) {
	if t.lineLen < len(t.line) {
		copy(t.line[t.lineLen:], p)
	}
	t.lineLen += len(p)
}

// command classifies the command line just completed.
func (t *transactionTracker) command() {
	line := t.line[:min(t.lineLen, len(t.line))]
	whole := t.lineLen <= len(t.line)
	t.lineLen = 0
	line = bytes.TrimRight(line, "\r")
	verb, args, _ := bytes.Cut(line, []byte(" "))
	switch {
	case bytes.EqualFold(verb, []byte("MAIL")):
		t.push(kindMail)
	case bytes.EqualFold(verb, []byte("DATA")) && whole && len(bytes.TrimSpace(args)) == 0:
		t.push(kindData)
	case bytes.EqualFold(verb, []byte("BDAT")) && whole:
		size, last, ok := parseBDAT(args)
		if !ok {
			t.push(kindOther) // refused without a chunk
			return
		}
		t.chunkKind = kindBDAT
		if last {
			t.chunkKind = kindBDATLast
		}
		t.chunkLeft = size
		if size == 0 {
			t.push(t.chunkKind)
		}
	case bytes.EqualFold(verb, []byte("RSET")), bytes.EqualFold(verb, []byte("EHLO")), bytes.EqualFold(verb, []byte("HELO")):
		t.push(kindReset)
	default:
		t.push(kindOther)
	}
}

// parseBDAT reads "<size>" or "<size> LAST" (RFC 3030).
func parseBDAT(args []byte) (size int64, last bool, ok bool) {
	fields := bytes.Fields(args)
	switch {
	case len(fields) == 2 && bytes.EqualFold(fields[1], []byte("LAST")):
		last = true
	case len(fields) != 1:
		return 0, false, false
	}
	size, err := strconv.ParseInt(string(fields[0]), 10, 64)
	if err != nil || size < 0 {
		return 0, false, false
	}
	return size, last, true
}

// scanBody looks for the end of message content in p. It returns how many
// bytes of p belong to the content, and whether they include its end.
func (t *transactionTracker) scanBody(p []byte) (int, bool) {
	for i := 0; i < len(p); {
		switch t.body {
		case bodyMid:
			j := bytes.IndexByte(p[i:], '\r')
			if j < 0 {
				return len(p), false
			}
			i += j + 1
			t.body = bodyCR
			continue
		case bodyCR:
			switch p[i] {
			case '\n':
				t.body = bodyLineStart
			case '\r':
			default:
				t.body = bodyMid
			}
		case bodyLineStart:
			switch p[i] {
			case '.':
				t.body = bodyDot
			case '\r':
				t.body = bodyCR
			default:
				t.body = bodyMid
			}
		case bodyDot:
			if p[i] == '\r' {
				t.body = bodyDotCR
			} else {
				t.body = bodyMid
			}
		case bodyDotCR:
			switch p[i] {
			case '\n':
				return i + 1, true
			case '\r':
				t.body = bodyCR
			default:
				t.body = bodyMid
			}
		}
		i++
	}
	return len(p), false
}

func (t *transactionTracker) push(k commandKind) {
	if len(t.pending)-t.head >= maxTrackedCommands {
		t.giveUp()
		return
	}
	if t.head == len(t.pending) {
		t.pending, t.head = t.pending[:0], 0
	}
	t.pending = append(t.pending, k)
}

// reply observes the code of a complete reply from the backend (after its
// greeting).
func (t *transactionTracker) reply(code [3]byte) {
	if t.lost {
		return
	}
	if t.head == len(t.pending) {
		t.giveUp() // a reply to nothing that was sent
		return
	}
	k := t.pending[t.head]
	t.head++
	positive := code[0] == '2'
	switch k {
	case kindMail:
		if positive {
			t.inTransaction = true
		}
	case kindData:
		if code == [3]byte{'3', '5', '4'} {
			t.inBody, t.body = true, bodyLineStart
		}
	case kindDataEnd, kindBDATLast:
		t.inTransaction = false
	case kindReset:
		if positive {
			t.inTransaction = false
		}
	}
}

func (t *transactionTracker) giveUp() {
	t.lost = true
	t.pending, t.head = nil, 0
}
