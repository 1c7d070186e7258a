package l4smtp

import (
	"net"
	"sync"
)

// connLimits counts the sessions a handler is serving, in all and per client
// address, so that clients over a limit are turned away before any TLS work
// is spent on them. A zero limit is no limit.
type connLimits struct {
	max, maxPerIP int

	mu    sync.Mutex
	total int
	perIP map[string]int
}

// limitExceeded names the limit a new session would exceed.
type limitExceeded string

const (
	limitNone  limitExceeded = ""
	limitTotal limitExceeded = "max_connections"
	limitPerIP limitExceeded = "max_connections_per_ip"
)

// acquire counts a new session from addr, unless that would exceed a limit.
// A session that was counted must be released.
func (l *connLimits) acquire(addr net.Addr) limitExceeded {
	if l.max == 0 && l.maxPerIP == 0 {
		return limitNone
	}
	ip := clientIP(addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.max > 0 && l.total >= l.max {
		return limitTotal
	}
	if l.maxPerIP > 0 && l.perIP[ip] >= l.maxPerIP {
		return limitPerIP
	}
	l.total++
	if l.maxPerIP > 0 {
		if l.perIP == nil {
			l.perIP = make(map[string]int)
		}
		l.perIP[ip]++
	}
	return limitNone
}

// release uncounts a session that acquire counted.
func (l *connLimits) release(addr net.Addr) {
	if l.max == 0 && l.maxPerIP == 0 {
		return
	}
	ip := clientIP(addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.maxPerIP > 0 {
		if l.perIP[ip] <= 1 {
			delete(l.perIP, ip)
		} else {
			l.perIP[ip]--
		}
	}
}

// clientIP is the address without its port, so that all connections of one
// client count together.
func clientIP(addr net.Addr) string {
	if tcp, ok := addr.(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	return host
}
