package l4smtp

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// The copy loop of the backend option. Most of a mail session's life is
// spent waiting: for the client to type, for the backend to accept a
// message. A copy buffer held across those waits is memory per session for
// nothing (io.Copy holds 32 KiB per direction), so each direction reads into
// a small buffer of its own, which holds any command line and most replies,
// and borrows a large pooled one only while data keeps coming: when a read
// fills the small buffer, the next reads go to a large one, which goes back
// to the pool as soon as a read does not fill it.

const (
	// smallBufSize holds a command line (512 octets, RFC 5321) or a
	// pipelined group of them, and a typical EHLO reply.
	smallBufSize = 1024
	// largeBufSize is the largest TLS record's content: a read from the
	// client never returns more.
	largeBufSize = 16 << 10
)

var largeBufs = sync.Pool{New: func() any { b := make([]byte, largeBufSize); return &b }}

// pump relays the session between the client (through c, which filters and
// watches it) and the backend, until both directions are done.
func pump(c *relayConn, up net.Conn) {
	clientDone := make(chan struct{})
	go func() {
		defer close(clientDone)
		_ = copySparing(up, c)
		if c.closed.Load() {
			// the edge ended the session (timeout, shutdown): nothing
			// the backend still sends can reach the client
			_ = up.Close()
			return
		}
		// the client has finished: the backend sees the end of the
		// stream, as it would without the edge, and says goodbye
		closeWrite(up)
	}()

	_ = copySparing(c, up)
	// the backend is done: the session is over
	_ = c.CloseWrite()
	// the client connection is closed now, so the client's direction ends
	// soon, unless it is stuck writing to a backend that no longer reads
	_ = up.SetWriteDeadline(time.Now())
	<-clientDone
}

// copySparing copies from src to dst until src ends; see above. It returns
// nil when src ended cleanly.
func copySparing(dst io.Writer, src io.Reader) error {
	small := make([]byte, smallBufSize)
	var large *[]byte
	defer func() {
		if large != nil {
			largeBufs.Put(large)
		}
	}()
	for {
		buf := small
		if large != nil {
			buf = *large
		}
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return nil
			}
			return rerr
		}
		switch {
		case n == len(buf) && large == nil:
			large = largeBufs.Get().(*[]byte)
		case n < len(buf) && large != nil:
			largeBufs.Put(large)
			large = nil
		}
	}
}

func closeWrite(conn net.Conn) {
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = conn.Close()
}
