package l4smtpsink

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/emersion/go-smtp"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

// testSink is a provisioned Handler serving a real loopback listener the way
// caddy-l4 does: one Handle call per accepted connection.
type testSink struct {
	h    *Handler
	dir  string
	addr string

	// handled gets the result of every Handle call once it has returned.
	handled chan error
}

// startSink provisions h (in a fresh temporary directory unless h.Directory
// is set) with a real Caddy context and serves it on 127.0.0.1.
func startSink(t *testing.T, h *Handler) *testSink {
	t.Helper()
	if h.Directory == "" {
		h.Directory = filepath.Join(t.TempDir(), "mail")
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testSink{
		h:       h,
		dir:     h.Directory,
		addr:    ln.Addr().String(),
		handled: make(chan error, 128),
	}
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				err := h.Handle(layer4.WrapConnection(conn, nil, zap.NewNop()), nil)
				_ = conn.Close() // as caddy-l4 does when the handler chain returns
				s.handled <- err
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-acceptDone
		if err := h.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	})
	return s
}

// waitHandled waits until n more Handle calls have returned, i.e. until the
// server side of n connections is completely done, and checks they returned
// no error.
func (s *testSink) waitHandled(t *testing.T, n int) {
	t.Helper()
	for range n {
		if err := <-s.handled; err != nil {
			t.Errorf("Handle returned %v", err)
		}
	}
}

// files lists the directory: the stored messages (*.eml, sorted) and
// anything else.
func (s *testSink) files(t *testing.T) (emls, others []string) {
	t.Helper()
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".eml") && e.Type().IsRegular() {
			emls = append(emls, e.Name())
		} else {
			others = append(others, e.Name())
		}
	}
	sort.Strings(emls)
	return emls, others
}

// contents returns the contents of the stored messages, sorted, and fails
// the test if anything other than .eml files is in the directory.
func (s *testSink) contents(t *testing.T) []string {
	t.Helper()
	emls, others := s.files(t)
	if len(others) != 0 {
		t.Errorf("directory holds files other than .eml: %q", others)
	}
	var out []string
	for _, name := range emls {
		b, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(b))
	}
	sort.Strings(out)
	return out
}

// expectEmpty fails the test if the directory holds any file at all.
func (s *testSink) expectEmpty(t *testing.T) {
	t.Helper()
	emls, others := s.files(t)
	if len(emls) != 0 || len(others) != 0 {
		t.Errorf("directory is not empty: messages %q, other files %q", emls, others)
	}
}

// dial connects a go-smtp client and says EHLO.
func (s *testSink) dial(t *testing.T) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(s.addr)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if err := c.Hello("client.test"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	return c
}

// sendOne sends one message in an open session (go-smtp client, DATA).
func sendOne(c *smtp.Client, from string, to []string, body []byte) error {
	if err := c.Mail(from, nil); err != nil {
		return fmt.Errorf("MAIL: %w", err)
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return fmt.Errorf("RCPT: %w", err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(body); err != nil {
		return fmt.Errorf("writing message: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("end of DATA: %w", err)
	}
	return nil
}

// rawClient speaks SMTP line by line, for what go-smtp's client cannot do
// (BDAT, reading the EHLO reply as is, hanging up in the middle).
type rawClient struct {
	t    *testing.T
	conn net.Conn
	text *textproto.Conn
}

// dialRaw connects and reads the greeting.
func (s *testSink) dialRaw(t *testing.T) (*rawClient, string) {
	t.Helper()
	conn, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	c := &rawClient{t: t, conn: conn, text: textproto.NewConn(conn)}
	t.Cleanup(func() { _ = conn.Close() })
	greeting := c.expect(220)
	return c, greeting
}

// send writes raw bytes.
func (c *rawClient) send(b []byte) {
	c.t.Helper()
	if _, err := c.text.W.Write(b); err != nil {
		c.t.Fatal(err)
	}
	if err := c.text.W.Flush(); err != nil {
		c.t.Fatal(err)
	}
}

// line writes one command line.
func (c *rawClient) line(format string, args ...any) {
	c.t.Helper()
	if err := c.text.PrintfLine(format, args...); err != nil {
		c.t.Fatal(err)
	}
}

// expect reads a reply and fails the test unless its code is code.
func (c *rawClient) expect(code int) string {
	c.t.Helper()
	got, msg, err := c.text.ReadResponse(code)
	if err != nil {
		c.t.Fatalf("want reply %d, got %d %q (%v)", code, got, msg, err)
	}
	return msg
}

// cmd sends a command line and expects a reply code.
func (c *rawClient) cmd(code int, format string, args ...any) string {
	c.t.Helper()
	c.line(format, args...)
	return c.expect(code)
}

// bigMessage returns a message of at least size bytes with CRLF line ends,
// 8-bit bytes (UTF-8 and every byte from 0x80 to 0xff) and lines that start
// with a dot or are a lone dot, which DATA has to stuff and unstuff.
func bigMessage(size int) []byte {
	var high []byte
	for b := 0x80; b <= 0xff; b++ {
		high = append(high, byte(b))
	}
	var buf bytes.Buffer
	buf.WriteString("From: Zoë <sender@example.test>\r\n" +
		"To: rcpt@example.test\r\n" +
		"Subject: caf\xc3\xa9 \xe2\x9c\x93\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: application/octet-stream\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n" +
		"\r\n")
	for i := 0; buf.Len() < size; i++ {
		switch i % 5 {
		case 0:
			buf.WriteString(".a line that starts with a dot\r\n")
		case 1:
			buf.WriteString(".\r\n")
		case 2:
			fmt.Fprintf(&buf, "%07d h\xc3\xa9llo w\xc3\xb6rld \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\t\r\n", i)
		default:
			fmt.Fprintf(&buf, "%07d ", i)
			buf.Write(high)
			buf.WriteString("\r\n")
		}
	}
	return buf.Bytes()
}
