package l4smtpsink

import (
	"bufio"
	"bytes"
	"io"

	"github.com/emersion/go-smtp"
)

// The sink reads DATA content itself instead of with go-smtp's reader.
// go-smtp v0.25.1's reader (data.go, a copy of net/textproto's state machine
// that keeps CRLF) leaves its "saw CR" state on a second CR, so it misses the
// CRLF "." CRLF inside "\r\r\n.\r\n" and reads the commands after it as
// content, where RFC 5321 section 4.1.1.4, Postfix and the SMTP edge end the
// message. It also drops the CR of a line that starts with ".\r" not followed
// by LF. As go-smtp offers no way to plug in another reader, sinkConn hands
// go-smtp one command line per Read (so that nothing after a DATA line is in
// go-smtp's buffer when it answers 354), Session.Data reads the content
// from the connection through a dataReader, and go-smtp's own reader is then
// given a bare ".\r\n" to end on.

// endOfData is what go-smtp's DATA reader gets once the sink has read the
// message itself: an end-of-data line at the start of a line.
var endOfData = []byte(".\r\n")

// dataReader reads the content of a DATA command from the client: it ends at
// exactly CRLF "." CRLF (the DATA line's own CRLF counting for a message
// that is empty) and removes the leading dot of every line that has one
// (RFC 5321 section 4.5.2). A line is what ends in CRLF: a bare LF or a bare
// CR is content, never a line end, so a dot after one is neither stuffing
// nor an end. Every other byte is passed as is.
type dataReader struct {
	br *bufio.Reader

	// maxSize is the largest content accepted (0: no limit); one byte more is
	// ErrDataTooLarge.
	maxSize int64
	size    int64

	lineStart bool // the next byte starts a line
	cr        bool // the last byte passed was a CR
	err       error
}

func newDataReader(br *bufio.Reader, maxSize int64) *dataReader {
	return &dataReader{br: br, maxSize: maxSize, lineStart: true}
}

// Read implements io.Reader. It returns io.EOF after the end-of-data line,
// io.ErrUnexpectedEOF when the connection ends before it, and
// smtp.ErrDataTooLarge once the content exceeds maxSize.
func (r *dataReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.maxSize > 0 {
		// Room for one byte over the limit tells a message of exactly
		// maxSize from a larger one.
		if room := r.maxSize - r.size + 1; int64(len(p)) > room {
			p = p[:room]
		}
	}
	n, err := r.read(p)
	r.size += int64(n)
	if err == nil && r.maxSize > 0 && r.size > r.maxSize {
		err = smtp.ErrDataTooLarge
	}
	if err != nil {
		r.err = err
	}
	return n, err
}

func (r *dataReader) read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if n > 0 && r.br.Buffered() == 0 {
			// Hand over what is there rather than wait for the client.
			return n, nil
		}
		if r.lineStart {
			b, err := r.br.Peek(1)
			if err != nil {
				return n, unexpected(err)
			}
			if b[0] == '.' {
				b, err = r.br.Peek(len(endOfData))
				if bytes.Equal(b, endOfData) {
					_, _ = r.br.Discard(len(endOfData))
					return n, io.EOF
				}
				if len(b) < 2 {
					// Whether the dot ends the message depends on bytes
					// that never came.
					return n, unexpected(err)
				}
				// A stuffed dot, or a line that starts with one: either way the
				// first dot is not content. Peek may have failed for the third
				// byte; the next Peek reports it.
				_, _ = r.br.Discard(1)
			}
			r.lineStart = false
		}

		// Pass a run of bytes up to and including the next LF.
		if r.br.Buffered() == 0 {
			if _, err := r.br.Peek(1); err != nil {
				return n, unexpected(err)
			}
		}
		run, _ := r.br.Peek(min(r.br.Buffered(), len(p)-n))
		if i := bytes.IndexByte(run, '\n'); i >= 0 {
			run = run[:i+1]
			r.lineStart = i > 0 && run[i-1] == '\r' || i == 0 && r.cr
		}
		r.cr = run[len(run)-1] == '\r'
		n += copy(p[n:], run)
		_, _ = r.br.Discard(len(run))
	}
	return n, nil
}

// drain reads and drops the rest of the content, whatever its size, so that
// the commands after it are read as commands: go-smtp asks for that after
// Data returns, also when Data has stopped early (too large, a disk error).
// It returns nil once the end-of-data line is read.
func (r *dataReader) drain() error {
	if r.err == smtp.ErrDataTooLarge {
		r.err = nil
	}
	r.maxSize = 0
	_, err := io.Copy(io.Discard, r)
	return err
}

// unexpected turns the end of the connection inside a message into
// io.ErrUnexpectedEOF.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
