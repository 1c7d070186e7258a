// Command ceiling is the benchmark's ceiling: a minimal SMTP server that
// terminates TLS itself (implicit TLS on one address, the STARTTLS dialogue on
// another) and answers SMTP with no backend hop, throwing the messages away.
// No proxy in front of a backend can beat it on the same machine, so the
// benchmark reports how close each peer comes to it.
//
//	ceiling -cert cert.pem -key key.pem -implicit 127.0.0.1:4650 -starttls 127.0.0.1:5870
//
// It answers EHLO, HELO, STARTTLS (RFC 3207: no arguments, no second
// STARTTLS, nothing the client sent before the handshake is kept, the session
// starts afresh after it), MAIL, RCPT, DATA, RSET, NOOP and QUIT; on the
// STARTTLS address mail commands before TLS get 530. It offers TLS 1.2 and
// 1.3 with Go's defaults (session tickets on), like Caddy.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	implicit := flag.String("implicit", "", "address for implicit TLS (port 465 style)")
	starttls := flag.String("starttls", "", "address for the STARTTLS dialogue (port 587 style)")
	certFile := flag.String("cert", "", "PEM certificate chain")
	keyFile := flag.String("key", "", "PEM private key")
	hostname := flag.String("hostname", "mail.test", "name in the greeting and EHLO reply")
	timeout := flag.Duration("timeout", 5*time.Minute, "time limit for each read and the TLS handshake")
	flag.Parse()
	if *implicit == "" && *starttls == "" {
		log.Fatal("ceiling: give -implicit, -starttls or both")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatalf("ceiling: %v", err)
	}
	s := &server{
		tls:      &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		hostname: *hostname,
		timeout:  *timeout,
	}
	errs := make(chan error)
	for _, l := range []struct {
		addr     string
		implicit bool
	}{{*implicit, true}, {*starttls, false}} {
		if l.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			log.Fatalf("ceiling: %v", err)
		}
		go func() { errs <- s.serve(ln, l.implicit) }()
	}
	fmt.Fprintln(os.Stderr, "ceiling: listening")
	log.Fatalf("ceiling: %v", <-errs)
}

type server struct {
	tls      *tls.Config
	hostname string
	timeout  time.Duration
}

func (s *server) serve(ln net.Listener, implicit bool) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// out of file descriptors and the like: wait and go on
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go s.handle(c, implicit)
	}
}

// session is the state of one connection.
type session struct {
	raw    net.Conn // the TCP connection
	conn   net.Conn // raw, or TLS over it
	r      *bufio.Reader
	w      *bufio.Writer
	secure bool
	mail   bool // MAIL accepted in this transaction
	rcpts  int
}

func (s *server) handle(c net.Conn, implicit bool) {
	defer c.Close()
	ss := &session{raw: c, conn: c, r: bufio.NewReader(c), w: bufio.NewWriter(c)}
	if implicit && !s.startTLS(ss) {
		return
	}
	ss.w.WriteString("220 " + s.hostname + " ESMTP ceiling\r\n")
	for {
		if ss.r.Buffered() == 0 {
			// reply to a pipelined group at once, and before waiting
			if ss.w.Flush() != nil {
				return
			}
		}
		ss.conn.SetReadDeadline(time.Now().Add(s.timeout))
		line, err := ss.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			if !discardLine(ss.r) {
				return
			}
			ss.w.WriteString("500 5.5.2 Line too long\r\n")
			continue
		}
		if err != nil {
			return
		}
		verb, arg, _ := strings.Cut(strings.TrimRight(string(line), "\r\n"), " ")
		if !s.command(ss, strings.ToUpper(verb), arg, implicit) {
			ss.w.Flush()
			return
		}
	}
}

// command answers one command; false ends the session.
func (s *server) command(ss *session, verb, arg string, implicit bool) bool {
	w := ss.w
	switch verb {
	case "EHLO":
		ss.mail, ss.rcpts = false, 0
		w.WriteString("250-" + s.hostname + "\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n")
		if !ss.secure {
			w.WriteString("250-STARTTLS\r\n")
		}
		w.WriteString("250 ENHANCEDSTATUSCODES\r\n")
	case "HELO":
		ss.mail, ss.rcpts = false, 0
		w.WriteString("250 " + s.hostname + "\r\n")
	case "STARTTLS":
		switch {
		case ss.secure:
			w.WriteString("503 5.5.1 TLS already active\r\n")
		case arg != "":
			w.WriteString("501 5.5.4 Syntax: STARTTLS\r\n")
		default:
			w.WriteString("220 2.0.0 Ready to start TLS\r\n")
			if w.Flush() != nil || ss.r.Buffered() > 0 {
				return false // pipelined plaintext after STARTTLS: never carry it into TLS
			}
			if !s.startTLS(ss) {
				return false
			}
			ss.mail, ss.rcpts = false, 0
		}
	case "MAIL", "RCPT", "DATA":
		switch {
		case !ss.secure:
			w.WriteString("530 5.7.0 Must issue a STARTTLS command first\r\n")
		case verb == "MAIL" && ss.mail:
			w.WriteString("503 5.5.1 Nested MAIL command\r\n")
		case verb == "MAIL":
			ss.mail = true
			w.WriteString("250 2.1.0 Ok\r\n")
		case verb == "RCPT" && !ss.mail:
			w.WriteString("503 5.5.1 Need MAIL command\r\n")
		case verb == "RCPT":
			ss.rcpts++
			w.WriteString("250 2.1.5 Ok\r\n")
		case ss.rcpts == 0:
			w.WriteString("503 5.5.1 Need RCPT command\r\n")
		default:
			w.WriteString("354 End data with <CR><LF>.<CR><LF>\r\n")
			if w.Flush() != nil || !s.discardData(ss) {
				return false
			}
			ss.mail, ss.rcpts = false, 0
			w.WriteString("250 2.0.0 Ok: discarded\r\n")
		}
	case "RSET":
		ss.mail, ss.rcpts = false, 0
		w.WriteString("250 2.0.0 Ok\r\n")
	case "NOOP":
		w.WriteString("250 2.0.0 Ok\r\n")
	case "QUIT":
		w.WriteString("221 2.0.0 Bye\r\n")
		return false
	default:
		w.WriteString("502 5.5.2 Command not recognized\r\n")
	}
	return true
}

// startTLS runs the server handshake on the raw connection and puts fresh
// buffers over the TLS connection.
func (s *server) startTLS(ss *session) bool {
	tc := tls.Server(ss.raw, s.tls)
	tc.SetDeadline(time.Now().Add(s.timeout))
	if tc.Handshake() != nil {
		return false
	}
	tc.SetDeadline(time.Time{})
	ss.conn, ss.secure = tc, true
	ss.r.Reset(tc)
	ss.w.Reset(tc)
	return true
}

// discardData reads a message up to and including the line with the single
// dot, within twice the timeout (RFC 5321 allows 10 minutes after the dot).
func (s *server) discardData(ss *session) bool {
	ss.conn.SetReadDeadline(time.Now().Add(2 * s.timeout))
	atLineStart := true
	for {
		line, err := ss.r.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			atLineStart = false
			continue
		case err != nil:
			return false
		}
		if atLineStart && (bytes.Equal(line, []byte(".\r\n")) || bytes.Equal(line, []byte(".\n"))) {
			return true
		}
		atLineStart = true
	}
}

// discardLine reads the rest of an over-long line.
func discardLine(r *bufio.Reader) bool {
	for {
		_, err := r.ReadSlice('\n')
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err == nil
		}
	}
}
