package l4smtp

import (
	"bytes"
	"encoding/base64"
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
	kindRcpt                 // RCPT: a 2xx accepts a recipient
	kindAuth                 // AUTH: 235 authenticates, 334 asks for a SASL line
	kindSASL                 // a SASL line that answers a 334 (never a command)
)

// maxAuthLine bounds how much of an AUTH command or SASL line is kept to
// find the user name in (a PLAIN or XOAUTH2 initial response): RFC 5321's
// command line limit. The user name of a longer one is not reported.
const maxAuthLine = 512

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

	// the AUTH exchange in progress: the next line answers a 334
	sasl     bool
	saslMech saslMechanism
	saslStep int    // the SASL lines of the exchange so far
	authLine []byte // an AUTH command or SASL line longer than line, kept up to maxAuthLine
	authUser string // the user name the exchange gave, once known

	ehloPending string // the name of an EHLO or HELO awaiting its reply

	facts sessionFacts
}

// sessionFacts are what the access log and the metrics report of the
// session after TLS, as the replies confirmed them. No secret is kept: of an
// AUTH exchange only the user name.
type sessionFacts struct {
	ehlo          string // the name of the last accepted EHLO or HELO
	authAttempts  int
	authSuccesses int
	authFailures  int
	user          string // the user name of the successful AUTH, when the mechanism names one
	messages      int    // messages accepted (250 to the end of DATA or to BDAT LAST)
	recipients    int    // recipients accepted (2xx to RCPT)
}

// saslMechanism is an AUTH mechanism whose user name the tracker can read.
type saslMechanism uint8

const (
	mechOther   saslMechanism = iota
	mechPlain                 // authzid NUL authcid NUL password (RFC 4616)
	mechLogin                 // the user name, then the password, each its own line
	mechXOAUTH2               // "user=" name ^A "auth=Bearer " token ^A ^A
)

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

// appendLine keeps the start of the command line, and the whole of an
// AUTH command or SASL line up to maxAuthLine.
func (t *transactionTracker) appendLine(p []byte) {
	if t.lineLen < len(t.line) {
		n := copy(t.line[t.lineLen:], p)
		t.lineLen += n
		p = p[n:]
		if len(p) == 0 {
			return
		}
	}
	// past the start of the line, wherever the pieces were cut: only an
	// AUTH command or a SASL line is kept on
	if t.lineLen == len(t.line) && (t.sasl || bytes.EqualFold(t.line[:5], []byte("AUTH "))) {
		t.authLine = append(t.authLine[:0], t.line[:]...)
	}
	if len(t.authLine) > 0 && len(t.authLine) == t.lineLen {
		t.authLine = append(t.authLine, p[:min(len(p), maxAuthLine-len(t.authLine))]...)
	}
	t.lineLen += len(p)
}

// wholeLine is the command line just completed, as much of it as was kept.
func (t *transactionTracker) wholeLine() (line []byte, whole bool) {
	if t.lineLen <= len(t.line) {
		return t.line[:t.lineLen], true
	}
	if len(t.authLine) > 0 && len(t.authLine) == t.lineLen {
		return t.authLine, true
	}
	return t.line[:], false
}

// command classifies the command line just completed.
func (t *transactionTracker) command() {
	line, whole := t.wholeLine()
	t.lineLen = 0
	defer clear(t.authLine) // it may hold a password
	t.authLine = t.authLine[:0]
	line = bytes.TrimRight(line, "\r")
	if t.sasl {
		t.sasl = false
		t.saslLine(line, whole)
		clear(t.line[:]) // it may hold a password
		t.push(kindSASL)
		return
	}
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
	case bytes.EqualFold(verb, []byte("EHLO")), bytes.EqualFold(verb, []byte("HELO")):
		if whole {
			t.ehloPending = string(bytes.TrimSpace(args))
		}
		t.push(kindReset)
	case bytes.EqualFold(verb, []byte("RSET")):
		t.push(kindReset)
	case bytes.EqualFold(verb, []byte("RCPT")):
		t.push(kindRcpt)
	case bytes.EqualFold(verb, []byte("AUTH")):
		t.startAuth(args, whole)
		clear(t.line[:]) // an initial response may hold a password
		t.push(kindAuth)
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
			if t.ehloPending != "" {
				t.facts.ehlo = t.ehloPending
			}
		}
		t.ehloPending = ""
	case kindRcpt:
		if positive {
			t.facts.recipients++
		}
	case kindAuth, kindSASL:
		switch {
		case code == [3]byte{'3', '3', '4'}:
			t.sasl = true
		case code == [3]byte{'2', '3', '5'}:
			t.facts.authSuccesses++
			t.facts.user = t.authUser
		default:
			t.facts.authFailures++
		}
	}
	if positive && (k == kindDataEnd || k == kindBDATLast) {
		t.facts.messages++
	}
}

// startAuth begins an AUTH exchange: "AUTH <mechanism> [initial response]".
func (t *transactionTracker) startAuth(args []byte, whole bool) {
	t.facts.authAttempts++
	mech, response, hasResponse := bytes.Cut(bytes.TrimSpace(args), []byte(" "))
	switch {
	case bytes.EqualFold(mech, []byte("PLAIN")):
		t.saslMech = mechPlain
	case bytes.EqualFold(mech, []byte("LOGIN")):
		t.saslMech = mechLogin
	case bytes.EqualFold(mech, []byte("XOAUTH2")):
		t.saslMech = mechXOAUTH2
	default:
		t.saslMech = mechOther
	}
	t.saslStep, t.authUser = 0, ""
	if hasResponse {
		t.saslLine(response, whole)
	}
}

// saslLine reads the user name from a SASL response of the exchange (an
// initial response, or a line that answers a 334), and nothing else.
func (t *transactionTracker) saslLine(line []byte, whole bool) {
	step := t.saslStep
	t.saslStep++
	if !whole || t.saslMech == mechOther || (t.saslMech == mechLogin && step > 0) {
		return // only LOGIN's first line is its user name; the next is the password
	}
	decoded := make([]byte, base64.StdEncoding.DecodedLen(len(line)))
	n, err := base64.StdEncoding.Decode(decoded, bytes.TrimSpace(line))
	defer clear(decoded)
	if err != nil {
		return
	}
	decoded = decoded[:n]
	var user []byte
	switch t.saslMech {
	case mechPlain:
		parts := bytes.SplitN(decoded, []byte{0}, 3)
		if len(parts) == 3 {
			user = parts[1]
		}
	case mechLogin:
		user = decoded
	case mechXOAUTH2:
		field, _, _ := bytes.Cut(decoded, []byte{1})
		user, _ = bytes.CutPrefix(field, []byte("user="))
	}
	if len(user) > 0 && len(user) <= 256 {
		t.authUser = string(user)
	}
}

func (t *transactionTracker) giveUp() {
	t.lost = true
	t.pending, t.head = nil, 0
}
