package integration

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// lbProxyOptions are the proxy options of the load-balancing test, the same
// as in examples/load-balancing/proxy.Caddyfile: two upstreams in turn, an
// upstream whose dial fails is left out for 30s, and a failed dial is
// retried on the other upstream (every 100ms, for up to 5s) instead of
// ending the session.
const lbProxyOptions = `lb_policy round_robin
					fail_duration 30s
					max_fails 1
					lb_try_duration 5s
					lb_try_interval 100ms`

// lbEnv is an edge (implicit TLS and STARTTLS) whose proxy has two smtp_sink
// upstreams: A in the edge's own caddy, B in a caddy of its own that the
// test can stop.
type lbEnv struct {
	edge, procB          *caddyProc
	listeners            []listener
	dirA, dirB           string
	sinkAddrA, sinkAddrB string
}

func startLBEnv(t *testing.T, options string) *lbEnv {
	t.Helper()
	dir := t.TempDir()
	env := &lbEnv{dirA: filepath.Join(dir, "sink-a"), dirB: filepath.Join(dir, "sink-b")}

	env.procB = startCaddy(t, func() caddySetup {
		env.sinkAddrB = freeAddr(t)
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
`, env.sinkAddrB, env.dirB),
			// no TLS here: nothing to wait for but the listener (an empty
			// pool stands in for the local CA root this caddy never makes)
			roots: x509.NewCertPool(),
			addrs: []string{env.sinkAddrB},
		}
	})

	env.edge = startCaddy(t, func() caddySetup {
		env.listeners = []listener{
			{name: "submissions", mode: implicitTLS, addr: freeAddr(t)},
			{name: "submission", mode: startTLS, addr: freeAddr(t)},
		}
		env.sinkAddrA = freeAddr(t)
		// the readiness probe's session has a route of its own: through
		// the load-balanced routes, its dial could happen after startCaddy
		// returned and take a turn of round robin, or find B stopped
		probe := listener{name: "probe", mode: implicitTLS, addr: freeAddr(t)}
		proxy := fmt.Sprintf(`proxy {
					upstream %s
					upstream %s
					%s
				}`, env.sinkAddrA, env.sinkAddrB, options)
		return caddySetup{
			caddyfile: fmt.Sprintf(`{
	admin off
	skip_install_trust
	debug
	layer4 {
		%s {
			route {
				smtp %s {
					implicit_tls
				}
				%s
			}
		}
		%s {
			route {
				smtp %s
				%s
			}
		}
		%s {
			route {
				smtp %s {
					implicit_tls
				}
				proxy %s
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
	}
}
`, env.listeners[0].addr, firstHost, proxy, env.listeners[1].addr, firstHost, proxy,
				probe.addr, firstHost, env.sinkAddrA, env.sinkAddrA, env.dirA),
			addrs:     []string{env.listeners[0].addr, env.listeners[1].addr, probe.addr, env.sinkAddrA},
			probe:     probe,
			hostnames: []string{firstHost},
		}
	})
	return env
}

// lbSession is one client session and how it ended.
type lbSession struct {
	token string
	err   error
}

// lbDeliver runs one whole session through l: TLS, one message, QUIT.
func lbDeliver(t *testing.T, env *lbEnv, l listener, what string) lbSession {
	token := uniqueToken(t) + "-" + what
	c, err := smtpClientErr(l, env.edge.tlsConfig(firstHost))
	if err != nil {
		return lbSession{token, err}
	}
	defer c.Close()
	if err := submit(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, what)); err != nil {
		return lbSession{token, err}
	}
	_ = c.Quit()
	return lbSession{token, nil}
}

// lbWhere says in which sink (A, B) the message with token is stored, and
// fails if it is in both or more than once.
func lbWhere(t *testing.T, env *lbEnv, token string) string {
	t.Helper()
	var where []string
	for name, dir := range map[string]string{"A": env.dirA, "B": env.dirB} {
		messages, _ := readSinkDir(t, dir)
		for _, data := range messages {
			if bytes.Contains(data, []byte(token)) {
				where = append(where, name)
			}
		}
	}
	if len(where) != 1 {
		t.Errorf("message %s is stored %d times (sinks %q), want once", token, len(where), where)
		return ""
	}
	return where[0]
}

// TestLoadBalancing: two smtp_sink upstreams of one proxy share the
// sessions in turn; when one stops, sessions that were open on it end with
// a 4xx (never silently), and every new session is delivered through the
// other.
func TestLoadBalancingFailover(t *testing.T) {
	t.Parallel()
	env := startLBEnv(t, lbProxyOptions)

	// 1. round robin: sequential sessions alternate between the upstreams
	const perListener = 8
	for _, l := range env.listeners {
		count := map[string]int{}
		for i := range perListener {
			s := lbDeliver(t, env, l, fmt.Sprintf("spread-%s-%d", l.name, i))
			if s.err != nil {
				t.Fatalf("%s: session %d: %v", l.name, i, s.err)
			}
			count[lbWhere(t, env, s.token)]++
		}
		t.Logf("%s: %d sessions to A, %d to B", l.name, count["A"], count["B"])
		if count["A"] != perListener/2 || count["B"] != perListener/2 {
			t.Errorf("%s: %d sessions to A and %d to B, want them shared in turn", l.name, count["A"], count["B"])
		}
	}

	// 2. sessions in the middle of a transaction (MAIL FROM done), opened
	// one after the other so that round robin puts half of them on B
	type openSession struct {
		l     listener
		token string
		send  func() error
	}
	var open []openSession
	for i := range 4 {
		l := env.listeners[i%2]
		token := fmt.Sprintf("%s-inflight-%d-%d", uniqueToken(t), i, time.Now().UnixNano())
		c := smtpClient(t, l, env.edge.tlsConfig(firstHost))
		if err := authenticate(c); err != nil {
			t.Fatalf("in-flight session %d: %v", i, err)
		}
		if err := c.Mail("sender@example.com"); err != nil {
			t.Fatalf("in-flight session %d: MAIL: %v", i, err)
		}
		open = append(open, openSession{l, token, func() error {
			if err := c.Rcpt("rcpt@example.com"); err != nil {
				return err
			}
			w, err := c.Data()
			if err != nil {
				return err
			}
			if _, err := w.Write(testMessage(token, "in flight")); err != nil {
				return err
			}
			return w.Close()
		}})
	}

	// 3. stop B
	stopped := time.Now()
	env.procB.stop(t)
	if c, err := net.DialTimeout("tcp", env.sinkAddrB, time.Second); err == nil {
		c.Close()
		t.Fatalf("backend B %s still accepts connections after its caddy exited", env.sinkAddrB)
	}
	t.Logf("backend B stopped in %s", time.Since(stopped).Round(time.Millisecond))

	// the open sessions: those on A deliver, those on B end with a 4xx
	var died int
	for i, s := range open {
		err := s.send()
		switch {
		case err == nil:
			if where := lbWhere(t, env, s.token); where != "A" {
				t.Errorf("in-flight session %d got 250 after B stopped, stored in %q", i, where)
			}
		case replyCode(err) >= 400 && replyCode(err) < 500:
			died++
			t.Logf("in-flight session %d (%s): %v", i, s.l.name, err)
		default:
			t.Errorf("in-flight session %d (%s) ended without a 4xx reply: %v", i, s.l.name, err)
		}
	}
	if died == 0 {
		t.Errorf("no in-flight session was on B (round robin should have put half of them there)")
	}

	// 4. every new session is delivered through A: one after the other,
	// then several at once
	for _, l := range env.listeners {
		for i := range 4 {
			start := time.Now()
			s := lbDeliver(t, env, l, fmt.Sprintf("failover-%s-%d", l.name, i))
			if s.err != nil {
				t.Fatalf("%s: session %d after B stopped: %v", l.name, i, s.err)
			}
			if where := lbWhere(t, env, s.token); where != "A" {
				t.Errorf("%s: session %d after B stopped is stored in %q", l.name, i, where)
			}
			t.Logf("%s: session %d after B stopped took %s", l.name, i, time.Since(start).Round(time.Millisecond))
		}
	}
	var wg sync.WaitGroup
	results := make([]lbSession, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = lbDeliver(t, env, env.listeners[i%2], fmt.Sprintf("failover-concurrent-%d", i))
		}()
	}
	wg.Wait()
	for i, s := range results {
		if s.err != nil {
			t.Errorf("concurrent session %d after B stopped: %v", i, s.err)
			continue
		}
		if where := lbWhere(t, env, s.token); where != "A" {
			t.Errorf("concurrent session %d after B stopped is stored in %q", i, where)
		}
	}
}

// TestLoadBalancingNoRetry shows why the example sets lb_try_duration: with
// passive health checks alone, the session whose dial fails is not retried
// on the other upstream, and its client gets 421 (4xx, not a silent close);
// only the sessions after it avoid the dead upstream.
func TestLoadBalancingNoRetry(t *testing.T) {
	t.Parallel()
	env := startLBEnv(t, `lb_policy round_robin
					fail_duration 30s
					max_fails 1`)
	env.procB.stop(t)

	var refused int
	for i := range 4 {
		l := env.listeners[0]
		s := lbDeliver(t, env, l, fmt.Sprintf("noretry-%d", i))
		switch {
		case s.err == nil:
			if where := lbWhere(t, env, s.token); where != "A" {
				t.Errorf("session %d stored in %q", i, where)
			}
		case replyCode(s.err) == 421:
			refused++
			if !strings.Contains(s.err.Error(), "4.4.1") {
				t.Errorf("session %d: %v, want 421 4.4.1", i, s.err)
			}
		default:
			t.Errorf("session %d ended without a 4xx reply: %v", i, s.err)
		}
	}
	if refused != 1 {
		t.Errorf("%d of 4 sessions got 421, want exactly 1 (the dial that found B down; then B is left out)", refused)
	}
}

// TestLoadBalancingExampleAdapts: examples/load-balancing/Caddyfile adapts,
// with the edge's own upstreams (two, round robin, SMTP health checks,
// passive health), and proxy.Caddyfile, caddy-l4's proxy, has two upstreams
// of one dial address each, round robin, and the retry and passive health
// options the test above relies on.
func TestLoadBalancingExampleAdapts(t *testing.T) {
	t.Parallel()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	for file, wants := range map[string][]string{
		"Caddyfile": {
			`"upstreams":[{"dial":["10.0.0.21:10587"]},{"dial":["10.0.0.22:10587"]}]`,
			`"load_balancing":{"policy":"round_robin"}`,
			`"health_checks":{"active":{"fall":2,"interval":10000000000,"rise":2,"timeout":5000000000},"passive":{"fail_duration":30000000000}}`,
			`"proxy_protocol":"v2"`,
		},
		"proxy.Caddyfile": {
			`"upstreams":[{"dial":["10.0.0.21:10587"]},{"dial":["10.0.0.22:10587"]}]`,
			`"selection":{"policy":"round_robin"}`,
			`"try_duration":5000000000`,
			`"try_interval":100000000`,
			`"fail_duration":30000000000`,
			`"max_fails":1`,
			`"proxy_protocol":"v2"`,
		},
	} {
		example := filepath.Join(root, "examples", "load-balancing", file)
		dir := t.TempDir()
		cmd := exec.Command(caddyBinary, "adapt", "--config", example, "--adapter", "caddyfile")
		cmd.Dir = dir
		cmd.Env = append(environWithout("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"),
			"HOME="+dir, "XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("caddy adapt %s: %v\n%s", example, err, out)
		}
		adapted := string(out)
		for _, want := range wants {
			if !strings.Contains(adapted, want) {
				t.Errorf("the adapted %s lacks %s:\n%s", file, want, adapted)
			}
		}
	}
}
