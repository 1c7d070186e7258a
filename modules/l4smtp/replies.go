package l4smtp

// The edge's own replies. Every reply carries its enhanced status code (RFC
// 3463, ENHANCEDSTATUSCODES is offered before TLS) and generic text; a reply
// that precedes a close is a 421 (RFC 5321 3.8).

// replies are the edge's own replies that name its host, before TLS and
// after it, built once per handler.
type replies struct {
	ehlo, helo         []byte
	timeout, tooMany   []byte
	protocolError      []byte
	backendUnavailable []byte
	backendGone        []byte
	tooManyConns       []byte
	authBanned         []byte
	shuttingDown       []byte
	internalError      []byte
}

func newReplies(host string) replies {
	return replies{
		ehlo:               []byte("250-" + host + "\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"),
		helo:               []byte("250 " + host + "\r\n"),
		timeout:            []byte("421 4.4.2 " + host + " Error: timeout exceeded\r\n"),
		tooMany:            []byte("421 4.7.0 " + host + " Error: too many errors\r\n"),
		protocolError:      []byte("421 4.5.0 " + host + " Protocol error, closing connection\r\n"),
		backendUnavailable: []byte("421 4.4.1 " + host + " Service not available, closing transmission channel\r\n"),
		backendGone:        []byte("421 4.4.2 " + host + " Connection to the mail server lost, closing transmission channel\r\n"),
		tooManyConns:       []byte("421 4.7.0 " + host + " Too many connections, try again later\r\n"),
		authBanned:         []byte("421 4.7.0 " + host + " Too many failed logins, try again later\r\n"),
		shuttingDown:       []byte("421 4.3.2 " + host + " Service shutting down, closing transmission channel\r\n"),
		internalError:      []byte("421 4.3.0 " + host + " Internal error, closing transmission channel\r\n"),
	}
}

var (
	replyOK          = []byte("250 2.0.0 OK\r\n")
	replyBye         = []byte("221 2.0.0 Bye\r\n")
	replyReady       = []byte("220 2.0.0 Ready to start TLS\r\n")
	replyNeedTLS     = []byte("530 5.7.0 Must issue a STARTTLS command first\r\n")
	replyUnknown     = []byte("500 5.5.2 Error: command not recognized\r\n")
	replyTooLong     = []byte("500 5.5.6 Error: line too long\r\n")
	replyNoParams    = []byte("501 5.5.4 Syntax error, no parameters allowed\r\n")
	replyEHLOSyntax  = []byte("501 5.5.4 Syntax: EHLO hostname\r\n")
	replyHELOSyntax  = []byte("501 5.5.4 Syntax: HELO hostname\r\n")
	replyEarlyTalker = []byte("521 5.5.1 Protocol error\r\n")
)
