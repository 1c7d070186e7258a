package l4smtpsink

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"go.uber.org/zap"
)

// errLocal is the reply when a message could not be stored (our fault).
var errLocal = &smtp.SMTPError{
	Code:         451,
	EnhancedCode: smtp.EnhancedCode{4, 3, 0},
	Message:      "Requested action aborted: local error in processing",
}

// errSessionClosed ends a Data call that go-smtp starts after the session
// has already been closed (possible with BDAT, whose Data runs in a
// goroutine of its own). Nobody reads the reply.
var errSessionClosed = errors.New("smtp session already closed")

// errTruncated replaces the end of a message that the client did not send
// completely.
var errTruncated = errors.New("connection closed before the end of the message")

// backend makes one session per SMTP connection.
type backend struct {
	store  *store
	logger *zap.Logger
}

// NewSession implements smtp.Backend; go-smtp calls it on the first
// EHLO or HELO.
func (b *backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	sc, ok := c.Conn().(*sinkConn)
	if !ok {
		// Cannot happen: every connection comes from Handle.
		return nil, fmt.Errorf("unexpected connection type %T", c.Conn())
	}
	return &session{
		store: b.store,
		conn:  sc,
		logger: b.logger.With(
			zap.String("remote", sc.RemoteAddr().String()),
			zap.String("helo", c.Hostname()),
		),
	}, nil
}

// session accepts everything: any AUTH PLAIN credentials, any sender, any
// recipient, and stores each message.
type session struct {
	store  *store
	conn   *sinkConn
	logger *zap.Logger

	// With BDAT, Data runs in its own goroutine, concurrently with Reset.
	mu    sync.Mutex
	user  string
	from  string
	rcpts []string
}

// AuthMechanisms implements smtp.AuthSession.
func (s *session) AuthMechanisms() []string {
	return []string{sasl.Plain}
}

// Auth implements smtp.AuthSession: AUTH PLAIN with any credentials.
func (s *session) Auth(mech string) (sasl.Server, error) {
	if mech != sasl.Plain {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return sasl.NewPlainServer(func(identity, username, _ string) error {
		s.mu.Lock()
		s.user = username
		s.mu.Unlock()
		s.logger.Debug("accepted AUTH PLAIN",
			zap.String("username", username),
			zap.String("identity", identity),
		)
		return nil
	}), nil
}

// Mail implements smtp.Session.
func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.from = from
	s.rcpts = nil
	return nil
}

// Rcpt implements smtp.Session; go-smtp enforces the recipient limit.
func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcpts = append(s.rcpts, to)
	return nil
}

// Reset implements smtp.Session.
func (s *session) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.from = ""
	s.rcpts = nil
}

// Logout implements smtp.Session. go-smtp calls it with its connection lock
// held, so it must not wait for anything.
func (s *session) Logout() error {
	return nil
}

// Data implements smtp.Session: it stores the message, and returns nil (250)
// only once it is on disk. A DATA message is read with the sink's own reader
// (data.go), not with r.
func (s *session) Data(r io.Reader) error {
	if !s.conn.beginData() {
		return errSessionClosed
	}
	defer s.conn.endData()
	if dr := s.conn.dataContent(); dr != nil {
		r = dr
	}

	s.mu.Lock()
	user, from, rcpts := s.user, s.from, slices.Clone(s.rcpts)
	s.mu.Unlock()

	name, size, err := s.store.deliver(&truncationGuard{r: r, conn: s.conn})
	if err != nil {
		var storageErr *storageError
		if errors.As(err, &storageErr) {
			s.logger.Error("storing message", zap.String("from", from), zap.Error(err))
			return errLocal
		}
		s.logger.Debug("message not stored",
			zap.String("from", from),
			zap.Int64("bytes_received", size),
			zap.Error(err),
		)
		// go-smtp turns an *smtp.SMTPError into its reply (552 for a message
		// over the size limit) only when it gets it unwrapped.
		var smtpErr *smtp.SMTPError
		if errors.As(err, &smtpErr) {
			return smtpErr
		}
		return err
	}

	s.logger.Debug("stored message",
		zap.String("file", name),
		zap.Int64("size", size),
		zap.String("from", from),
		zap.Strings("recipients", rcpts),
		zap.String("username", user),
	)
	return nil
}

// truncationGuard turns the end of a message into an error when the
// connection failed before it. go-smtp v0.25.1 copies a BDAT chunk with
// io.Copy, which takes the connection's EOF for the end of the chunk: a client
// that hangs up in the middle of a BDAT ... LAST chunk would otherwise end the
// message there, and the part would be stored as if complete. A complete chunk
// or DATA message never needs a read past its end, so a failed read before the
// end means the message is cut short. (DATA without its end-of-data line
// already gets io.ErrUnexpectedEOF from the sink's dataReader.)
type truncationGuard struct {
	r    io.Reader
	conn *sinkConn
}

func (g *truncationGuard) Read(p []byte) (int, error) {
	n, err := g.r.Read(p)
	if err == io.EOF && g.conn.readFailed.Load() {
		return n, errTruncated
	}
	return n, err
}

// serverLog passes go-smtp's own log lines to zap: a panic in a session is
// our fault and an error; the rest are client connection errors (timeouts,
// resets) and only debug.
type serverLog struct {
	logger *zap.Logger
}

func (l serverLog) Printf(format string, v ...any) {
	l.log(fmt.Sprintf(format, v...))
}

func (l serverLog) Println(v ...any) {
	l.log(strings.TrimSuffix(fmt.Sprintln(v...), "\n"))
}

func (l serverLog) log(msg string) {
	if strings.HasPrefix(msg, "panic") {
		l.logger.Error("smtp server", zap.String("detail", msg))
		return
	}
	l.logger.Debug("smtp server", zap.String("detail", msg))
}

// Interface guards
var (
	_ smtp.Backend     = (*backend)(nil)
	_ smtp.AuthSession = (*session)(nil)
	_ smtp.Logger      = serverLog{}
)
