package l4smtpsink

import (
	"bufio"
	"bytes"
	"net"
	"sync"
	"sync/atomic"
)

// go-smtp v0.25.1 has no exported way to serve a single net.Conn: only
// Server.Serve(net.Listener) runs a session (handleConn is unexported). So
// each handler runs one Server on a connListener, Handle pushes the client
// connection into it, and a sinkConn tells Handle when go-smtp is done.

// connListener is an in-memory net.Listener whose Accept returns the
// connections that Handle pushes in.
type connListener struct {
	conns     chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newConnListener() *connListener {
	return &connListener{
		conns: make(chan net.Conn),
		done:  make(chan struct{}),
	}
}

// push hands c to Accept. It reports false, without handing it over, when
// the listener is closed.
func (l *connListener) push(c net.Conn) bool {
	select {
	case <-l.done:
		return false
	default:
	}
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

// Accept waits for a connection from push.
func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close makes Accept and push fail from now on. It may be called many times.
func (l *connListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

// Addr returns a placeholder address: the listener has no socket.
func (l *connListener) Addr() net.Addr { return listenerAddr{} }

type listenerAddr struct{}

func (listenerAddr) Network() string { return "smtp_sink" }
func (listenerAddr) String() string  { return "smtp_sink" }

// sinkConn is the client connection as go-smtp sees it. Its Close (which
// go-smtp calls when the session ends) closes the connection and tells wait;
// it also counts the messages being stored, which with BDAT go-smtp stores in
// a goroutine of its own that can outlive the session. It reads the content
// of DATA itself (see data.go).
type sinkConn struct {
	net.Conn // the *layer4.Connection, so that prefetched bytes are read first

	// br buffers the client's bytes; go-smtp gets them a command line at a
	// time, the DATA content is read from it by data.
	br      *bufio.Reader
	maxSize int64

	// data is the content reader of the DATA command that go-smtp has just
	// answered with 354, until go-smtp has read its end-of-data line. Session.Data
	// reads it from another goroutine with BDAT (and then finds it nil).
	data atomic.Pointer[dataReader]
	eod  []byte // what is left to give go-smtp of endOfData

	closeOnce sync.Once
	closeErr  error
	closed    chan struct{}

	mu       sync.Mutex
	isClosed bool
	storing  sync.WaitGroup // Data calls in progress

	readFailed atomic.Bool // a Read has returned an error (io.EOF included)
}

// newSinkConn wraps the client connection c of a server whose messages may
// have maxSize bytes at most.
func newSinkConn(c net.Conn, maxSize int64) *sinkConn {
	sc := &sinkConn{Conn: c, maxSize: maxSize, closed: make(chan struct{})}
	sc.br = bufio.NewReader(failureRecorder{sc})
	return sc
}

// Read gives go-smtp the client's bytes up to the end of the next command
// line at most, so that go-smtp never buffers bytes past a DATA line. After a
// 354 it first waits for the content to be read to its end (by Session.Data
// or here), then gives go-smtp an end-of-data line of its own.
func (c *sinkConn) Read(p []byte) (int, error) {
	if dr := c.data.Load(); dr != nil {
		err := dr.drain()
		c.data.Store(nil)
		if err != nil {
			return 0, err
		}
		c.eod = endOfData
	}
	if len(c.eod) > 0 {
		n := copy(p, c.eod)
		c.eod = c.eod[n:]
		return n, nil
	}

	if c.br.Buffered() == 0 {
		if _, err := c.br.Peek(1); err != nil {
			return 0, err
		}
	}
	line, _ := c.br.Peek(min(c.br.Buffered(), len(p)))
	if i := bytes.IndexByte(line, '\n'); i >= 0 {
		line = line[:i+1]
	}
	n := copy(p, line)
	_, _ = c.br.Discard(n)
	return n, nil
}

// Write passes go-smtp's replies to the client; a 354 (only DATA gets one)
// means the content follows.
func (c *sinkConn) Write(p []byte) (int, error) {
	if bytes.HasPrefix(p, []byte("354")) {
		c.data.Store(newDataReader(c.br, c.maxSize))
	}
	return c.Conn.Write(p)
}

// dataContent returns the reader of the DATA content that go-smtp is about
// to pass to Session.Data, or nil when go-smtp passes a BDAT message.
func (c *sinkConn) dataContent() *dataReader {
	return c.data.Load()
}

// failureRecorder reads from the client and remembers when that fails.
type failureRecorder struct {
	c *sinkConn
}

func (f failureRecorder) Read(p []byte) (int, error) {
	n, err := f.c.Conn.Read(p)
	if err != nil {
		f.c.readFailed.Store(true)
	}
	return n, err
}

// Close closes the connection and ends the session; go-smtp calls it once
// or more when it is done with the connection.
func (c *sinkConn) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.isClosed = true
		c.mu.Unlock()
		c.closeErr = c.Conn.Close()
		close(c.closed)
	})
	return c.closeErr
}

// abort closes the socket under go-smtp, which then ends the session and
// calls Close.
func (c *sinkConn) abort() {
	_ = c.Conn.Close()
}

// beginData registers a message being stored. It reports false when the
// session is already closed; then the message must not be stored.
func (c *sinkConn) beginData() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isClosed {
		return false
	}
	c.storing.Add(1)
	return true
}

// endData unregisters a message registered by beginData.
func (c *sinkConn) endData() {
	c.storing.Done()
}

// wait returns when go-smtp has closed the connection and every message of
// the session is stored or discarded.
func (c *sinkConn) wait() {
	<-c.closed
	// No beginData can succeed any more, so no Add races with this Wait.
	c.storing.Wait()
}
