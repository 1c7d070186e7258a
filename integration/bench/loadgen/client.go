package main

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// How a target starts TLS.
const (
	modeSTARTTLS = "starttls" // plaintext greeting and EHLO, STARTTLS, handshake, EHLO again
	modeImplicit = "implicit" // handshake first, then the greeting inside TLS
	modePlain    = "plain"    // no TLS at all: the backend alone
)

// target is what every mode talks to.
type target struct {
	addr    string
	mode    string
	tls     *tls.Config // nil in plain mode
	ehlo    string      // the name in our EHLO
	from    string
	to      string
	timeout time.Duration // for a whole session (run, bulk) or for opening one (hold)
}

// session is one open SMTP session, past the post-TLS EHLO.
type session struct {
	conn net.Conn
	r    *bufio.Reader
	w    *bufio.Writer
	tls  *tls.ConnectionState // nil in plain mode
}

// phaseError says at which step of the dialogue a session failed.
type phaseError struct {
	phase string
	err   error
}

func (e *phaseError) Error() string { return e.phase + ": " + e.err.Error() }
func (e *phaseError) Unwrap() error { return e.err }

// replyError is a reply with another code than the one we wanted.
type replyError struct {
	code int
	text string
}

func (e *replyError) Error() string { return "unexpected reply: " + e.text }

// open connects, starts TLS as the target says, and sends EHLO after it. The
// whole opening must finish within t.timeout; the deadline stays set on the
// connection (the caller moves or clears it).
func (t *target) open() (*session, error) {
	deadline := time.Now().Add(t.timeout)
	d := net.Dialer{Deadline: deadline} // Go sets TCP_NODELAY on TCP connections by default
	conn, err := d.Dial("tcp", t.addr)
	if err != nil {
		return nil, &phaseError{"connect", err}
	}
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return nil, &phaseError{"connect", err}
	}
	s := &session{conn: conn}
	s.r, s.w = newBuffers(conn)
	if err := t.dialogue(s); err != nil {
		s.conn.Close()
		return nil, err
	}
	return s, nil
}

// newBuffers returns the reader and writer of a session; their buffers stay
// for the TLS connection over conn.
func newBuffers(conn net.Conn) (*bufio.Reader, *bufio.Writer) {
	return bufio.NewReaderSize(conn, 4096), bufio.NewWriterSize(conn, 4096)
}

func (t *target) dialogue(s *session) error {
	if t.mode == modeImplicit {
		if err := s.handshake(t.tls); err != nil {
			return err
		}
	}
	if err := s.reply("greeting", 220); err != nil {
		return err
	}
	if t.mode == modeSTARTTLS {
		if err := s.cmd("ehlo", "EHLO "+t.ehlo, 250); err != nil {
			return err
		}
		if err := s.cmd("starttls", "STARTTLS", 220); err != nil {
			return err
		}
		if s.r.Buffered() > 0 {
			return &phaseError{"starttls", errors.New("server sent bytes after its 220 to STARTTLS")}
		}
		if err := s.handshake(t.tls); err != nil {
			return err
		}
	}
	return s.cmd("ehlo", "EHLO "+t.ehlo, 250)
}

// handshake puts TLS on the connection, with new buffers over it.
func (s *session) handshake(cfg *tls.Config) error {
	tc := tls.Client(s.conn, cfg)
	if err := tc.Handshake(); err != nil {
		return &phaseError{"tls", err}
	}
	state := tc.ConnectionState()
	s.conn, s.tls = tc, &state
	s.r.Reset(tc)
	s.w.Reset(tc)
	return nil
}

// cmd sends one command line and reads the reply, which must have the code
// want (or, for want < 10, any code of that class: 2 for 2xx).
func (s *session) cmd(phase, line string, want int) error {
	s.w.WriteString(line)
	s.w.WriteString("\r\n")
	if err := s.w.Flush(); err != nil {
		return &phaseError{phase, err}
	}
	return s.reply(phase, want)
}

// reply reads a reply, multi-line or not, and checks its code.
func (s *session) reply(phase string, want int) error {
	for {
		line, err := s.r.ReadSlice('\n')
		if err != nil {
			if errors.Is(err, bufio.ErrBufferFull) {
				err = errors.New("reply line too long")
			}
			return &phaseError{phase, err}
		}
		if len(line) < 5 || (line[3] != ' ' && line[3] != '-') {
			return &phaseError{phase, fmt.Errorf("malformed reply %q", line)}
		}
		if line[3] == '-' {
			continue
		}
		code, err := strconv.Atoi(string(line[:3]))
		if err != nil {
			return &phaseError{phase, fmt.Errorf("malformed reply %q", line)}
		}
		if code != want && !(want < 10 && code/100 == want) {
			return &phaseError{phase, &replyError{code, strings.TrimRight(string(line), "\r\n")}}
		}
		return nil
	}
}

// send runs one mail transaction with body (which must not end with the
// terminating dot; see makeBody).
func (s *session) send(t *target, body []byte) error {
	if err := s.cmd("mail", "MAIL FROM:<"+t.from+">", 250); err != nil {
		return err
	}
	if err := s.cmd("rcpt", "RCPT TO:<"+t.to+">", 250); err != nil {
		return err
	}
	return s.data(body)
}

func (s *session) data(body []byte) error {
	if err := s.cmd("data", "DATA", 354); err != nil {
		return err
	}
	s.w.Write(body)
	s.w.WriteString(".\r\n")
	if err := s.w.Flush(); err != nil {
		return &phaseError{"data", err}
	}
	return s.reply("dot", 250)
}

// quit ends the session politely and closes the connection.
func (s *session) quit() error {
	err := s.cmd("quit", "QUIT", 221)
	if cerr := s.conn.Close(); err == nil && cerr != nil {
		err = &phaseError{"quit", cerr}
	}
	return err
}

// makeBody returns a message of size bytes (never less than its headers)
// with lines of at most 78 octets, each ending in CRLF, none starting with a
// dot.
func makeBody(size int) []byte {
	const header = "From: <bench@client.test>\r\nTo: <sink@mail.test>\r\nSubject: bench\r\n\r\n"
	const line = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
	b := make([]byte, 0, max(size, len(header)))
	b = append(b, header...)
	for rest := size - len(b); rest >= 3; rest = size - len(b) {
		n := min(len(line), rest)
		if left := rest - n; left > 0 && left < 3 {
			n -= 3 - left // leave room for a last line of at least "x\r\n"
		}
		b = append(b, line[len(line)-n:]...)
	}
	return b
}

// errorKind names an error for counting: the phase and what happened, like
// "tls: timeout", "rcpt: reply 451", "connect: refused".
func errorKind(err error) string {
	phase := "session"
	var pe *phaseError
	if errors.As(err, &pe) {
		phase = pe.phase
	}
	var re *replyError
	var ne net.Error
	var alert tls.AlertError
	var what string
	switch {
	case errors.As(err, &re):
		what = "reply " + strconv.Itoa(re.code)
	case errors.As(err, &ne) && ne.Timeout():
		what = "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		what = "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		what = "reset"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		what = "no local port"
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		what = "too many open files"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		what = "closed by server"
	case errors.As(err, &alert):
		what = "alert " + alert.Error()
	default:
		var ce *tls.CertificateVerificationError
		if errors.As(err, &ce) {
			what = "certificate"
		} else {
			what = "other"
		}
	}
	return phase + ": " + what
}
