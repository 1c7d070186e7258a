package l4smtpsink

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

var messageName = regexp.MustCompile(`^\d{8}T\d{6}\.\d{9}Z-[A-Z2-7]{26}\.eml$`)

func TestStoresMessageByteForByte(t *testing.T) {
	s := startSink(t, &Handler{})
	body := bigMessage(1 << 20)

	c := s.dial(t)
	defer c.Close()
	// SMTPUTF8 with a non-ASCII sender, 8BITMIME is added by the client.
	if err := c.Mail("zoë@example.test", &smtp.MailOptions{UTF8: true, Size: int64(len(body))}); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	if err := c.Rcpt("rcpt@example.test", nil); err != nil {
		t.Fatalf("RCPT: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	if _, err := w.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("end of DATA: %v", err)
	}

	// 250 means it is on disk already: look before the session ends.
	emls, others := s.files(t)
	if len(emls) != 1 || len(others) != 0 {
		t.Fatalf("after 250: messages %q, other files %q; want exactly one message", emls, others)
	}
	if !messageName.MatchString(emls[0]) {
		t.Errorf("file name %q does not look like <time>-<random>.eml", emls[0])
	}
	got, err := os.ReadFile(filepath.Join(s.dir, emls[0]))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, body) {
		i := 0
		for i < len(got) && i < len(body) && got[i] == body[i] {
			i++
		}
		t.Fatalf("stored %d bytes, sent %d; first difference at byte %d", len(got), len(body), i)
	}

	if err := c.Quit(); err != nil {
		t.Fatalf("QUIT: %v", err)
	}
	s.waitHandled(t, 1)
	if emls2, _ := s.files(t); !slices.Equal(emls, emls2) {
		t.Errorf("files changed after QUIT: %q, then %q", emls, emls2)
	}
}

func TestManyMessagesGetOneFileEach(t *testing.T) {
	s := startSink(t, &Handler{})
	var want []string
	body := func(session, msg int) []byte {
		b := fmt.Sprintf("Subject: session %d message %d\r\n\r\nhello %d/%d\r\n", session, msg, session, msg)
		return []byte(b)
	}

	// Several messages in one session, with RSET and NOOP between them.
	c := s.dial(t)
	for m := range 5 {
		b := body(0, m)
		if err := sendOne(c, "a@example.test", []string{"b@example.test", "c@example.test"}, b); err != nil {
			t.Fatalf("message %d: %v", m, err)
		}
		want = append(want, string(b))
		if err := c.Reset(); err != nil {
			t.Fatalf("RSET: %v", err)
		}
		if err := c.Noop(); err != nil {
			t.Fatalf("NOOP: %v", err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}

	// Concurrent sessions.
	const sessions, perSession = 8, 3
	var wg sync.WaitGroup
	for sess := 1; sess <= sessions; sess++ {
		for m := range perSession {
			want = append(want, string(body(sess, m)))
		}
		wg.Go(func() {
			c, err := smtp.Dial(s.addr)
			if err != nil {
				t.Errorf("session %d: %v", sess, err)
				return
			}
			defer c.Close()
			for m := range perSession {
				if err := sendOne(c, "a@example.test", []string{"b@example.test"}, body(sess, m)); err != nil {
					t.Errorf("session %d message %d: %v", sess, m, err)
					return
				}
			}
			if err := c.Quit(); err != nil {
				t.Errorf("session %d: QUIT: %v", sess, err)
			}
		})
	}
	wg.Wait()
	s.waitHandled(t, 1+sessions)

	emls, others := s.files(t)
	if len(others) != 0 {
		t.Errorf("leftover files: %q", others)
	}
	for _, name := range emls {
		if !messageName.MatchString(name) {
			t.Errorf("file name %q does not look like <time>-<random>.eml", name)
		}
	}
	got := s.contents(t)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("stored %d messages, sent %d; contents differ:\ngot  %q\nwant %q", len(got), len(want), got, want)
	}
}

func TestAuthPlainWithAnyCredentials(t *testing.T) {
	s := startSink(t, &Handler{})
	creds := [][2]string{{"alice", "secret"}, {"nobody@example.test", ""}, {"x", "\xc3\xa9 with spaces and ünïcode"}}
	for i, cred := range creds {
		c := s.dial(t)
		if !c.SupportsAuth("PLAIN") {
			t.Fatal("AUTH PLAIN is not advertised")
		}
		if err := c.Auth(sasl.NewPlainClient("", cred[0], cred[1])); err != nil {
			t.Fatalf("AUTH PLAIN %q: %v", cred[0], err)
		}
		if err := sendOne(c, "a@example.test", []string{"b@example.test"}, fmt.Appendf(nil, "Subject: %d\r\n\r\nauthenticated\r\n", i)); err != nil {
			t.Fatalf("after AUTH: %v", err)
		}
		if err := c.Quit(); err != nil {
			t.Fatal(err)
		}
	}
	s.waitHandled(t, len(creds))
	if got := s.contents(t); len(got) != len(creds) {
		t.Errorf("stored %d messages, want %d", len(got), len(creds))
	}

	// Other mechanisms are refused.
	c, _ := s.dialRaw(t)
	c.cmd(250, "EHLO client.test")
	c.cmd(504, "AUTH LOGIN")
	c.cmd(221, "QUIT")
	s.waitHandled(t, 1)
}

func TestEHLOAdvertisesExtensions(t *testing.T) {
	s := startSink(t, &Handler{Hostname: "sink.test", MaxMessageSize: 12345})
	c, greeting := s.dialRaw(t)
	if !strings.HasPrefix(greeting, "sink.test ") {
		t.Errorf("greeting %q does not start with the hostname", greeting)
	}
	reply := c.cmd(250, "EHLO client.test")
	lines := strings.Split(reply, "\n")
	if lines[0] != "Hello client.test" {
		t.Errorf("first EHLO line %q", lines[0])
	}
	for _, ext := range []string{"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "SIZE 12345", "AUTH PLAIN"} {
		if !slices.Contains(lines[1:], ext) {
			t.Errorf("EHLO reply lacks %q:\n%s", ext, reply)
		}
	}
	if slices.Contains(lines[1:], "STARTTLS") {
		t.Errorf("EHLO reply offers STARTTLS:\n%s", reply)
	}
	c.cmd(221, "QUIT")
	s.waitHandled(t, 1)
}

func TestDefaultsAdvertised(t *testing.T) {
	s := startSink(t, &Handler{})
	c := s.dial(t)
	defer c.Close()
	if size, ok := c.MaxMessageSize(); !ok || size != 52428800 {
		t.Errorf("SIZE = %d, %v; want 52428800", size, ok)
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}
	s.waitHandled(t, 1)
}

func TestBDATStoresConcatenatedChunks(t *testing.T) {
	s := startSink(t, &Handler{})
	// Binary chunks: things DATA would treat specially, split between chunks
	// in the middle of a CRLF.
	chunks := [][]byte{
		[]byte("Subject: chunked\r\n\r\nfirst chunk\r\n.\r\n.. not stuffed\r"),
		[]byte("\nbare\nLF, NUL \x00, \xff\xfe, and a lone CR \r here\r\n"),
		bytes.Repeat([]byte("0123456789abcdef"), 4096),
		[]byte("\r\nend\r\n"),
	}

	c, _ := s.dialRaw(t)
	c.cmd(250, "EHLO client.test")
	// Pipelined: the whole transaction in one write, then the replies.
	var req bytes.Buffer
	req.WriteString("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
	for i, chunk := range chunks {
		last := ""
		if i == len(chunks)-1 {
			last = " LAST"
		}
		fmt.Fprintf(&req, "BDAT %d%s\r\n", len(chunk), last)
		req.Write(chunk)
	}
	c.send(req.Bytes())
	c.expect(250) // MAIL
	c.expect(250) // RCPT
	for range chunks {
		c.expect(250)
	}

	// On disk before QUIT.
	want := bytes.Join(chunks, nil)
	if got := s.contents(t); len(got) != 1 || got[0] != string(want) {
		t.Fatalf("after BDAT LAST: stored %d messages; want exactly the %d bytes of the chunks", len(got), len(want))
	}

	// A second message in the same session, with an empty last chunk.
	c.cmd(250, "MAIL FROM:<a@example.test>")
	c.cmd(250, "RCPT TO:<b@example.test>")
	c.line("BDAT 6")
	c.send([]byte("second"))
	c.expect(250)
	c.cmd(250, "BDAT 0 LAST")
	c.cmd(221, "QUIT")
	s.waitHandled(t, 1)

	got := s.contents(t)
	wantAll := []string{string(want), "second"}
	slices.Sort(wantAll)
	if !slices.Equal(got, wantAll) {
		t.Errorf("stored %d messages, want 2 (the chunked one and \"second\")", len(got))
	}
}

func TestAbortedMessageLeavesNoFile(t *testing.T) {
	tests := []struct {
		name string
		run  func(t *testing.T, c *rawClient)
	}{{
		name: "disconnect in the middle of DATA",
		run: func(t *testing.T, c *rawClient) {
			c.cmd(354, "DATA")
			c.send([]byte("Subject: cut short\r\n\r\n"))
			c.send(bytes.Repeat([]byte("a line of the message\r\n"), 10000)) // and no end-of-data line
		},
	}, {
		name: "disconnect after a BDAT chunk",
		run: func(t *testing.T, c *rawClient) {
			c.line("BDAT 1000")
			c.send(bytes.Repeat([]byte("x"), 1000))
			c.expect(250)
		},
	}, {
		name: "disconnect in the middle of a BDAT LAST chunk",
		run: func(t *testing.T, c *rawClient) {
			c.line("BDAT 100000 LAST")
			c.send(bytes.Repeat([]byte("x"), 50000))
		},
	}, {
		name: "RSET after a BDAT chunk",
		run: func(t *testing.T, c *rawClient) {
			c.line("BDAT 10")
			c.send([]byte("0123456789"))
			c.expect(250)
			c.cmd(250, "RSET")
			c.cmd(221, "QUIT")
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startSink(t, &Handler{})
			c, _ := s.dialRaw(t)
			c.cmd(250, "EHLO client.test")
			c.cmd(250, "MAIL FROM:<a@example.test>")
			c.cmd(250, "RCPT TO:<b@example.test>")
			tt.run(t, c)
			_ = c.conn.Close()
			s.waitHandled(t, 1)
			s.expectEmpty(t)
		})
	}
}

func TestOversizeMessageGets552AndNoFile(t *testing.T) {
	const limit = 1024
	s := startSink(t, &Handler{MaxMessageSize: limit})
	small := []byte("Subject: small\r\n\r\nfits\r\n")

	c := s.dial(t)
	defer c.Close()
	if size, ok := c.MaxMessageSize(); !ok || size != limit {
		t.Errorf("SIZE = %d, %v; want %d", size, ok, limit)
	}

	// DATA over the limit.
	big := append([]byte("Subject: big\r\n\r\n"), bytes.Repeat([]byte("too large\r\n"), 400)...)
	err := sendOne(c, "a@example.test", []string{"b@example.test"}, big)
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code != 552 {
		t.Fatalf("over-size DATA: got %v, want a 552 reply", err)
	}
	s.expectEmpty(t)

	// MAIL FROM SIZE= over the limit.
	err = c.Mail("a@example.test", &smtp.MailOptions{Size: limit + 1})
	if !errors.As(err, &smtpErr) || smtpErr.Code != 552 {
		t.Fatalf("MAIL SIZE=%d: got %v, want a 552 reply", limit+1, err)
	}

	// The session goes on.
	if err := sendOne(c, "a@example.test", []string{"b@example.test"}, small); err != nil {
		t.Fatalf("small message after the 552: %v", err)
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}

	// BDAT over the limit, after a first chunk that fits.
	r, _ := s.dialRaw(t)
	r.cmd(250, "EHLO client.test")
	r.cmd(250, "MAIL FROM:<a@example.test>")
	r.cmd(250, "RCPT TO:<b@example.test>")
	r.line("BDAT 1000")
	r.send(bytes.Repeat([]byte("y"), 1000))
	r.expect(250)
	r.line("BDAT 1000 LAST")
	r.send(bytes.Repeat([]byte("z"), 1000))
	r.expect(552)
	r.cmd(221, "QUIT")

	s.waitHandled(t, 2)
	if got := s.contents(t); !slices.Equal(got, []string{string(small)}) {
		t.Errorf("stored %q, want only the small message", got)
	}
}

func TestTooManyRecipients(t *testing.T) {
	s := startSink(t, &Handler{})
	c, _ := s.dialRaw(t)
	c.cmd(250, "EHLO client.test")
	c.cmd(250, "MAIL FROM:<a@example.test>")
	for i := range maxRecipients {
		c.cmd(250, "RCPT TO:<r%d@example.test>", i)
	}
	c.cmd(452, "RCPT TO:<one-too-many@example.test>")
	c.cmd(221, "QUIT")
	s.waitHandled(t, 1)
}
