package l4smtpsink

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/dustin/go-humanize"
	"github.com/emersion/go-smtp"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

const (
	// DefaultHostname is the name in the greeting and the EHLO reply when
	// Hostname is not set.
	DefaultHostname = "localhost"

	// DefaultMaxMessageSize is the largest message accepted when
	// MaxMessageSize is not set: 50 MiB.
	DefaultMaxMessageSize int64 = 50 << 20

	// How long go-smtp waits for a command line (and for the whole message
	// after DATA or a BDAT chunk), and for a reply to be written.
	readTimeout  = 5 * time.Minute
	writeTimeout = 10 * time.Minute

	// The longest command line, in bytes (the sink reads DATA content
	// itself, with no line limit). go-smtp's default is 2000, but go-smtp counts against it the
	// bytes of a BDAT chunk that its 4096-byte read buffer takes in together
	// with the command line (always the case with PIPELINING), so binary
	// chunks would fail with "500 Too long line"; 8192 is above what a valid
	// BDAT stream can add up to.
	maxLineLength = 8192

	// Recipients per message; RFC 5321 section 4.5.3.1.8 asks for at least
	// 100. More get 452 (and go-smtp advertises LIMITS RCPTMAX=100).
	maxRecipients = 100
)

// errShutDown is returned by Handle for a connection that arrives while the
// handler is being cleaned up (a config reload or stop).
var errShutDown = errors.New("smtp_sink: handler is shut down")

// Handler is an SMTP server for development and tests: a terminal
// layer4 handler that speaks plaintext SMTP with the client connection and
// stores every accepted message as one .eml file in a directory.
//
// It is for development and tests ONLY: it accepts AUTH PLAIN with ANY
// username and password (over plaintext), any sender and any recipient. Put it
// behind the SMTP edge on a loopback address, never on a public port.
//
// It advertises PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES, CHUNKING (BDAT),
// SMTPUTF8, SIZE <max_message_size> and AUTH PLAIN, and accepts up to 100
// recipients per message. The server waits up to 5 minutes for each command
// (and for a whole message after DATA or a BDAT chunk) and up to 10 minutes
// to write a reply. Command lines may be at most 8192 bytes long; the
// lines of a message have no limit but the message size.
//
// Each message is stored exactly as received, after dot-unstuffing for DATA
// or as the concatenation of the chunks for BDAT, with no Received: header
// added. A DATA message ends at exactly CRLF "." CRLF, as RFC 5321 says and
// as Postfix and the SMTP edge end it, also when a CR comes before that CRLF
// ("\r\r\n.\r\n"); a bare LF or a bare CR is content, never a line end, so a
// dot after one is kept and never ends the message. Every byte value is
// stored as it came. Before the 250 reply it is written to a temporary file in the
// directory (named .tmp-*), fsynced, renamed to
// <UTC time>-<random>.eml (e.g. 20250102T030405.123456789Z-<26 random
// characters>.eml, so names sort by arrival and never collide) and the
// directory is fsynced. A message that is refused or cut short (the client
// disconnects or sends RSET in the middle, the message is too large, a write
// fails) leaves no file. A failure to store gets 451 4.3.0 and is logged as an
// error. Temporary files are left over only after a crash.
//
// A config reload or stop closes the open sessions; a message in flight gets
// no 250 and leaves no file.
//
// Caddyfile, inside the layer4 global option:
//
//	{
//		layer4 {
//			127.0.0.1:10025 {
//				route {
//					smtp_sink {
//						directory ./mail
//						hostname sink.localhost
//						max_message_size 50MiB
//					}
//				}
//			}
//		}
//	}
type Handler struct {
	// The directory that receives one .eml file per accepted message. It is
	// created with mode 0700 if it does not exist; a relative path is relative
	// to Caddy's working directory. Required; there is no default.
	Directory string `json:"directory,omitempty"`

	// The name the server uses in its greeting and EHLO reply.
	// Default: "localhost".
	Hostname string `json:"hostname,omitempty"`

	// The largest message accepted, in bytes; it is advertised as SIZE, a
	// larger MAIL FROM SIZE= or message gets 552 and leaves no file. In the
	// Caddyfile it may have a unit, like 25MB or 50MiB.
	// Default: 52428800 (50 MiB).
	MaxMessageSize int64 `json:"max_message_size,omitempty"`

	logger   *zap.Logger
	maxSize  int64
	store    *store
	server   *smtp.Server
	listener *connListener
	served   chan struct{} // closed when server.Serve has returned

	mu      sync.Mutex
	closing bool                   // Cleanup has started; no new connections
	conns   map[*sinkConn]struct{} // connections that Handle is serving
	active  sync.WaitGroup         // Handle calls that have not returned
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.smtp_sink",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision checks the configuration, creates the directory and starts the
// SMTP server that Handle feeds connections to.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()

	if h.Directory == "" {
		return errors.New("smtp_sink: directory is required")
	}
	hostname := h.Hostname
	if hostname == "" {
		hostname = DefaultHostname
	}
	if strings.ContainsFunc(hostname, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) {
		return fmt.Errorf("smtp_sink: hostname %q contains spaces or control characters", hostname)
	}
	maxSize := h.MaxMessageSize
	if maxSize < 0 {
		return fmt.Errorf("smtp_sink: max_message_size must be positive, got %d", maxSize)
	}
	if maxSize == 0 {
		maxSize = DefaultMaxMessageSize
	}

	dir, err := filepath.Abs(h.Directory)
	if err != nil {
		return fmt.Errorf("smtp_sink: resolving directory %q: %w", h.Directory, err)
	}
	h.store, err = newStore(dir)
	if err != nil {
		return fmt.Errorf("smtp_sink: %w", err)
	}

	h.maxSize = maxSize
	h.server = newServer(&backend{store: h.store, logger: h.logger}, hostname, maxSize, h.logger)
	h.listener = newConnListener()
	h.conns = make(map[*sinkConn]struct{})
	h.served = make(chan struct{})
	go func() {
		defer close(h.served)
		if err := h.server.Serve(h.listener); err != nil {
			h.logger.Error("smtp server stopped", zap.Error(err))
		}
	}()

	h.logger.Debug("smtp sink ready",
		zap.String("directory", dir),
		zap.String("hostname", hostname),
		zap.Int64("max_message_size", maxSize),
	)
	return nil
}

// newServer makes the go-smtp server of a handler.
func newServer(be smtp.Backend, hostname string, maxSize int64, logger *zap.Logger) *smtp.Server {
	s := smtp.NewServer(be)
	s.Domain = hostname
	s.MaxMessageBytes = maxSize
	s.MaxRecipients = maxRecipients
	s.MaxLineLength = maxLineLength
	s.ReadTimeout = readTimeout
	s.WriteTimeout = writeTimeout
	s.AllowInsecureAuth = true // plaintext behind the edge, any credentials
	s.EnableSMTPUTF8 = true    // messages are stored as bytes, whatever they hold
	s.ErrorLog = serverLog{logger: logger}
	return s
}

// Cleanup stops the SMTP server: it closes the open sessions and waits until
// every Handle call and every message in flight has finished, so that nothing
// of this handler is left running after a config reload.
func (h *Handler) Cleanup() error {
	if h.served == nil {
		return nil // Provision failed before starting the server
	}

	h.mu.Lock()
	h.closing = true
	conns := make([]*sinkConn, 0, len(h.conns))
	for c := range h.conns {
		conns = append(conns, c)
	}
	h.mu.Unlock()

	err := h.server.Close()
	// Serve may not have registered the listener yet; closing it here makes
	// sure it returns.
	_ = h.listener.Close()
	// A connection that reached go-smtp just as it closed is not among those
	// it closes; end it at the socket, which ends its session.
	for _, c := range conns {
		c.abort()
	}
	<-h.served
	h.active.Wait()

	if err != nil && !errors.Is(err, smtp.ErrServerClosed) {
		return fmt.Errorf("smtp_sink: closing smtp server: %w", err)
	}
	return nil
}

// Handle serves the connection as an SMTP session and returns when the
// session is over and any message in flight is stored or discarded. It is a
// terminal handler: it never calls next.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	sc := newSinkConn(cx, h.maxSize)

	h.mu.Lock()
	if h.closing {
		h.mu.Unlock()
		return errShutDown
	}
	h.conns[sc] = struct{}{}
	h.active.Add(1)
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.conns, sc)
		h.mu.Unlock()
		h.active.Done()
	}()

	h.logger.Debug("smtp sink session started", zap.String("remote", cx.RemoteAddr().String()))
	if !h.listener.push(sc) {
		return errShutDown
	}
	sc.wait()
	h.logger.Debug("smtp sink session ended", zap.String("remote", cx.RemoteAddr().String()))
	return nil
}

// UnmarshalCaddyfile sets up the Handler from Caddyfile tokens. Syntax:
//
//	smtp_sink {
//		directory        <path>
//		hostname         <name>
//		max_message_size <size>
//	}
//
// directory is required; size is in bytes or has a unit, like 25MB or 50MiB.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name

	if d.NextArg() {
		return d.Errf("smtp_sink takes no arguments on its line, got '%s'; set the options in its block", d.Val())
	}

	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		switch option {
		case "directory", "hostname", "max_message_size":
		default:
			return d.Errf("unknown smtp_sink option '%s' (want directory, hostname or max_message_size)", option)
		}
		if seen[option] {
			return d.Errf("duplicate smtp_sink option '%s'", option)
		}
		seen[option] = true

		if !d.NextArg() {
			return d.ArgErr()
		}
		value := d.Val()
		if value == "{" {
			return d.Errf("smtp_sink option '%s' does not take a block", option)
		}
		if d.NextArg() {
			return d.Errf("smtp_sink option '%s' takes one argument, got also '%s'", option, d.Val())
		}

		switch option {
		case "directory":
			h.Directory = value
		case "hostname":
			h.Hostname = value
		case "max_message_size":
			size, err := humanize.ParseBytes(value)
			if err != nil {
				return d.Errf("smtp_sink option 'max_message_size': bad size '%s' (want bytes or a size like 25MB): %v", value, err)
			}
			if size == 0 || size > math.MaxInt64 {
				return d.Errf("smtp_sink option 'max_message_size' must be at least 1 byte and fit in 63 bits, got '%s'", value)
			}
			h.MaxMessageSize = int64(size)
		}

		if d.NextBlock(nesting + 1) {
			return d.Errf("smtp_sink option '%s' does not take a block", option)
		}
	}

	if h.Directory == "" {
		return d.Err("smtp_sink needs a directory, e.g. 'directory ./mail'")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Handler)(nil)
	_ caddy.CleanerUpper    = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ layer4.NextHandler    = (*Handler)(nil)
)
