package l4smtp

import (
	"net"
	"strconv"
	"strings"

	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"go.uber.org/zap"
)

// XCLIENT (Postfix's XCLIENT_README): with the xclient option the edge tells
// the backend who the client is inside the SMTP session. After the backend's
// greeting it sends its own EHLO; when the reply offers XCLIENT it sends
// "XCLIENT" with the attributes the backend offers and the edge knows (NAME
// as [UNAVAILABLE]: the edge does no DNS lookups; ADDR, PORT, DESTADDR,
// DESTPORT), and takes the backend's fresh 220. Neither reply reaches the
// client, and no client byte reaches the backend before XCLIENT has
// succeeded. The client's own EHLO then sets the HELO name and the protocol
// (the newer form of the protocol, which every backend that offers XCLIENT
// expects after it). A backend that does not offer XCLIENT to the edge, or
// refuses it, is a configuration fault: the session ends with 421 4.4.1 and
// an Error says what to configure.

// xclientStep is where the edge stands in its XCLIENT exchange.
type xclientStep uint8

const (
	xclientOff  xclientStep = iota
	xclientEHLO             // the edge's EHLO is next
	xclientSend             // the EHLO reply is in: XCLIENT is next
	xclientSent             // XCLIENT's reply is due
	xclientDone
)

// edgeCommand appends the edge's next own command to dst, or says why the
// exchange failed. The caller holds tmu, and the tracker waits for nothing.
func (c *relayConn) edgeCommand(dst []byte) ([]byte, string) {
	t := &c.tracker
	switch c.xclient {
	case xclientEHLO:
		if !t.greetingOK {
			// the backend refused the session in its greeting; the
			// client reads that refusal, nothing else will be accepted
			c.xclient = xclientDone
			return dst, ""
		}
		c.xclient = xclientSend
		return t.inject(dst, "EHLO "+c.h.hostname, kindEdgeEHLO), ""
	case xclientSend:
		if t.edgeCode[0] != '2' {
			return dst, "the mail server refused the edge's EHLO (" + string(t.edgeCode[:]) + ")"
		}
		if !t.xclientSeen {
			return dst, "the mail server does not offer XCLIENT to the edge"
		}
		c.xclient = xclientSent
		return t.inject(dst, c.xclientCommand(t.xclientAttrs), kindEdgeXCLIENT), ""
	case xclientSent:
		if t.edgeCode[0] != '2' {
			return dst, "the mail server refused the edge's XCLIENT (" + string(t.edgeCode[:]) + ")"
		}
		c.xclient = xclientDone
	}
	return dst, ""
}

// xclientCommand is the XCLIENT command line for the attributes offered.
func (c *relayConn) xclientCommand(offered string) string {
	client := l4proxyprotocol.GetConn(c.sess.cx)
	var b strings.Builder
	b.WriteString("XCLIENT")
	add := func(name, value string) {
		for _, o := range strings.Fields(offered) {
			if strings.EqualFold(o, name) {
				b.WriteString(" " + name + "=" + xtext(value))
				return
			}
		}
	}
	add("NAME", "[UNAVAILABLE]")
	if ip, port, ok := hostPort(client.RemoteAddr()); ok {
		add("ADDR", ip)
		add("PORT", port)
	}
	if ip, port, ok := hostPort(client.LocalAddr()); ok {
		add("DESTADDR", ip)
		add("DESTPORT", port)
	}
	return b.String()
}

// hostPort is an address as XCLIENT writes it: IPv6 with the IPV6: prefix.
func hostPort(addr net.Addr) (ip, port string, ok bool) {
	tcp, isTCP := addr.(*net.TCPAddr)
	if !isTCP || tcp.IP == nil {
		return "", "", false
	}
	ip = tcp.IP.String()
	if tcp.IP.To4() == nil {
		ip = "IPV6:" + ip
	}
	return ip, strconv.Itoa(tcp.Port), true
}

// xtext encodes an XCLIENT attribute value (RFC 3461 xtext): "+", "=", and
// every byte outside "!".."~" as "+" and two upper-case hex digits.
func xtext(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if ch < '!' || ch > '~' || ch == '+' || ch == '=' {
			b.WriteByte('+')
			b.WriteByte(hex[ch>>4])
			b.WriteByte(hex[ch&15])
			continue
		}
		b.WriteByte(ch)
	}
	return b.String()
}

// identityRefused ends the session when the backend would not learn who the
// client is: relaying it anyway would let the backend take the client for
// the edge, which it trusts.
func (c *relayConn) identityRefused(why string) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.end(outcomeBackendRefused, why, c.h.replies.backendUnavailable, false) {
		c.sess.log().Error("mail server did not take XCLIENT from the edge; allow the edge's address to use XCLIENT (Postfix: smtpd_authorized_xclient_hosts), or use proxy_protocol instead",
			zap.String("reason", why),
			zap.String("backend", c.sess.backend))
	}
}
