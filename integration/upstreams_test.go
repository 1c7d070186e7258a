package integration

import (
	"crypto/x509"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"testing"
)

// upstreamsBackend is the edge's own backend block of the upstreams test:
// the two sinks, the policy, and active health checks often enough for a
// test (an upstream that fails one check is down, one that passes two is
// back).
const upstreamsBackend = `backend {
					to %s
					to %s
					lb_policy %s
					health_interval 200ms
					health_timeout 2s
					health_fall 1
					health_rise 2
				}`

// startSinkB starts (or starts again) sink B in a caddy of its own, on addr,
// storing into dir.
func startSinkB(t *testing.T, addr, dir string) *caddyProc {
	t.Helper()
	return startCaddy(t, func() caddySetup {
		return caddySetup{
			caddyfile: fmt.Sprintf(`{
	admin off
	skip_install_trust
	layer4 {
		%s {
			route {
				smtp_sink {
					directory %q
					hostname sink-b.localhost
				}
			}
		}
	}
}
`, addr, dir),
			roots: x509.NewCertPool(),
			addrs: []string{addr},
		}
	})
}

// TestUpstreams: the edge's own upstreams, two smtp_sink instances (B in a
// caddy the test stops and starts again). Round robin spreads sessions
// over both; with B stopped, the active health check marks it down and no
// session tries it any more, every one delivered through A; started again,
// B is taken back after its rise checks; least_conn puts held sessions on
// both.
func TestUpstreams(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env := &lbEnv{dirA: filepath.Join(dir, "sink-a"), dirB: filepath.Join(dir, "sink-b")}
	env.sinkAddrB = freeAddr(t)
	env.procB = startSinkB(t, env.sinkAddrB, env.dirB)

	var leastConn listener
	env.edge = startCaddy(t, func() caddySetup {
		env.listeners = []listener{{name: "round_robin", mode: implicitTLS, addr: freeAddr(t)}}
		leastConn = listener{name: "least_conn", mode: startTLS, addr: freeAddr(t)}
		env.sinkAddrA = freeAddr(t)
		// the readiness probe's sessions go to a sink of their own: they
		// must not take a turn of round robin or count for least_conn
		probe := listener{name: "probe", mode: implicitTLS, addr: freeAddr(t)}
		probeSink := freeAddr(t)
		return caddySetup{
			caddyfile: fmt.Sprintf(`{
	admin off
	skip_install_trust
	layer4 {
		%s {
			route {
				smtp %s {
					implicit_tls
					require_auth off
					%s
				}
			}
		}
		%s {
			route {
				smtp %s {
					require_auth off
					%s
				}
			}
		}
		%s {
			route {
				smtp %s {
					implicit_tls
					backend %s
				}
			}
		}
		%s {
			route {
				smtp_sink {
					directory %q
					hostname sink-a.localhost
				}
			}
		}
		%s {
			route {
				smtp_sink {
					directory %q
				}
			}
		}
	}
}
`, env.listeners[0].addr, firstHost, fmt.Sprintf(upstreamsBackend, env.sinkAddrA, env.sinkAddrB, "round_robin"),
				leastConn.addr, firstHost, fmt.Sprintf(upstreamsBackend, env.sinkAddrA, env.sinkAddrB, "least_conn"),
				probe.addr, firstHost, probeSink,
				env.sinkAddrA, env.dirA, probeSink, filepath.Join(dir, "probe")),
			addrs:     []string{env.listeners[0].addr, leastConn.addr, probe.addr, env.sinkAddrA, probeSink},
			probe:     probe,
			hostnames: []string{firstHost},
		}
	})
	rr := env.listeners[0]
	spread := func(what string, n int) map[string]int {
		t.Helper()
		count := map[string]int{}
		for i := range n {
			s := lbDeliver(t, env, rr, fmt.Sprintf("%s-%d", what, i))
			if s.err != nil {
				t.Fatalf("%s: session %d: %v", what, i, s.err)
			}
			count[lbWhere(t, env, s.token)]++
		}
		return count
	}
	isB := func(e map[string]any) bool { return logField(e, "upstream") == env.sinkAddrB }
	retriesOfB := func() int {
		n := 0
		for _, e := range env.edge.logEntries(t) {
			if logField(e, "msg") == "mail server unreachable; trying the next backend" && logField(e, "backend") == env.sinkAddrB {
				n++
			}
		}
		return n
	}

	// 1. round robin: sessions in turn
	if count := spread("spread", 6); count["A"] != 3 || count["B"] != 3 {
		t.Errorf("round robin: %d sessions to A and %d to B, want 3 and 3", count["A"], count["B"])
	}

	// 2. B stops: the checks mark it down, and from then on no session
	// even tries it
	env.procB.stop(t)
	if c, err := net.Dial("tcp", env.sinkAddrB); err == nil {
		c.Close()
		t.Fatalf("sink B %s still accepts connections after its caddy exited", env.sinkAddrB)
	}
	down := env.edge.waitLogEntry(t, "saying B is down", func(e map[string]any) bool {
		return logField(e, "msg") == "mail server down" && isB(e) && logField(e, "check") == "active"
	})
	if logField(down, "level") != "warn" {
		t.Errorf("B down logged at %q, want warn", logField(down, "level"))
	}
	before := retriesOfB()
	if count := spread("b-down", 6); count["A"] != 6 {
		t.Errorf("with B down: %d sessions to A, want all 6", count["A"])
	}
	if after := retriesOfB(); after != before {
		t.Errorf("%d sessions tried B after the health check marked it down", after-before)
	}

	// 3. B starts again: taken back after its rise checks, and round
	// robin spreads the sessions again
	env.procB = startSinkB(t, env.sinkAddrB, env.dirB)
	up := env.edge.waitLogEntry(t, "saying B is healthy again", func(e map[string]any) bool {
		return logField(e, "msg") == "mail server healthy again" && isB(e)
	})
	if rise, _ := up["rise"].(float64); rise != 2 {
		t.Errorf("B taken back with rise %v, want after 2 checks", up["rise"])
	}
	if count := spread("b-back", 4); count["A"] != 2 || count["B"] != 2 {
		t.Errorf("with B back: %d sessions to A and %d to B, want 2 and 2", count["A"], count["B"])
	}

	// 4. least_conn: sessions held open at once go to the upstream with
	// the fewest, so four of them end up two and two
	type held struct {
		token string
		send  func() error
	}
	var sessions []held
	for i := range 4 {
		c := smtpClient(t, leastConn, env.edge.tlsConfig(firstHost))
		token := fmt.Sprintf("%s-held-%d", uniqueToken(t), i)
		sessions = append(sessions, held{token, func() error {
			defer c.Close()
			return deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "held"))
		}})
	}
	count := map[string]int{}
	for i, s := range sessions {
		if err := s.send(); err != nil {
			t.Fatalf("held session %d: %v", i, err)
		}
		count[lbWhere(t, env, s.token)]++
	}
	if count["A"] != 2 || count["B"] != 2 {
		t.Errorf("least_conn: %d held sessions on A and %d on B, want 2 and 2", count["A"], count["B"])
	}
}

// proxySinkBlock is a layer4 server block with an smtp_sink on addr that
// reads the PROXY header the edge sends (the examples' backends get one)
// before it speaks SMTP, as a Postfix listener with
// smtpd_upstream_proxy_protocol does.
func proxySinkBlock(addr, dir, hostname string) string {
	return fmt.Sprintf(`
		%s {
			route {
				proxy_protocol {
					allow 127.0.0.1/32
					fallback_policy reject
				}
				smtp_sink {
					directory %q
					hostname %s
				}
			}
		}
`, addr, dir, hostname)
}

// startProxySink starts (or starts again) a proxySinkBlock in a caddy of its
// own.
func startProxySink(t *testing.T, addr, dir, hostname string) *caddyProc {
	t.Helper()
	return startCaddy(t, func() caddySetup {
		return caddySetup{
			caddyfile: "{\n\tadmin off\n\tskip_install_trust\n\tlayer4 {" + proxySinkBlock(addr, dir, hostname) + "\t}\n}\n",
			roots:     x509.NewCertPool(),
			addrs:     []string{addr},
		}
	})
}

// TestLoadBalancingExample runs examples/load-balancing/Caddyfile itself,
// its two mail servers two smtp_sink instances that read its PROXY v2
// header (B in a caddy the test stops and starts again), and checks what
// its comments say: sessions go to the two servers in turn, on each of its
// listeners; a stopped server is taken out after two failed checks and
// every session is delivered through the other; started again, it is taken
// back after two good checks and gets its turn again.
func TestLoadBalancingExample(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env := &lbEnv{dirA: filepath.Join(dir, "sink-a"), dirB: filepath.Join(dir, "sink-b")}
	env.sinkAddrB = freeAddr(t)
	env.procB = startProxySink(t, env.sinkAddrB, env.dirB, "sink-b.localhost")

	env.edge = startCaddy(t, func() caddySetup {
		env.listeners = []listener{
			{name: "465", mode: implicitTLS, addr: freeAddr(t)},
			{name: "587", mode: startTLS, addr: freeAddr(t)},
			{name: "2525", mode: startTLS, addr: freeAddr(t)},
		}
		env.sinkAddrA = freeAddr(t)
		// the readiness probe's sessions go to a listener and sink of their
		// own: they must not take a turn of round robin
		probe := listener{name: "probe", mode: implicitTLS, addr: freeAddr(t)}
		probeSink := freeAddr(t)
		added := fmt.Sprintf(`
		%s {
			route {
				smtp %s {
					implicit_tls
					backend %s
				}
			}
		}
		%s {
			route {
				smtp_sink {
					directory %q
				}
			}
		}
`, probe.addr, firstHost, probeSink, probeSink, filepath.Join(dir, "probe")) +
			proxySinkBlock(env.sinkAddrA, env.dirA, "sink-a.localhost")
		caddyfile := readExample(t, "load-balancing/Caddyfile", map[string]string{
			"\temail postmaster@example.com\n": "\tadmin off\n\tskip_install_trust\n\temail postmaster@example.com\n",
			"\tlayer4 {\n":                     "\tlayer4 {" + added,
			"\t\t:465 {":                       "\t\t" + env.listeners[0].addr + " {",
			"\t\t:587 :2525 {":                 "\t\t" + env.listeners[1].addr + " " + env.listeners[2].addr + " {",
			"smtp mail.example.com {":          "smtp " + firstHost + " {",
			"to 10.0.0.21:10587":               "to " + env.sinkAddrA,
			"to 10.0.0.22:10587":               "to " + env.sinkAddrB,
			// an admin checks every 10s; the test cannot wait that long
			// for the two checks that take a server out or bring it back.
			// Only the interval changes: the counts are the example's.
			"health_interval 10s": "health_interval 250ms",
		})
		return caddySetup{
			caddyfile: caddyfile,
			addrs:     []string{env.listeners[0].addr, env.listeners[1].addr, env.listeners[2].addr, probe.addr, env.sinkAddrA, probeSink},
			probe:     probe,
			hostnames: []string{firstHost},
		}
	})
	isB := func(e map[string]any) bool { return logField(e, "upstream") == env.sinkAddrB }
	retriesOfB := func() int {
		n := 0
		for _, e := range env.edge.logEntries(t) {
			if logField(e, "msg") == "mail server unreachable; trying the next backend" && logField(e, "backend") == env.sinkAddrB {
				n++
			}
		}
		return n
	}
	// sessions runs n sessions one after the other, on the listeners in
	// turn from the first, and returns the sink each message is in.
	sessions := func(what string, n int, listeners []listener) []string {
		t.Helper()
		var where []string
		for i := range n {
			l := listeners[i%len(listeners)]
			s := lbDeliver(t, env, l, fmt.Sprintf("%s-%d", what, i))
			if s.err != nil {
				t.Fatalf("%s: session %d on %s: %v", what, i, l.name, s.err)
			}
			where = append(where, lbWhere(t, env, s.token))
		}
		return where
	}
	inTurn := func(what string, where []string) {
		t.Helper()
		for i := 1; i < len(where); i++ {
			if where[i] == where[i-1] {
				t.Errorf("%s: sessions went to %v, want the two servers in turn", what, where)
				return
			}
		}
	}

	// 1. round robin, on each smtp block of the example (465; 587 and
	// 2525 share one block, and so one turn)
	inTurn("465", sessions("rr-465", 6, env.listeners[:1]))
	inTurn("587 and 2525", sessions("rr-587", 6, env.listeners[1:]))

	// 2. B stops: two failed checks take it out, and from then on every
	// session is delivered through A without even trying B
	env.procB.stop(t)
	if c, err := net.Dial("tcp", env.sinkAddrB); err == nil {
		c.Close()
		t.Fatalf("sink B %s still accepts connections after its caddy exited", env.sinkAddrB)
	}
	down := env.edge.waitLogEntry(t, "saying B is down", func(e map[string]any) bool {
		return logField(e, "msg") == "mail server down" && isB(e) && logField(e, "check") == "active"
	})
	if fall, _ := down["fall"].(float64); fall != 2 {
		t.Errorf("B taken out with fall %v, want after the example's 2 failed checks", down["fall"])
	}
	before := retriesOfB()
	for i, where := range sessions("b-down", 6, env.listeners) {
		if where != "A" {
			t.Errorf("with B down: session %d went to %s, want A", i, where)
		}
	}
	if after := retriesOfB(); after != before {
		t.Errorf("%d sessions tried B after the health check took it out", after-before)
	}

	// 3. B starts again: two good checks bring it back, and sessions go
	// to both in turn again
	env.procB = startProxySink(t, env.sinkAddrB, env.dirB, "sink-b.localhost")
	up := env.edge.waitLogEntry(t, "saying B is healthy again", func(e map[string]any) bool {
		return logField(e, "msg") == "mail server healthy again" && isB(e) && logField(e, "after") == "active checks"
	})
	if rise, _ := up["rise"].(float64); rise != 2 {
		t.Errorf("B taken back with rise %v, want after the example's 2 good checks", up["rise"])
	}
	where := sessions("b-back-465", 4, env.listeners[:1])
	inTurn("465 with B back", where)
	if !slices.Contains(where, "B") {
		t.Errorf("with B back: sessions on 465 went to %v, want B among them", where)
	}
	where = sessions("b-back-587", 4, env.listeners[1:])
	inTurn("587 and 2525 with B back", where)
	if !slices.Contains(where, "B") {
		t.Errorf("with B back: sessions on 587 and 2525 went to %v, want B among them", where)
	}
}
