package l4smtp

import "bytes"

// maxReplyLine bounds how much of one backend reply line is held while it is
// incomplete. RFC 5321 allows 512 octets; a longer line is passed on as it
// arrives, and the rest of its reply is not filtered.
const maxReplyLine = 8192

// hiddenExtensions are the EHLO keywords the client must never see from the
// backend: STARTTLS (the client is already inside TLS; offering it again
// invites a downgrade), and XCLIENT and XFORWARD (they are for the edge, not
// for clients).
var hiddenExtensions = [][]byte{[]byte("STARTTLS"), []byte("XCLIENT"), []byte("XFORWARD")}

// replyFilter rewrites the backend's replies on their way to the client. It
// sees the stream in whatever pieces it arrives in and keeps its state
// between them. It
//   - swallows the backend's greeting when the edge has greeted the client
//     already (STARTTLS mode); a greeting that is not 2xx is passed on instead,
//     as the answer to the client's EHLO, and the backend's own answer to that
//     EHLO is dropped so replies stay paired with commands;
//   - swallows the replies to the edge's own commands (the tracker says
//     which), and puts the edge's own answers to the client's commands in
//     their place in command order;
//   - removes hiddenExtensions from multi-line 250 replies (never the first
//     line, which names the server), and turns the last line that is left into
//     the final line of the reply.
//
// Everything else passes unchanged.
type replyFilter struct {
	swallowGreeting bool
	tracker         *transactionTracker // told of every complete reply after the greeting; may be nil

	greeted      bool // the greeting has been seen to its final line
	keepGreeting bool // the greeting goes to the client
	dropReply    bool // drop the reply in progress or the next one
	inReply      bool // after the first line of a multi-line reply
	swallow      bool // the reply in progress answers a command of the edge's own
	filtering    bool // the multi-line reply in progress is a 250 reply
	lastCode     [3]byte

	held    []byte // the last kept line of a filtered reply, not yet passed on
	partial []byte // an incomplete line
	cut     bool   // an over-long line is passing; its tail goes to LF
	cutKeep bool   // whether that tail is passed on or dropped
}

// greetingDone reports whether the backend's greeting has been seen.
func (f *replyFilter) greetingDone() bool { return f.greeted }

// lastReply is the code of the last complete reply.
func (f *replyFilter) lastReply() string { return string(f.lastCode[:]) }

// midReply reports whether part of a reply has been seen but not its end.
func (f *replyFilter) midReply() bool { return f.inReply || len(f.partial) > 0 || f.cut }

// process appends to dst what the client gets for the backend bytes p.
func (f *replyFilter) process(dst, p []byte) []byte {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if f.cut {
			end := len(p)
			if i >= 0 {
				end = i + 1
				f.cut = false
			}
			if f.cutKeep {
				dst = append(dst, p[:end]...)
			}
			p = p[end:]
			continue
		}
		if i < 0 {
			if len(f.partial)+len(p) <= maxReplyLine {
				f.partial = append(f.partial, p...)
				return dst
			}
			line := append(f.partial, p...)
			f.partial = f.partial[:0]
			dst, f.cutKeep = f.line(dst, line, true)
			f.cut = true
			return dst
		}
		line := p[:i+1]
		if len(f.partial) > 0 {
			f.partial = append(f.partial, line...)
			line = f.partial
		}
		p = p[i+1:]
		dst, _ = f.line(dst, line, false)
		f.partial = f.partial[:0]
		if f.tracker != nil && len(f.tracker.answers) > 0 && !f.inReply {
			// the edge's answers to the commands after this reply's
			dst = f.tracker.takeAnswers(dst)
		}
	}
	return dst
}

// line handles one line (with its line end, unless cut: then it is the start
// of an over-long line whose tail follows). It reports whether the line is
// passed on.
func (f *replyFilter) line(dst, line []byte, cut bool) ([]byte, bool) {
	code, sep, ok := parseReplyLine(line)
	final := !ok || sep != '-'
	first := !f.inReply
	f.inReply = !final

	if !f.greeted {
		if first {
			f.keepGreeting = !f.swallowGreeting || !ok || code[0] != '2'
		}
		if final {
			f.greeted = true
			f.lastCode = code
			f.dropReply = f.swallowGreeting && f.keepGreeting
			if f.tracker != nil {
				f.tracker.greetingOK = ok && code[0] == '2'
			}
		}
		if f.keepGreeting {
			return append(dst, line...), true
		}
		return dst, false
	}

	if first && f.tracker != nil && f.tracker.swallowing() {
		f.swallow = true
	}
	if f.swallow {
		f.tracker.swallowedLine(line)
		if final {
			f.swallow = false
			f.tracker.reply(code)
		}
		return dst, false
	}
	if final && f.tracker != nil {
		f.tracker.reply(code) // dropped or not, it answers a command
	}
	if f.dropReply {
		if final {
			f.dropReply = false
		}
		return dst, false
	}
	if final {
		f.lastCode = code
	}

	switch {
	case first && final: // a single-line reply: the common case
		return append(dst, line...), true
	case first:
		f.filtering = ok && string(code[:]) == "250"
	case f.filtering && ok && isHiddenExtension(line):
		if final {
			f.held[3] = ' '
			dst = append(dst, f.held...)
			f.held = f.held[:0]
		}
		return dst, false
	}

	if !f.filtering {
		return append(dst, line...), true
	}
	dst = append(dst, f.held...)
	f.held = f.held[:0]
	if final || cut || len(line) > maxReplyLine {
		// an over-long line is not held; the rest of its reply passes as is
		f.filtering = false
		return append(dst, line...), true
	}
	f.held = append(f.held, line...)
	return dst, true
}

// parseReplyLine reads the reply code and the separator after it: '-' on
// every line of a multi-line reply but the last, ' ' (or nothing) on the last.
func parseReplyLine(line []byte) (code [3]byte, sep byte, ok bool) {
	if len(line) < 4 {
		return code, 0, false
	}
	for i := range 3 {
		if line[i] < '0' || line[i] > '9' {
			return code, 0, false
		}
		code[i] = line[i]
	}
	switch line[3] {
	case '-', ' ':
		return code, line[3], true
	case '\r', '\n':
		return code, ' ', true
	}
	return code, 0, false
}

// isHiddenExtension reports whether a reply line (past its code and
// separator) names an extension in hiddenExtensions.
func isHiddenExtension(line []byte) bool {
	keyword := line[4:]
	if i := bytes.IndexAny(keyword, " \r\n"); i >= 0 {
		keyword = keyword[:i]
	}
	for _, ext := range hiddenExtensions {
		if bytes.EqualFold(keyword, ext) {
			return true
		}
	}
	return false
}
