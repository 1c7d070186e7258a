package l4smtp

import (
	"crypto/tls"
	"fmt"
	"net"
	"runtime/debug"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The access log: one line per session, at Info, when the session ends, from
// the logger layer4.handlers.smtp.access, so that Caddy's log { include ...
// } and { exclude ... } can send it where the operator wants. A client's
// misbehaviour is told here, in the session's outcome, and not as a warning
// of its own: warnings and errors are for what the operator can fix.
//
// Its fields, with the names of Caddy's HTTP access log where the meaning is
// the same (remote_ip, client_ip, tls, user_id, bytes_read, duration, ...),
// are listed in the README ("Access log"), and the outcomes in session.go.

// endSession ends the session's record when Handle returns: it turns a
// panic into 421 4.3.0 for the client and an Error for the operator, then
// writes the access line.
func (h *Handler) endSession(sess *session) {
	if r := recover(); r != nil {
		sess.ended(outcomeInternalError, fmt.Sprint(r))
		sess.log().Error("panic in an SMTP session",
			zap.Any("panic", r),
			zap.ByteString("stack", debug.Stack()))
		// inside TLS when the handshake is done, never plaintext into it
		client := sess.clientConn()
		_ = client.SetWriteDeadline(time.Now().Add(finalReplyTimeout))
		_, _ = client.Write(h.replies.internalError)
	}
	why, detail := sess.howEnded()
	mode := sess.mode()
	metrics.activeSessions.WithLabelValues(sess.listener).Dec()
	metrics.sessionEnded(sess, mode, why, detail)
	if ce := h.accessLogger.Check(zapcore.InfoLevel, "handled session"); ce != nil {
		ce.Write(sess.accessFields(mode, why, detail)...)
	}
}

// accessFields are the fields of the session's access line.
func (s *session) accessFields(mode string, outcome outcome, detail string) []zap.Field {
	remoteIP, remotePort := splitAddr(s.cx.RemoteAddr())
	clientIP, _ := splitAddr(l4proxyprotocol.GetConn(s.cx).RemoteAddr())
	fields := make([]zap.Field, 0, 24)
	fields = append(fields,
		zap.String("session_id", s.id),
		zap.String("remote_ip", remoteIP),
		zap.String("remote_port", remotePort),
		zap.String("client_ip", clientIP),
		zap.String("listener", s.listener),
		zap.String("mode", mode))
	if s.tls != nil {
		fields = append(fields, zap.Object("tls", tlsFields{s.tls}))
	}
	if s.facts.ehlo != "" {
		fields = append(fields, zap.String("ehlo", s.facts.ehlo))
	}
	if s.facts.authAttempts > 0 {
		fields = append(fields,
			zap.Int("auth_attempts", s.facts.authAttempts),
			zap.Int("auth_failures", s.facts.authFailures))
	}
	if s.facts.user != "" {
		fields = append(fields, zap.String("user_id", s.facts.user))
	}
	for reason, n := range s.facts.refused {
		if n > 0 {
			fields = append(fields, zap.Int("refused_"+refusalNames[reason], n))
		}
	}
	if s.facts.bareLineEnds > 0 {
		fields = append(fields, zap.Int("bare_line_ends", s.facts.bareLineEnds))
	}
	fields = append(fields,
		zap.Int("messages", s.facts.messages),
		zap.Int("recipients", s.facts.recipients),
		zap.Int64("bytes_read", s.bytesRead),
		zap.Int64("bytes_written", s.bytesWritten))
	if s.backend != "" {
		fields = append(fields, zap.String("backend", s.backend))
	}
	fields = append(fields,
		zap.Float64("duration", time.Since(s.start).Seconds()),
		zap.String("outcome", string(outcome)))
	if detail != "" {
		fields = append(fields, zap.String("detail", detail))
	}
	return fields
}

// tlsFields are the TLS facts of the access line, named as in Caddy's HTTP
// access log.
type tlsFields struct{ state *tls.ConnectionState }

func (f tlsFields) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("server_name", f.state.ServerName)
	enc.AddString("version", caddytls.ProtocolName(f.state.Version))
	enc.AddString("cipher_suite", tls.CipherSuiteName(f.state.CipherSuite))
	enc.AddBool("resumed", f.state.DidResume)
	return nil
}

func splitAddr(addr net.Addr) (host, port string) {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String(), ""
	}
	return host, port
}
