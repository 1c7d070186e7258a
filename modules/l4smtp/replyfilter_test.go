package l4smtp

import (
	"bytes"
	"strings"
	"testing"
)

var replyFilterTests = []struct {
	name    string
	swallow bool // the edge greeted the client already (STARTTLS mode)
	in      string
	want    string
}{
	{
		name:    "greeting swallowed, STARTTLS removed from the middle",
		swallow: true,
		in:      "220 backend ESMTP Postfix\r\n250-backend\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
		want:    "250-backend\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
	},
	{
		name:    "multi-line greeting swallowed",
		swallow: true,
		in:      "220-backend ESMTP\r\n220-more text\r\n220 end\r\n250 2.0.0 OK\r\n",
		want:    "250 2.0.0 OK\r\n",
	},
	{
		name:    "STARTTLS as the last line: the line before becomes the last",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n",
		want:    "250-backend\r\n250 SIZE 10240000\r\n",
	},
	{
		name:    "everything after the first line removed",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250-XFORWARD NAME ADDR PROTO HELO\r\n250 STARTTLS\r\n",
		want:    "250 backend\r\n",
	},
	{
		name:    "first extension removed, others kept in order",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 DSN\r\n",
		want:    "250-backend\r\n250-AUTH PLAIN LOGIN\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 DSN\r\n",
	},
	{
		name:    "keywords match case-insensitively",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-starttls\r\n250-XClient ADDR\r\n250 DSN\r\n",
		want:    "250-backend\r\n250 DSN\r\n",
	},
	{
		name:    "only whole keywords are removed",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-STARTTLSX\r\n250-XCLIENTS\r\n250 X-STARTTLS\r\n",
		want:    "250-backend\r\n250-STARTTLSX\r\n250-XCLIENTS\r\n250 X-STARTTLS\r\n",
	},
	{
		name:    "the first line names the server and is never removed",
		swallow: true,
		in:      "220 b\r\n250-STARTTLS\r\n250 DSN\r\n",
		want:    "250-STARTTLS\r\n250 DSN\r\n",
	},
	{
		name:    "single-line replies pass as they are",
		swallow: true,
		in:      "220 b\r\n250 STARTTLS\r\n250 2.1.0 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
		want:    "250 STARTTLS\r\n250 2.1.0 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
	},
	{
		name:    "multi-line replies other than 250 are not filtered",
		swallow: true,
		in:      "220 b\r\n214-STARTTLS\r\n214 XCLIENT\r\n",
		want:    "214-STARTTLS\r\n214 XCLIENT\r\n",
	},
	{
		name:    "refused greeting answers the EHLO, the backend's EHLO answer is dropped",
		swallow: true,
		in:      "554 5.7.1 go away\r\n503 5.5.1 Error: send HELO/EHLO first\r\n221 2.0.0 Bye\r\n",
		want:    "554 5.7.1 go away\r\n221 2.0.0 Bye\r\n",
	},
	{
		name:    "refused multi-line greeting, multi-line EHLO answer dropped",
		swallow: true,
		in:      "421-4.3.2 busy\r\n421 4.3.2 try later\r\n250-backend\r\n250 STARTTLS\r\n",
		want:    "421-4.3.2 busy\r\n421 4.3.2 try later\r\n",
	},
	{
		name: "implicit TLS: the greeting passes, the EHLO reply is filtered",
		in:   "220 backend ESMTP\r\n250-backend\r\n250 STARTTLS\r\n",
		want: "220 backend ESMTP\r\n250 backend\r\n",
	},
	{
		name: "implicit TLS: a refused greeting passes and nothing is dropped",
		in:   "554 no\r\n503 bad sequence\r\n",
		want: "554 no\r\n503 bad sequence\r\n",
	},
	{
		name:    "bare LF line ends",
		swallow: true,
		in:      "220 b\n250-backend\n250-PIPELINING\n250 STARTTLS\n",
		want:    "250-backend\n250 PIPELINING\n",
	},
	{
		name:    "final line with the code alone",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-STARTTLS\r\n250\r\n",
		want:    "250-backend\r\n250\r\n",
	},
	{
		name:    "malformed line ends a filtered reply",
		swallow: true,
		in:      "220 b\r\n250-backend\r\n250-PIPELINING\r\ngarbage\r\n250 OK\r\n",
		want:    "250-backend\r\n250-PIPELINING\r\ngarbage\r\n250 OK\r\n",
	},
	{
		name:    "8-bit and binary bytes pass untouched",
		swallow: true,
		in:      "220 b\r\n250 2.0.0 \xff\xfe\x00\x80 ok\r\n",
		want:    "250 2.0.0 \xff\xfe\x00\x80 ok\r\n",
	},
	{
		name:    "EHLO again later is filtered again",
		swallow: true,
		in:      "220 b\r\n250-a\r\n250 STARTTLS\r\n250 2.0.0 Ok\r\n250-a\r\n250-XFORWARD NAME\r\n250 DSN\r\n",
		want:    "250 a\r\n250 2.0.0 Ok\r\n250-a\r\n250 DSN\r\n",
	},
}

func TestReplyFilter(t *testing.T) {
	for _, tt := range replyFilterTests {
		t.Run(tt.name, func(t *testing.T) {
			if got := filterWhole(tt.swallow, tt.in); got != tt.want {
				t.Errorf("whole:\n got %q\nwant %q", got, tt.want)
			}
			for cut := 1; cut < len(tt.in); cut++ {
				if got := filterChunks(tt.swallow, tt.in, []int{cut}); got != tt.want {
					t.Fatalf("split at %d:\n got %q\nwant %q", cut, got, tt.want)
				}
			}
			every := make([]int, 0, len(tt.in))
			for i := 1; i < len(tt.in); i++ {
				every = append(every, i)
			}
			if got := filterChunks(tt.swallow, tt.in, every); got != tt.want {
				t.Errorf("byte by byte:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestReplyFilterState(t *testing.T) {
	var f replyFilter
	f.swallowGreeting = true
	out := f.process(nil, []byte("220-b\r\n220"))
	if len(out) != 0 || f.greetingDone() {
		t.Fatalf("half a greeting: out %q, greeted %v", out, f.greetingDone())
	}
	f.process(nil, []byte(" b\r\n"))
	if !f.greetingDone() {
		t.Fatal("greeting not done after its last line")
	}
	f.process(nil, []byte("250-x\r\n"))
	if !f.midReply() {
		t.Fatal("not mid-reply inside a multi-line reply")
	}
	f.process(nil, []byte("250 y\r\n221 2.0.0 Bye\r\n"))
	if f.midReply() || f.lastReply() != "221" {
		t.Fatalf("after 221: midReply %v, lastReply %q", f.midReply(), f.lastReply())
	}
}

// An over-long line passes as it arrives instead of being held without bound,
// and the rest of its reply is not filtered.
func TestReplyFilterLongLine(t *testing.T) {
	long := "250-" + strings.Repeat("x", 3*maxReplyLine) + "\r\n"
	in := "220 b\r\n250-backend\r\n" + long + "250 DSN\r\n"
	want := "250-backend\r\n" + long + "250 DSN\r\n"
	if got := filterChunks(true, in, []int{10, 30, 100, 9000, 20000}); got != want {
		t.Fatalf("got %d bytes, want %d", len(got), len(want))
	}
	var f replyFilter
	f.process(nil, []byte("220 b\r\n"+long[:len(long)-2]))
	if len(f.partial) > maxReplyLine || len(f.held) > maxReplyLine {
		t.Fatalf("held %d and %d bytes of a line without end", len(f.partial), len(f.held))
	}
}

// FuzzReplyFilter checks that the output never depends on how the backend's
// bytes are split, never grows, and never offers a hidden extension after the
// first line of a multi-line 250 reply.
func FuzzReplyFilter(f *testing.F) {
	for _, tt := range replyFilterTests {
		f.Add([]byte(tt.in), tt.swallow, uint16(7))
	}
	f.Fuzz(func(t *testing.T, in []byte, swallow bool, step uint16) {
		whole := filterWhole(swallow, string(in))
		var cuts []int
		for i, s := 0, int(step%97)+1; i+s < len(in); s = s*7%97 + 1 {
			i += s
			cuts = append(cuts, i)
		}
		if chunked := filterChunks(swallow, string(in), cuts); chunked != whole {
			t.Fatalf("output depends on the split:\nwhole   %q\nchunked %q", whole, chunked)
		}
		if len(whole) > len(in) {
			t.Fatalf("output longer than input: %d > %d", len(whole), len(in))
		}
		// in the output, walk the replies: past the first line of a
		// multi-line 250 reply no hidden extension may stand (the greeting
		// of implicit TLS is passed as it is, so it is not looked at)
		inReply, is250, first := false, false, !swallow
		for _, line := range strings.SplitAfter(whole, "\n") {
			if !strings.HasSuffix(line, "\n") || len(line) > maxReplyLine {
				break // an incomplete line, or past an over-long one
			}
			code, sep, ok := parseReplyLine([]byte(line))
			if inReply && is250 && ok && !first && isHiddenExtension([]byte(line)) {
				t.Fatalf("hidden extension offered: %q in %q", line, whole)
			}
			switch {
			case !ok || sep != '-':
				inReply, first = false, false
			case !inReply:
				inReply, is250 = true, string(code[:]) == "250"
			}
		}
	})
}

func filterWhole(swallow bool, in string) string {
	f := replyFilter{swallowGreeting: swallow}
	return string(f.process(nil, []byte(in)))
}

func filterChunks(swallow bool, in string, cuts []int) string {
	f := replyFilter{swallowGreeting: swallow}
	var out bytes.Buffer
	prev := 0
	for _, c := range append(cuts, len(in)) {
		out.Write(f.process(nil, []byte(in[prev:c])))
		prev = c
	}
	return out.String()
}
