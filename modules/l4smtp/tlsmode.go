package l4smtp

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/mholt/caddy-l4/layer4"
)

// Telling the two kinds of client apart (detect_tls). A client configured
// for implicit TLS sends its ClientHello as soon as it has connected; a
// client configured for STARTTLS (or for no TLS) sends nothing until it has
// been greeted. So the first bytes, or a short silence, tell them apart,
// and a listener can serve both: the support ticket every provider's SMTP
// guide answers ("wrong version number", "connection unexpectedly closed")
// is a client whose TLS mode does not match the port.
//
// Each mode keeps all its rules: a client greeted in plaintext gets the
// whole STARTTLS dialogue (TLS before AUTH and MAIL, the injection
// defence), and no client ever gets a plaintext reply to TLS bytes, or TLS
// to plaintext. Bytes that are neither a ClientHello nor a client waiting
// are treated as the listener's own mode treats them.

// Defaults of detect_tls.
const (
	// On an implicit TLS listener: TLS clients pay nothing (their first
	// byte ends the wait), a client that waits for a greeting is greeted
	// after this.
	defaultDetectImplicit = time.Second
	// With early_talker reject, which waits anyway: the start of the
	// pregreet wait, before the first greeting line (at most half of it).
	defaultDetectEarlyTalker = 200 * time.Millisecond
)

// detectWithinPregreet checks that, with early_talker reject, the detection
// leaves part of the pregreet wait for after the first greeting line.
func detectWithinPregreet(detect, pregreet time.Duration) error {
	if detect >= pregreet {
		return fmt.Errorf("detect_tls (%s) must be shorter than timeouts pregreet (%s): with early_talker reject it is the start of the pregreet wait",
			detect, pregreet)
	}
	return nil
}

// openingMode waits, with detect_tls, for the client's first byte: a TLS
// handshake record starts implicit TLS, silence gets the plaintext greeting,
// and other bytes leave the listener's own mode to deal with them (the
// handshake refuses them, or the dialogue reads them as commands). It
// returns the bytes read, which the session must see first, and false when
// the client went away.
func (h *Handler) openingMode(cx *layer4.Connection) (implicit bool, first []byte, alive bool) {
	if h.detectTLS == 0 {
		return h.ImplicitTLS, nil, true
	}
	_ = cx.SetReadDeadline(time.Now().Add(h.detectTLS))
	b := make([]byte, 1)
	n, err := cx.Read(b)
	_ = cx.SetReadDeadline(time.Time{})
	switch {
	case n == 1:
		return b[0] == tlsHandshakeRecord || h.ImplicitTLS, b, true
	case errors.Is(err, os.ErrDeadlineExceeded):
		return false, nil, true
	}
	return false, nil, false
}
