package l4smtp

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

// BenchmarkReplyFilter runs a session's worth of backend replies (greeting,
// EHLO, MAIL, RCPT, DATA, end of data, QUIT) through the filter, as the relay
// does for every session.
func BenchmarkReplyFilter(b *testing.B) {
	session := []byte("220 backend.internal ESMTP Postfix\r\n" +
		"250-backend.internal\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n" +
		"250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n" +
		"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n" +
		"250 2.0.0 Ok: queued as 4ZxYz1abcd\r\n221 2.0.0 Bye\r\n")
	out := make([]byte, 0, len(session))
	b.ReportAllocs()
	b.SetBytes(int64(len(session)))
	for b.Loop() {
		f := replyFilter{swallowGreeting: true}
		out = f.process(out[:0], session)
	}
}

// BenchmarkCommandReader reads a pre-TLS dialogue's command lines.
func BenchmarkCommandReader(b *testing.B) {
	dialogue := []byte(strings.Repeat("EHLO client.example.com\r\nNOOP\r\n", 4) + "STARTTLS\r\n")
	b.ReportAllocs()
	b.SetBytes(int64(len(dialogue)))
	for b.Loop() {
		lr := newLineReader(bytes.NewReader(dialogue))
		for {
			if _, _, err := lr.readLine(); err != nil {
				break
			}
		}
	}
}

// BenchmarkTransactionTracker runs a session's client bytes after TLS
// (EHLO, a transaction with 64 KiB of message content, QUIT) and the
// backend's replies through the tracker, as the relay does for every
// session for the shutdown.
func BenchmarkTransactionTracker(b *testing.B) {
	content := bytes.Repeat([]byte("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.\r\n"), 1000)
	commands := []byte("EHLO client.example.com\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
	replies := [][3]byte{{'2', '5', '0'}, {'2', '5', '0'}, {'2', '5', '0'}, {'3', '5', '4'}}
	b.ReportAllocs()
	b.SetBytes(int64(len(commands) + len(content) + 3 + 6))
	out := make([]byte, 0, len(content))
	for b.Loop() {
		t := transactionTracker{normalize: true, requireAuth: true, authed: true, edge: &defaultEdgeAnswers}
		out, _ = t.client(out[:0], commands)
		for _, code := range replies {
			t.reply(code)
		}
		out, _ = t.client(out[:0], content)
		out, _ = t.client(out[:0], []byte(".\r\nQUIT\r\n"))
		t.reply([3]byte{'2', '5', '0'})
		t.reply([3]byte{'2', '2', '1'})
	}
}

// BenchmarkRelayTransaction sends one mail transaction per iteration (MAIL,
// RCPT and DATA pipelined, 4 KiB of content, the final dot) from a TLS
// client through the relay of the backend option to a backend on loopback,
// and waits for each reply: the per-message cost of the relay, allocations
// included (the TLS records' are part of it).
func BenchmarkRelayTransaction(b *testing.B) {
	via := viaBackend(b)
	h, _ := newTestHandler(b, via.configure)
	conn, r, done := serveRelay(b, h, via, false, func(be *backend) error {
		be.send("220 backend ESMTP\r\n")
		for {
			line, err := be.r.ReadSlice('\n')
			if err != nil {
				return nil
			}
			switch {
			case bytes.HasPrefix(line, []byte("DATA")):
				be.send("354 go ahead\r\n")
				for {
					line, err := be.r.ReadSlice('\n')
					if err != nil {
						return nil
					}
					if string(line) == ".\r\n" {
						break
					}
				}
				be.send("250 2.0.0 Ok: queued\r\n")
			case bytes.HasPrefix(line, []byte("QUIT")):
				be.send("221 2.0.0 Bye\r\n")
				be.finish()
				return nil
			default:
				be.send("250 2.1.0 Ok\r\n")
			}
		}
	})
	readReplies(b, r, 1)
	commands := []byte("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
	content := append(bytes.Repeat([]byte("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.\r\n"), 62), ".\r\n"...)
	b.ReportAllocs()
	b.SetBytes(int64(len(commands) + len(content)))
	for b.Loop() {
		conn.Write(commands)
		readReplies(b, r, 3)
		conn.Write(content)
		readReplies(b, r, 1)
	}
	b.StopTimer()
	io.WriteString(conn, "QUIT\r\n")
	readReplies(b, r, 1)
	<-done
}
