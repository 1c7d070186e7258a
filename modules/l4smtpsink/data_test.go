package l4smtpsink

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/emersion/go-smtp"
)

// dataCases are DATA contents as sent (up to and including the end-of-data
// line) and the message each must store.
var dataCases = []struct {
	name string
	sent string
	want string
}{
	// Issue 13: go-smtp's reader reads past this end; Postfix and RFC 5321
	// end here.
	{"CR before CRLF.CRLF", "Subject: a\r\n\r\nz\r\r\n.\r\n", "Subject: a\r\n\r\nz\r\r\n"},
	{"CRs before CRLF.CRLF", "z\r\r\r\r\n.\r\n", "z\r\r\r\r\n"},
	{"empty message", ".\r\n", ""},
	{"only an empty line", "\r\n.\r\n", "\r\n"},
	{"stuffed dots", "..\r\n..x\r\n...\r\n.\r\n", ".\r\n.x\r\n..\r\n"},
	{"dot-CR-CR-LF is not an end", "a\r\n.\r\r\nb\r\n.\r\n", "a\r\n\r\r\nb\r\n"},
	{"dot-CR without LF keeps its CR", "a\r\n.\rb\r\n.\r\n", "a\r\n\rb\r\n"},
	{"bare LF, dot, bare LF is content", "a\n.\nb\r\n.\r\n", "a\n.\nb\r\n"},
	{"bare LF, dot, CRLF is content", "a\n.\r\nb\r\n.\r\n", "a\n.\r\nb\r\n"},
	{"CRLF, dot, bare LF is a stuffed line", "a\r\n.\nb\r\n.\r\n", "a\r\n\nb\r\n"},
	{"bare CR, dot, bare CR is content", "a\r.\rb\r\n.\r\n", "a\r.\rb\r\n"},
	{"NUL before the dot is content", "a\r\n\x00.\r\nb\r\n.\r\n", "a\r\n\x00.\r\nb\r\n"},
	{"NUL after the dot", "a\r\n.\x00\r\nb\r\n.\r\n", "a\r\n\x00\r\nb\r\n"},
	{"every byte", "\x00\x01\x7f\x80\xfe\xff\r\n.\r\n", "\x00\x01\x7f\x80\xfe\xff\r\n"},
}

// TestDataEndsAtCRLFDotCRLF sends each case through a session, with the next
// command in the same write: the message must end exactly at CRLF "." CRLF,
// be stored as the case says, and the command after it must be a command.
func TestDataEndsAtCRLFDotCRLF(t *testing.T) {
	for _, tt := range dataCases {
		t.Run(tt.name, func(t *testing.T) {
			s := startSink(t, &Handler{})
			c, _ := s.dialRaw(t)
			// A bound for a sink that misses the end and waits for more; no
			// case needs more than a few round trips.
			if err := c.conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
				t.Fatal(err)
			}
			c.cmd(250, "EHLO client.test")
			c.cmd(250, "MAIL FROM:<a@example.test>")
			c.cmd(250, "RCPT TO:<b@example.test>")
			c.cmd(354, "DATA")
			c.send([]byte(tt.sent + "MAIL FROM:<next@example.test>\r\n"))
			c.expect(250) // the message
			c.expect(250) // MAIL
			c.cmd(221, "QUIT")
			s.waitHandled(t, 1)
			if got := s.contents(t); !slices.Equal(got, []string{tt.want}) {
				t.Errorf("stored %q, want %q", got, tt.want)
			}
		})
	}
}

// TestDataReader reads each case however the client's bytes are cut.
func TestDataReader(t *testing.T) {
	const after = "QUIT\r\n"
	cuts := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"halves":   iotest.HalfReader,
	}
	for _, tt := range dataCases {
		for cut, wrap := range cuts {
			br := bufio.NewReader(wrap(strings.NewReader(tt.sent + after)))
			got, err := io.ReadAll(newDataReader(br, 0))
			if err != nil || string(got) != tt.want {
				t.Errorf("%s, %s: read %q, %v; want %q", tt.name, cut, got, err, tt.want)
			}
			if rest, _ := io.ReadAll(br); string(rest) != after {
				t.Errorf("%s, %s: left %q after the message, want %q", tt.name, cut, rest, after)
			}
		}
	}
}

func TestDataReaderCutShort(t *testing.T) {
	for _, sent := range []string{"", "a", "a\r\n", "a\r\n.", "a\r\n.\r", "a\r\n.\r\r\n", "a\r\n..\r\n"} {
		_, err := io.ReadAll(newDataReader(bufio.NewReader(strings.NewReader(sent)), 0))
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%q: got %v, want io.ErrUnexpectedEOF", sent, err)
		}
	}
}

func TestDataReaderSizeLimit(t *testing.T) {
	const limit = 10
	exact := strings.Repeat("x", limit-2) + "\r\n"
	got, err := io.ReadAll(newDataReader(bufio.NewReader(strings.NewReader(exact+".\r\n")), limit))
	if err != nil || string(got) != exact {
		t.Errorf("exactly %d bytes: read %q, %v; want them all", limit, got, err)
	}

	over := "x" + exact
	br := bufio.NewReader(strings.NewReader(over + ".\r\nQUIT\r\n"))
	dr := newDataReader(br, limit)
	if _, err := io.ReadAll(dr); err != smtp.ErrDataTooLarge {
		t.Errorf("%d bytes: got %v, want ErrDataTooLarge", limit+1, err)
	}
	if err := dr.drain(); err != nil {
		t.Errorf("drain: %v", err)
	}
	if rest, _ := io.ReadAll(br); !bytes.Equal(rest, []byte("QUIT\r\n")) {
		t.Errorf("left %q after draining, want the next command", rest)
	}
}
