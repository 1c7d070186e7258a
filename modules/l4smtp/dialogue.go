package l4smtp

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

// maxCommandLine is RFC 5321's limit for a command line, CRLF included.
const maxCommandLine = 512

// finalReplyTimeout bounds the write of a reply that precedes a close, which
// may come after the command deadline has already passed.
const finalReplyTimeout = 5 * time.Second

// tlsHandshakeRecord is the first byte of every TLS ClientHello.
const tlsHandshakeRecord = 0x16

// commandsNeedingTLS are refused before TLS with 530 (RFC 3207 4).
var commandsNeedingTLS = [][]byte{
	[]byte("MAIL"), []byte("RCPT"), []byte("DATA"), []byte("BDAT"),
	[]byte("AUTH"), []byte("VRFY"), []byte("EXPN"), []byte("ETRN"),
}

// plaintextDialogue speaks SMTP with the client until it asks for STARTTLS.
// first is what the client sent before the greeting, read while telling
// its mode (see tlsmode.go). It returns the connection to run the TLS
// handshake on, or nil when the session is over (QUIT, timeout, too many
// errors, an injection attempt, or the client went away).
func (h *Handler) plaintextDialogue(sess *session, first []byte) net.Conn {
	s := &dialogue{h: h, cx: sess.cx, sess: sess, in: newLineReader(sess.cx)}
	s.in.w = copy(s.in.buf, first)
	if len(first) > 0 {
		s.in.first, s.in.read = first[0], true
	}
	defer sess.enter(nil)
	if sess.enter(s) {
		s.shutDown()
		return nil
	}
	return s.run(len(first) > 0)
}

type dialogue struct {
	h      *Handler
	cx     *layer4.Connection
	sess   *session
	in     *lineReader
	errors int
}

// run greets and answers commands; talked says the client sent bytes
// before it was greeted.
func (s *dialogue) run(talked bool) net.Conn {
	h := s.h
	if !s.greet(talked) {
		return nil
	}
	for lines := 0; ; lines++ {
		_ = s.cx.SetDeadline(time.Now().Add(h.timeout.command))
		// after the deadline is set: drain's wake-up cannot be undone
		if s.sess.isDraining() {
			s.shutDown()
			return nil
		}
		line, tooLong, err := s.in.readLine()
		if err != nil && s.sess.isDraining() {
			s.shutDown()
			return nil
		}
		if lines == 0 && s.in.startsWith(tlsHandshakeRecord) {
			// a TLS client on a listener that does not detect one
			// (its ClientHello may hold no line end: then it ends
			// with the client's close): it has taken the greeting
			// for a broken TLS record already, and a plaintext reply
			// would only add to that
			s.sess.ended(outcomeUnexpectedTLS, "ClientHello instead of a command")
			s.sess.log().Debug("TLS handshake instead of SMTP on a STARTTLS listener (detect_tls serves such clients); closing")
			return nil
		}
		if err != nil {
			s.readFailed(err)
			return nil
		}
		verb, args := splitCommand(line)

		var reply []byte
		switch {
		case tooLong:
			reply = replyTooLong
		case bytes.EqualFold(verb, []byte("EHLO")):
			reply = h.replies.ehlo
			if len(args) == 0 {
				reply = replyEHLOSyntax
			}
		case bytes.EqualFold(verb, []byte("HELO")):
			reply = h.replies.helo
			if len(args) == 0 {
				reply = replyHELOSyntax
			}
		case bytes.EqualFold(verb, []byte("NOOP")):
			reply = replyOK
		case bytes.EqualFold(verb, []byte("RSET")):
			reply = replyOK
			if len(args) > 0 {
				reply = replyNoParams
			}
		case bytes.EqualFold(verb, []byte("QUIT")):
			s.sess.ended(outcomeQuit, "")
			s.reply(replyBye)
			return nil
		case bytes.EqualFold(verb, []byte("STARTTLS")):
			if len(args) > 0 {
				reply = replyNoParams
				break
			}
			return s.startTLS()
		case needsTLS(verb):
			reply = replyNeedTLS
		default:
			reply = replyUnknown
		}

		if !s.reply(reply) {
			return nil
		}
		if reply[0] == '5' {
			s.errors++
			if s.errors >= h.maxErrors {
				s.sess.ended(outcomeTooManyErrors, "")
				s.sess.log().Debug("too many SMTP errors before TLS; closing",
					zap.Int("errors", s.errors))
				s.finalReply(h.replies.tooMany)
				return nil
			}
		}
	}
}

// greet sends the greeting. With early_talker reject, it sends the first
// line of a multi-line greeting, listens until the pregreet timeout is over
// (counted from the connection's start: detect_tls listened before the
// first line), and ends the session of a client that talks before the final
// line (Postfix postscreen's pregreet test); real clients wait for the
// whole greeting. talked says the client sent bytes before the first line.
func (s *dialogue) greet(talked bool) bool {
	h := s.h
	if h.timeout.pregreet == 0 {
		return s.reply(h.greeting)
	}
	first := append([]byte("220-"), h.greeting[4:]...)
	if !s.reply(first) {
		return false
	}
	if talked {
		return s.earlyTalker()
	}
	_ = s.cx.SetReadDeadline(time.Now().Add(h.timeout.pregreet - h.detectTLS))
	var b [1]byte
	n, err := s.cx.Read(b[:])
	switch {
	case n > 0 && b[0] == tlsHandshakeRecord:
		// a TLS client that started after the first greeting line:
		// it has that line in its stream, and no reply can help it
		s.sess.ended(outcomeUnexpectedTLS, "ClientHello after the first greeting line")
		s.sess.log().Debug("TLS handshake after the first greeting line; closing")
		return false
	case n > 0:
		return s.earlyTalker()
	case !errors.Is(err, os.ErrDeadlineExceeded):
		s.sess.ended(outcomeClientClosed, "before the greeting")
		return false
	}
	return s.reply(h.greeting)
}

// earlyTalker ends the session of a client that talked before the greeting
// was complete.
func (s *dialogue) earlyTalker() bool {
	s.sess.ended(outcomeEarlyTalker, "")
	s.sess.log().Debug("client talked before the greeting; closing")
	s.finalReply(replyEarlyTalker)
	return false
}

// startTLS answers a valid STARTTLS command. Whatever the client sent after
// the STARTTLS line and before its handshake is an injection attempt: those
// bytes must never be read as commands after TLS, so the session ends without
// TLS. The first byte after the 220 must open a TLS handshake record; it is
// handed to the handshake ahead of the rest of the connection.
func (s *dialogue) startTLS() net.Conn {
	// the client is told to start TLS: a shutdown now waits for the
	// handshake and tells it inside TLS
	s.sess.enter(nil)
	if s.in.buffered() > 0 || len(s.cx.MatchingBytes()) > 0 {
		s.injection("command pipelined after STARTTLS")
		s.finalReply(s.h.replies.protocolError)
		return nil
	}
	if !s.reply(replyReady) {
		return nil
	}
	_ = s.cx.SetDeadline(time.Now().Add(s.h.timeout.handshake))
	var first [1]byte
	if _, err := io.ReadFull(s.cx, first[:]); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			s.sess.ended(outcomeTimeout, "handshake")
		} else {
			s.sess.ended(outcomeClientClosed, "after STARTTLS")
		}
		s.sess.log().Debug("no TLS handshake after STARTTLS",
			zap.Error(err))
		return nil
	}
	if first[0] != tlsHandshakeRecord {
		// the client is past the 220 and owes a handshake: no reply
		s.injection("plaintext after STARTTLS instead of a TLS handshake")
		return nil
	}
	return &prefixedConn{Conn: s.cx, prefix: first[:]}
}

// drain wakes the dialogue from its wait for a command, to end it: there is
// never a transaction before TLS.
func (s *dialogue) drain() { _ = s.cx.SetReadDeadline(time.Unix(1, 0)) }

// expire closes a dialogue that drain did not end (one stuck in a write).
func (s *dialogue) expire() { _ = s.cx.Close() }

// shutDown ends the dialogue for shutdown.
func (s *dialogue) shutDown() {
	s.sess.ended(outcomeShutdown, "")
	s.sess.log().Debug("ending session for shutdown")
	s.finalReply(s.h.replies.shuttingDown)
}

func (s *dialogue) injection(what string) {
	s.sess.ended(outcomeInjection, what)
	s.sess.log().Debug("STARTTLS command injection attempt; closing without TLS",
		zap.String("detail", what))
}

// readFailed ends the dialogue after a failed read: a timeout gets its 421,
// anything else (the client went away) just ends.
func (s *dialogue) readFailed(err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.sess.ended(outcomeTimeout, "command")
		s.sess.log().Debug("command timeout before TLS")
		s.finalReply(s.h.replies.timeout)
		return
	}
	s.sess.ended(outcomeClientClosed, "")
	if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		s.sess.log().Debug("reading command before TLS",
			zap.Error(err))
	}
}

func (s *dialogue) reply(b []byte) bool {
	if _, err := s.cx.Write(b); err != nil {
		s.sess.ended(outcomeClientClosed, "")
		s.sess.log().Debug("writing reply before TLS",
			zap.Error(err))
		return false
	}
	return true
}

// finalReply writes the reply that precedes a server-initiated close.
func (s *dialogue) finalReply(b []byte) {
	_ = s.cx.SetWriteDeadline(time.Now().Add(finalReplyTimeout))
	s.reply(b)
}

// splitCommand splits a command line into its verb and the arguments after
// the first space.
func splitCommand(line []byte) (verb, args []byte) {
	verb, args, _ = bytes.Cut(line, []byte(" "))
	return verb, bytes.TrimSpace(args)
}

func needsTLS(verb []byte) bool {
	for _, c := range commandsNeedingTLS {
		if bytes.EqualFold(verb, c) {
			return true
		}
	}
	return false
}

// lineReader reads command lines from the client with a fixed buffer. It is
// used only before TLS, and the dialogue checks that it holds nothing when
// TLS starts, so no plaintext byte can cross into the encrypted session.
type lineReader struct {
	rd    io.Reader
	buf   []byte
	r, w  int
	first byte // the first byte the client sent
	read  bool // first is set
}

func newLineReader(rd io.Reader) *lineReader {
	return &lineReader{rd: rd, buf: make([]byte, 2*maxCommandLine)}
}

// buffered reports how many bytes were read from the client but not yet
// returned as lines.
func (lr *lineReader) buffered() int { return lr.w - lr.r }

// startsWith reports whether the first byte the client sent is b, however
// long the first line was.
func (lr *lineReader) startsWith(b byte) bool { return lr.first == b && lr.read }

// readLine returns the next line without its line ending (CRLF, or a bare
// LF, which clients in the wild send). A line longer than RFC 5321 allows is
// read and discarded to its end, and reported with tooLong set. The returned
// slice is valid until the next call.
func (lr *lineReader) readLine() (line []byte, tooLong bool, err error) {
	for {
		if i := bytes.IndexByte(lr.buf[lr.r:lr.w], '\n'); i >= 0 {
			line = lr.buf[lr.r : lr.r+i]
			lr.r += i + 1
			line = bytes.TrimSuffix(line, []byte("\r"))
			if tooLong || len(line)+2 > maxCommandLine {
				return nil, true, nil
			}
			return line, false, nil
		}
		if lr.w-lr.r >= maxCommandLine {
			// no line end within the limit: drop what we have and
			// keep reading until the line ends
			tooLong = true
			lr.r, lr.w = 0, 0
		}
		if lr.r > 0 {
			lr.w = copy(lr.buf, lr.buf[lr.r:lr.w])
			lr.r = 0
		}
		n, err := lr.rd.Read(lr.buf[lr.w:])
		if n > 0 && !lr.read {
			lr.first, lr.read = lr.buf[lr.w], true
		}
		lr.w += n
		if err != nil && n == 0 {
			return nil, false, err
		}
	}
}

// Interface guards
var _ phase = (*dialogue)(nil)
