package l4smtpsink

import (
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
// a goroutine of its own that can outlive the session.
type sinkConn struct {
	net.Conn // the *layer4.Connection, so that prefetched bytes are read first

	closeOnce sync.Once
	closeErr  error
	closed    chan struct{}

	mu       sync.Mutex
	isClosed bool
	storing  sync.WaitGroup // Data calls in progress

	readFailed atomic.Bool // a Read has returned an error (io.EOF included)
}

func newSinkConn(c net.Conn) *sinkConn {
	return &sinkConn{Conn: c, closed: make(chan struct{})}
}

// Read reads from the client and remembers when that fails.
func (c *sinkConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.readFailed.Store(true)
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
