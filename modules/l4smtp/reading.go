package l4smtp

import "fmt"

// The options of the edge's reading of the session after TLS (tracker.go):
// which commands the edge answers itself, and how line ends reach the
// backend.

// setupReading checks the options of the reading after TLS.
func (h *Handler) setupReading() error {
	h.requireAuth = h.RequireAuth == nil || *h.RequireAuth
	switch h.BareLineEnds {
	case "", "normalize":
		h.passLineEnds = false
	case "pass":
		h.passLineEnds = true
	default:
		return fmt.Errorf("smtp: bare_line_ends must be normalize or pass, got %q", h.BareLineEnds)
	}
	return nil
}

// setupTracker prepares a session's reading after TLS.
func (h *Handler) setupTracker(t *transactionTracker, sess *session) {
	t.normalize = !h.passLineEnds
	t.requireAuth = h.requireAuth
	t.authed = sess.tls != nil && len(sess.tls.VerifiedChains) > 0
	t.edge = &defaultEdgeAnswers
}
