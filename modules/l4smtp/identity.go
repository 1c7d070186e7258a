package l4smtp

import (
	"fmt"
	"net"
	"time"

	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"github.com/pires/go-proxyproto"
)

// Identity: what the edge tells the backend about the client, which the
// backend cannot see for itself since the edge is its peer.

// writeProxyHeader tells the backend who the client is. The addresses are
// those of the client connection, or those a proxy_protocol handler in front
// of this one has read.
func (h *Handler) writeProxyHeader(sess *session, up net.Conn, deadline time.Time) error {
	client := l4proxyprotocol.GetConn(sess.cx)
	header := proxyproto.HeaderProxyFromAddrs(byte(h.proxyProtocol), client.RemoteAddr(), client.LocalAddr())
	_ = up.SetWriteDeadline(deadline)
	defer func() { _ = up.SetWriteDeadline(time.Time{}) }()
	if _, err := header.WriteTo(up); err != nil {
		return fmt.Errorf("writing the PROXY header to %s: %w", up.RemoteAddr(), err)
	}
	return nil
}
