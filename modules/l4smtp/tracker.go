package l4smtp

import (
	"bytes"
	"encoding/base64"
	"strconv"
)

// maxTrackedCommands bounds how many commands may wait for their replies.
// RFC 2920 clients pipeline a handful; a client with more in flight is read
// no further until replies have come back.
const maxTrackedCommands = 1024

// commandKind is what the reply to a command means for the session.
type commandKind uint8

const (
	kindOther       commandKind = iota
	kindMail                    // MAIL: a 2xx opens a transaction
	kindData                    // DATA: a 354 starts the message content
	kindDataEnd                 // the line "." that ends the content: its reply ends the transaction
	kindBDAT                    // BDAT without LAST, with its chunk
	kindBDATLast                // BDAT LAST, with its chunk: its reply ends the transaction
	kindReset                   // RSET, EHLO, HELO: a 2xx ends any transaction
	kindRcpt                    // RCPT: a 2xx accepts a recipient
	kindAuth                    // AUTH: 235 authenticates, 334 asks for a SASL line
	kindSASL                    // a SASL line that answers a 334 (never a command)
	kindEdgeEHLO                // the edge's own EHLO: its reply is the edge's, never the client's
	kindEdgeXCLIENT             // the edge's own XCLIENT: likewise
)

// maxAuthLine bounds how much of an AUTH command or SASL line is kept to
// find the user name in (a PLAIN or XOAUTH2 initial response): RFC 5321's
// command line limit. The user name of a longer one is not reported.
const maxAuthLine = 512

// bodyState is where the reading of message content after DATA stands in
// the search for its end.
type bodyState uint8

const (
	bodyLineStart bodyState = iota // after a CRLF, or at the start of the content
	bodyMid
	bodyCR
	bodyDot       // "." at a line start
	bodyDotCR     // "." CR at a line start
	bodyBareStart // normalising: after a bare CR or LF, turned into CRLF
	bodyBareDot   // normalising: "." after a bare line end
	bodyBareDotCR // normalising: "." CR after a bare line end
	bodyPendingCR // normalising: a CR whose LF may follow
)

// queued is a command in the session's queue, in the order the backend gets
// it: forwarded (its reply comes from the backend), answered by the edge
// (answer holds its reply, sent when every reply before it has been), or
// the edge's own (its reply is consumed, never shown).
type queued struct {
	kind   commandKind
	answer []byte
}

// refusal is why the edge answered a command itself.
type refusal uint8

const (
	refusedAuthRequired refusal = iota // a mail command before AUTH (530)
	refusedIdentity                    // a client's XCLIENT or XFORWARD (502)
	refusedSTARTTLS                    // STARTTLS inside TLS (503)
	refusalReasons
)

// refusalNames are the reasons as the access log and the metrics name them.
var refusalNames = [refusalReasons]string{"auth_required", "identity", "starttls"}

// edgeAnswers are the replies the edge gives in place of the backend.
type edgeAnswers struct {
	authRequired []byte // MAIL, RCPT, DATA, BDAT before AUTH, with require_auth
	notAllowed   []byte // a client's XCLIENT, XFORWARD
	tlsActive    []byte // STARTTLS inside TLS
}

var defaultEdgeAnswers = edgeAnswers{
	authRequired: []byte("530 5.7.0 Authentication required\r\n"),
	notAllowed:   []byte("502 5.5.1 Command not implemented\r\n"),
	tlsActive:    []byte("503 5.5.1 TLS already active\r\n"),
}

// transactionTracker is the edge's one reading of the session after TLS,
// and the queue of its commands. It reads the client's bytes as the
// backend will (command lines, message content after DATA's 354 up to its
// end, BDAT chunks by their counted size, the SASL lines of an AUTH
// exchange) and writes what the backend gets: the same bytes, with every
// line end a CRLF when it normalises (a bare LF or bare CR becomes CRLF, and
// a "." line that is not CRLF "." CRLF stays content, stuffed as "..", so
// that no backend can end a message where the edge does not), and without
// the commands the edge answers itself. Every command is queued, and the
// backend's replies (reply) are counted against the queue; answers of the
// edge are released in command order (RFC 2920).
//
// Where the meaning of what follows depends on a reply (after DATA, AUTH,
// a SASL line, the edge's own commands) the tracker reads no further until
// that reply has come: waiting reports it. A reply that answers nothing
// sent, or that cannot answer the command it pairs with, makes the state
// unknown (lost).
type transactionTracker struct {
	queue []queued // commands sent, in order
	head  int      // queue[head:] await their replies

	normalize   bool // turn bare CR and LF into CRLF (see above)
	requireAuth bool // refuse mail commands until AUTH succeeds
	authed      bool // AUTH succeeded, or the client's certificate was verified
	edge        *edgeAnswers

	line    [32]byte // the start of the command line being read: enough for "BDAT <size> LAST"
	lineLen int      // the length of that line so far
	decided bool     // whether the line in progress is forwarded or answered is known
	answer  []byte   // once decided, the edge's answer to the line (its bytes then go nowhere); nil: the backend gets it
	refusal refusal  // and why
	skipLF  bool     // a CR ended the last line: an LF right after it belongs to it

	inBody    bool // in message content after DATA's 354
	body      bodyState
	chunkLeft int64 // bytes of a BDAT chunk still to come
	chunkKind commandKind
	chunkDrop bool // the chunk's BDAT was answered by the edge: its bytes go nowhere

	barrier       bool // nothing more is read until the reply to the last command
	inTransaction bool // a MAIL command was accepted and its transaction has not ended
	lost          bool // the replies did not pair with the commands; the state is unknown

	// the AUTH exchange in progress: the next line answers a 334
	sasl     bool
	saslMech saslMechanism
	saslStep int    // the SASL lines of the exchange so far
	authLine []byte // an AUTH command or SASL line longer than line, kept up to maxAuthLine
	authUser string // the user name the exchange gave, once known; kept after its end, until the next AUTH
	// the AUTH exchanges that ended since the relay last looked: failed
	// (535) and succeeded (235), for the password guard
	authFailed, authSucceeded int

	ehloPending string // the name of an EHLO or HELO awaiting its reply

	answers []byte // answers of the edge whose turn has come, for the client

	greetingOK bool // the backend's greeting was 2xx (set by the reply filter)

	// the edge's own commands: the reply code, and of the EHLO reply the
	// attributes of its XCLIENT keyword
	edgeCode     [3]byte
	xclientAttrs string
	xclientSeen  bool

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
	user          string              // the user name of the successful AUTH, when the mechanism names one
	messages      int                 // messages accepted (250 to the end of DATA or to BDAT LAST)
	recipients    int                 // recipients accepted (2xx to RCPT)
	refused       [refusalReasons]int // commands the edge answered itself, by reason
	bareLineEnds  int                 // bare CRs and LFs turned into CRLF
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
	return !t.lost && t.head == len(t.queue) && !t.inBody && t.chunkLeft == 0 && !t.inTransaction && len(t.answers) == 0
}

// waiting reports whether the tracker reads no further until a reply has
// come.
func (t *transactionTracker) waiting() bool { return t.barrier && !t.lost }

// awaitingEnd reports whether the end of a message has been passed to the
// backend and its reply is due: ending the session now could leave the
// client without the answer to a message the backend accepts.
func (t *transactionTracker) awaitingEnd() bool {
	for _, q := range t.queue[t.head:] {
		if q.kind == kindDataEnd || q.kind == kindBDATLast {
			return true
		}
	}
	return t.lost
}

// client reads the client's bytes p and appends to dst what the backend
// gets for them. It returns dst and how many bytes of p it read: fewer than
// all when it must wait for a reply before it can read on (waiting).
func (t *transactionTracker) client(dst, p []byte) ([]byte, int) {
	n := 0
	for n < len(p) {
		if t.skipLF && !t.barrier {
			t.skipLF = false
			if p[n] == '\n' {
				n++
				continue
			}
			t.bare()
		}
		if t.lost {
			// the reading is unknown: pass the bytes as they are
			return append(dst, p[n:]...), len(p)
		}
		if t.barrier || len(t.queue)-t.head >= maxTrackedCommands {
			t.barrier = true
			return dst, n
		}
		var used int
		switch {
		case t.chunkLeft > 0:
			used = int(min(int64(len(p)-n), t.chunkLeft))
			if !t.chunkDrop {
				dst = append(dst, p[n:n+used]...)
			}
			t.chunkLeft -= int64(used)
			if t.chunkLeft == 0 {
				t.chunkDone()
			}
		case t.inBody:
			dst, used = t.content(dst, p[n:])
		default:
			dst, used = t.commandBytes(dst, p[n:])
		}
		n += used
	}
	return dst, n
}

// commandBytes reads command (or SASL) line bytes up to the end of the first
// line in p.
func (t *transactionTracker) commandBytes(dst, p []byte) ([]byte, int) {
	var i int
	if t.normalize {
		i = indexLineEnd(p)
	} else {
		i = bytes.IndexByte(p, '\n')
	}
	if i < 0 {
		return t.lineBytes(dst, p), len(p)
	}
	dst = t.lineBytes(dst, p[:i])
	if !t.decided {
		dst = t.decide(dst)
	}
	used := i + 1
	switch {
	case !t.normalize:
		if t.answer == nil {
			dst = append(dst, '\n')
		}
	case p[i] == '\n':
		t.bare()
	case used < len(p) && p[used] == '\n':
		used++
	case used < len(p):
		t.bare()
	default:
		t.skipLF = true // the next read says whether the CR was bare
	}
	if t.normalize && t.answer == nil {
		dst = append(dst, '\r', '\n')
	}
	t.command()
	return dst, used
}

// indexLineEnd is the index of the first CR or LF in p, or -1.
func indexLineEnd(p []byte) int {
	i := bytes.IndexByte(p, '\n')
	if i < 0 {
		i = len(p)
	}
	if j := bytes.IndexByte(p[:i], '\r'); j >= 0 {
		return j
	}
	if i == len(p) {
		return -1
	}
	return i
}

// lineBytes takes bytes of the line in progress (no line end among them):
// they are held until it is known whether the line goes to the backend,
// then passed on as they come.
func (t *transactionTracker) lineBytes(dst, p []byte) []byte {
	held := t.lineLen
	t.appendLine(p)
	if t.decided {
		if t.answer == nil {
			dst = append(dst, p...)
		}
		return dst
	}
	if t.sasl || bytes.IndexByte(t.lineStart(), ' ') >= 0 || t.lineLen >= len(t.line) {
		dst = t.decide(dst)
		if t.answer == nil && t.lineLen > len(t.line) {
			// what did not fit in line comes from p
			dst = append(dst, p[max(0, len(t.line)-held):]...)
		}
	}
	return dst
}

// decide chooses, from the start of the line, whether the edge answers it
// or the backend gets it, and passes on what was held.
func (t *transactionTracker) decide(dst []byte) []byte {
	t.decided = true
	if !t.sasl {
		t.answer, t.refusal = t.edgeAnswer(t.lineStart())
	}
	if t.answer == nil {
		dst = append(dst, t.lineStart()...)
	}
	return dst
}

// lineStart is what line holds of the command line being read.
func (t *transactionTracker) lineStart() []byte { return t.line[:min(t.lineLen, len(t.line))] }

// edgeAnswer is the edge's own answer to a command line that starts with
// line, and why, or nil when the backend answers it.
func (t *transactionTracker) edgeAnswer(line []byte) ([]byte, refusal) {
	if t.edge == nil {
		return nil, 0
	}
	verb, _, _ := bytes.Cut(line, []byte(" "))
	verb = bytes.TrimRight(verb, "\r")
	switch {
	case bytes.EqualFold(verb, []byte("STARTTLS")):
		return t.edge.tlsActive, refusedSTARTTLS
	case bytes.EqualFold(verb, []byte("XCLIENT")), bytes.EqualFold(verb, []byte("XFORWARD")):
		return t.edge.notAllowed, refusedIdentity
	case t.requireAuth && !t.authed && (bytes.EqualFold(verb, []byte("MAIL")) || bytes.EqualFold(verb, []byte("RCPT")) ||
		bytes.EqualFold(verb, []byte("DATA")) || bytes.EqualFold(verb, []byte("BDAT"))):
		return t.edge.authRequired, refusedAuthRequired
	}
	return nil, 0
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

// command queues the command line just completed.
func (t *transactionTracker) command() {
	line, whole := t.wholeLine()
	answer, reason := t.answer, t.refusal
	t.lineLen, t.decided, t.answer = 0, false, nil
	defer clear(t.authLine) // it may hold a password
	t.authLine = t.authLine[:0]
	line = bytes.TrimRight(line, "\r")
	if t.sasl {
		t.sasl = false
		t.saslLine(line, whole)
		clear(t.line[:]) // it may hold a password
		t.push(kindSASL)
		t.barrier = true
		return
	}
	verb, args, _ := bytes.Cut(line, []byte(" "))
	if answer != nil {
		if bytes.EqualFold(verb, []byte("BDAT")) && whole {
			// the chunk that follows is read and dropped (RFC 3030)
			if size, _, ok := parseBDAT(args); ok && size > 0 {
				t.chunkLeft, t.chunkDrop = size, true
			}
		}
		t.facts.refused[reason]++
		t.push(kindOther)
		t.queue[len(t.queue)-1].answer = answer
		t.release()
		return
	}
	switch {
	case bytes.EqualFold(verb, []byte("MAIL")):
		t.push(kindMail)
	case bytes.EqualFold(verb, []byte("DATA")) && whole && len(bytes.TrimSpace(args)) == 0:
		t.push(kindData)
		t.barrier = true // content or commands: the reply says
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
		t.chunkLeft, t.chunkDrop = size, false
		if size == 0 {
			t.chunkDone()
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
		t.barrier = true // SASL lines or commands: the reply says
	default:
		t.push(kindOther)
	}
}

// chunkDone queues a BDAT whose chunk has been read.
func (t *transactionTracker) chunkDone() {
	if t.chunkDrop {
		t.chunkDrop = false // its answer is queued already
		return
	}
	t.push(t.chunkKind)
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

// content reads message content, up to and including its end when p holds
// it, and appends what the backend gets to dst.
func (t *transactionTracker) content(dst, p []byte) ([]byte, int) {
	var n int
	var ended bool
	if t.normalize {
		dst, n, ended = t.normalizeContent(dst, p)
	} else {
		n, ended = t.scanBody(p)
		dst = append(dst, p[:n]...)
	}
	if ended {
		t.inBody = false
		t.push(kindDataEnd)
	}
	return dst, n
}

// scanBody looks for the end of message content (CRLF "." CRLF, RFC 5321
// 4.1.1.4) in p, without normalising. It returns how many bytes of p belong
// to the content, and whether they include its end.
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

// normalizeContent reads message content as normalising asks: every bare CR
// and bare LF becomes CRLF, and only CRLF "." CRLF, as the client sent it,
// ends the content; a "." line with any other line end on either side is
// content, stuffed as ".." so that the backend reads it as the line ".". A
// "." at a line start is held until the next bytes show which it is.
func (t *transactionTracker) normalizeContent(dst, p []byte) ([]byte, int, bool) {
	i := 0
	slow := false // a bare line end is in p: line by line from there
	for i < len(p) {
		c := p[i]
		switch t.body {
		case bodyMid:
			if !slow {
				// the bulk of the content: clean lines at once
				n := cleanLines(p[i:])
				if n > 0 {
					dst = append(dst, p[i:i+n]...)
					i += n
					t.body = bodyLineStart
					continue
				}
				slow = true
			}
			// up to the next CR or LF
			j := indexLineEnd(p[i:])
			if j < 0 {
				return append(dst, p[i:]...), len(p), false
			}
			dst = append(dst, p[i:i+j]...)
			i += j
			c = p[i]
			if c == '\n' {
				t.bare()
				dst = append(dst, '\r', '\n')
				t.body = bodyBareStart
			} else {
				t.body = bodyPendingCR
			}
		case bodyPendingCR:
			if c == '\n' {
				dst = append(dst, '\r', '\n')
				t.body = bodyLineStart
				break
			}
			t.bare()
			dst = append(dst, '\r', '\n')
			t.body = bodyBareStart
			continue // c starts the next line
		case bodyLineStart, bodyBareStart:
			switch c {
			case '.':
				if t.body == bodyLineStart {
					t.body = bodyDot
				} else {
					t.body = bodyBareDot
				}
			case '\r':
				t.body = bodyPendingCR
			case '\n':
				t.bare()
				dst = append(dst, '\r', '\n')
				t.body = bodyBareStart
			default:
				t.body = bodyMid
				continue
			}
		case bodyDot, bodyBareDot:
			switch c {
			case '\r':
				if t.body == bodyDot {
					t.body = bodyDotCR
				} else {
					t.body = bodyBareDotCR
				}
			case '\n':
				// "." ended by a bare LF: content
				t.bare()
				dst = append(dst, "..\r\n"...)
				t.body = bodyBareStart
			default:
				dst = append(dst, '.')
				t.body = bodyMid
				continue
			}
		case bodyDotCR, bodyBareDotCR:
			if c == '\n' {
				if t.body == bodyDotCR {
					return append(dst, ".\r\n"...), i + 1, true
				}
				// CRLF "." after a bare line end: content
				dst = append(dst, "..\r\n"...)
				t.body = bodyLineStart
				break
			}
			// "." ended by a bare CR: content
			t.bare()
			dst = append(dst, "..\r\n"...)
			t.body = bodyBareStart
			continue
		}
		i++
	}
	return dst, len(p), false
}

// cleanLines is the length of the longest start of p that ends with CRLF and
// holds no bare CR or LF and no "." at the start of a line after its first:
// bytes that pass as they are. One search per line for its LF, and one
// count of the CRs of them all: as many CRs as CRLFs means no bare CR.
func cleanLines(p []byte) int {
	n, lines := 0, 0
	for {
		j := bytes.IndexByte(p[n:], '\n')
		if j < 0 {
			break
		}
		j += n
		if j == 0 || p[j-1] != '\r' {
			break // a bare LF: the lines before it
		}
		lines++
		n = j + 1
		if n < len(p) && p[n] == '.' {
			break
		}
	}
	if n == 0 || bytes.Count(p[:n], []byte{'\r'}) != lines {
		return 0
	}
	return n
}

func (t *transactionTracker) bare() { t.facts.bareLineEnds++ }

func (t *transactionTracker) push(k commandKind) {
	if t.head == len(t.queue) {
		t.queue, t.head = t.queue[:0], 0
	}
	t.queue = append(t.queue, queued{kind: k})
}

// inject appends a command of the edge's own to dst and queues it: its
// reply is the edge's (swallowing). Nothing more is read until it comes.
func (t *transactionTracker) inject(dst []byte, line string, k commandKind) []byte {
	t.push(k)
	t.barrier = true
	t.edgeCode = [3]byte{}
	return append(append(dst, line...), '\r', '\n')
}

// swallowing reports whether the next reply answers a command of the
// edge's own, and so is not the client's.
func (t *transactionTracker) swallowing() bool {
	if t.lost || t.head == len(t.queue) {
		return false
	}
	k := t.queue[t.head].kind
	return k == kindEdgeEHLO || k == kindEdgeXCLIENT
}

// swallowedLine reads a line of a reply that swallowing said is the edge's.
func (t *transactionTracker) swallowedLine(line []byte) {
	if t.queue[t.head].kind != kindEdgeEHLO || len(line) < 4 {
		return
	}
	keyword, attrs, _ := bytes.Cut(bytes.TrimRight(line[4:], "\r\n"), []byte(" "))
	if bytes.EqualFold(keyword, []byte("XCLIENT")) {
		t.xclientSeen = true
		t.xclientAttrs = string(attrs)
	}
}

// release moves the answers of the edge that are next in the queue to the
// client's answers, and lets the reading go on once nothing is due.
func (t *transactionTracker) release() {
	for t.head < len(t.queue) && t.queue[t.head].answer != nil {
		t.answers = append(t.answers, t.queue[t.head].answer...)
		t.queue[t.head].answer = nil
		t.head++
	}
	if t.head == len(t.queue) {
		t.barrier = false
	}
}

// takeAnswers appends the answers of the edge whose turn has come to dst.
func (t *transactionTracker) takeAnswers(dst []byte) []byte {
	dst = append(dst, t.answers...)
	t.answers = t.answers[:0]
	return dst
}

// reply observes the code of a complete reply from the backend (after its
// greeting).
func (t *transactionTracker) reply(code [3]byte) {
	if t.lost {
		return
	}
	if t.head == len(t.queue) {
		t.giveUp() // a reply to nothing that was sent
		return
	}
	k := t.queue[t.head].kind
	t.head++
	defer t.release()
	positive := code[0] == '2'
	switch {
	case code == [3]byte{'3', '5', '4'} && k != kindData,
		code == [3]byte{'3', '3', '4'} && k != kindAuth && k != kindSASL:
		// an intermediate reply to a command that has none: the backend
		// reads the stream differently
		t.giveUp()
		return
	}
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
		if positive {
			t.facts.messages++
		}
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
			t.authed = true
			t.authSucceeded++
		default:
			t.facts.authFailures++
			if code == [3]byte{'5', '3', '5'} {
				t.authFailed++
			}
		}
	case kindEdgeEHLO, kindEdgeXCLIENT:
		t.edgeCode = code
	}
	t.release()
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

// giveUp marks the state unknown. The answers of the edge still queued are
// released: they are due, and nothing can be paired any more.
func (t *transactionTracker) giveUp() {
	for _, q := range t.queue[t.head:] {
		if q.answer != nil {
			t.answers = append(t.answers, q.answer...)
		}
	}
	t.lost = true
	t.barrier = false
	t.queue, t.head = nil, 0
}
