package l4smtp

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/pires/go-proxyproto"
	"go.uber.org/zap/zapcore"
)

// refusedAddr is a loopback address where nothing listens.
func refusedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// The PROXY header carries the client's address, then the session follows.
func TestBackendProxyProtocol(t *testing.T) {
	for _, version := range []string{"v1", "v2"} {
		t.Run(version, func(t *testing.T) {
			via := viaBackend(t)
			h, _ := newTestHandler(t, func(h *Handler) {
				via.configure(h)
				h.ProxyProtocol = version
			})
			headers := make(chan *proxyproto.Header, 1)
			conn, r, done := serveRelay(t, h, via, false, func(b *backend) error {
				header, err := proxyproto.Read(b.r)
				if err != nil {
					t.Errorf("reading the PROXY header: %v", err)
				}
				headers <- header
				b.send("220 backend ESMTP\r\n")
				b.expect("QUIT")
				b.send("221 2.0.0 Bye\r\n")
				b.finish()
				return nil
			})
			header := <-headers
			if header == nil || header.Version != map[string]byte{"v1": 1, "v2": 2}[version] ||
				header.SourceAddr.String() != conn.LocalAddr().String() ||
				header.DestinationAddr.String() != conn.RemoteAddr().String() {
				t.Errorf("header %+v, want %s from %s to %s", header, version, conn.LocalAddr(), conn.RemoteAddr())
			}
			if got := readReplies(t, r, 1)[0]; got != "220 backend ESMTP" {
				t.Fatalf("greeting %q", got)
			}
			io.WriteString(conn, "QUIT\r\n")
			readReplies(t, r, 1)
			<-done
		})
	}
}

// A message far larger than the copy buffers arrives whole, in order.
func TestBackendLargeMessage(t *testing.T) {
	via := viaBackend(t)
	h, _ := newTestHandler(t, via.configure)
	var body strings.Builder
	for i := 0; body.Len() < 3<<20; i++ {
		fmt.Fprintf(&body, "line %d of a large message, with some text to make it long enough\r\n", i)
	}
	received := make(chan string, 1)
	conn, r, done := serveRelay(t, h, via, false, func(b *backend) error {
		b.send("220 backend ESMTP\r\n")
		b.expect("DATA")
		b.send("354 go ahead\r\n")
		var got strings.Builder
		for {
			line, err := b.r.ReadString('\n')
			if err != nil || line == ".\r\n" {
				break
			}
			got.WriteString(line)
		}
		received <- got.String()
		b.send("250 2.0.0 Ok\r\n")
		b.finish()
		return nil
	})
	readReplies(t, r, 1)
	io.WriteString(conn, "DATA\r\n")
	readReplies(t, r, 1)
	go func() {
		w := bufio.NewWriterSize(conn, 5000) // records of odd sizes
		io.WriteString(w, body.String())
		io.WriteString(w, ".\r\n")
		w.Flush()
	}()
	if got := <-received; got != body.String() {
		t.Errorf("the backend got %d bytes, want the %d sent", len(got), body.Len())
	}
	if got := readReplies(t, r, 1)[0]; got != "250 2.0.0 Ok" {
		t.Errorf("got %q", got)
	}
	<-done
}

// chunkSource returns its chunks one per Read, each cut to the buffer it is
// given, and records the size of every buffer.
type chunkSource struct {
	chunks  []int
	offered []int
}

func (s *chunkSource) Read(p []byte) (int, error) {
	if len(s.chunks) == 0 {
		return 0, io.EOF
	}
	s.offered = append(s.offered, len(p))
	n := min(s.chunks[0], len(p))
	if s.chunks[0] -= n; s.chunks[0] == 0 {
		s.chunks = s.chunks[1:]
	}
	for i := range p[:n] {
		p[i] = 'x'
	}
	return n, nil
}

// A read that may wait (the one after a read that did not fill its
// buffer) is given the small buffer, so that an idle session holds no
// large one; while data keeps coming, reads get the large one.
func TestCopySparingBuffers(t *testing.T) {
	src := &chunkSource{chunks: []int{100, 5000, 40000, 10, smallBufSize}}
	var dst strings.Builder
	if err := copySparing(&dst, src); err != nil {
		t.Fatal(err)
	}
	if dst.Len() != 100+5000+40000+10+smallBufSize {
		t.Errorf("copied %d bytes", dst.Len())
	}
	S, L := smallBufSize, largeBufSize
	want := []int{
		S,    // 100: waits with the small buffer
		S, L, // 5000: fills the small one; the rest goes to a large one
		S, L, L, L, // 40000: small, then large ones until one is not filled
		S, // 10: small again
		S, // exactly a small buffer's worth; then the end
	}
	if fmt.Sprint(src.offered) != fmt.Sprint(want) {
		t.Errorf("buffers offered %v, want %v", src.offered, want)
	}
}

// When the edge ends a session itself (here at the idle timeout), it closes
// the backend connection rather than waiting for the backend to hang up: a
// backend that keeps its side open must not keep the session alive.
func TestBackendClosedWhenSessionEnds(t *testing.T) {
	via := viaBackend(t)
	h, _ := newTestHandler(t, func(h *Handler) {
		via.configure(h)
		h.Timeouts.Idle = caddy.Duration(50 * time.Millisecond)
	})
	conn, r, done := serveRelay(t, h, via, true, func(b *backend) error {
		b.send("220 backend ESMTP\r\n")
		b.expect("EHLO client.example")
		b.send("250 backend\r\n")
		if rest, err := io.ReadAll(b.r); err != nil || len(rest) > 0 {
			t.Errorf("after EHLO the backend got %q, %v; want the end of the stream", rest, err)
		}
		// a backend that does not hang up: what it sends now must meet a
		// closed socket (a reset: writes fail), not an edge that still
		// reads and drops it (they would all succeed)
		for range 1000 {
			if _, err := b.conn.Write([]byte("250 still here\r\n")); err != nil {
				return nil
			}
		}
		t.Errorf("the edge kept the backend connection open after ending the session")
		return nil
	})
	io.WriteString(conn, "EHLO client.example\r\n")
	readReplies(t, r, 1)
	if got := readReplies(t, r, 1)[0]; got != "421 4.4.2 mail.test Error: timeout exceeded" {
		t.Fatalf("got %q", got)
	}
	<-done
}

// unansweredAddr is a loopback address where connections are neither
// accepted nor refused: a listener whose accept queue is full, so the kernel
// drops further SYNs, as a firewall that drops packets does.
func unansweredAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	// fill the queue (never accepted) until a dial gets no answer
	for range 8 {
		conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr
		}
		t.Cleanup(func() { conn.Close() })
	}
	t.Fatalf("%s keeps accepting", addr)
	return ""
}

// An address that cannot be dialled is skipped for the next one, with a
// warning that names it: one that refuses at once, and one that never
// answers, which gets only its share of the backend timeout, so that the
// next address is still tried in time.
func TestBackendFailover(t *testing.T) {
	for _, tt := range []struct {
		name  string
		first func(testing.TB) string
	}{
		{"refused", refusedAddr},
		{"never answers", unansweredAddr},
	} {
		t.Run(tt.name, func(t *testing.T) {
			via := viaBackend(t)
			first := tt.first(t)
			h, logs := newTestHandler(t, func(h *Handler) {
				h.Backends = []string{first, via.ln.Addr().String()}
				h.Timeouts.Backend = caddy.Duration(2 * time.Second)
			})
			conn, r, done := serveRelay(t, h, via, false, func(b *backend) error {
				b.send("220 backend ESMTP\r\n")
				b.expect("QUIT")
				b.send("221 2.0.0 Bye\r\n")
				b.finish()
				return nil
			})
			if got := readReplies(t, r, 1)[0]; got != "220 backend ESMTP" {
				t.Fatalf("got %q, want the second backend's greeting", got)
			}
			io.WriteString(conn, "QUIT\r\n")
			if got := readReplies(t, r, 1)[0]; got != "221 2.0.0 Bye" {
				t.Fatalf("got %q", got)
			}
			expectClosed(t, r)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			warned := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessage("mail server unreachable; trying the next backend")
			if warned.Len() != 1 || warned.All()[0].ContextMap()["backend"] != first {
				t.Errorf("want one warning naming %s; log: %v", first, logs.All())
			}
		})
	}
}
