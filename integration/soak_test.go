package integration

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/smtp"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// soakEnv sets the soak test going; .ci/run sets it. The test takes minutes
// and thousands of connections, so the README's test command skips it.
const soakEnv = "SMTP_EDGE_SOAK"

// defaultShutdownTimeout is the smtp handler's default `timeouts shutdown`.
const defaultShutdownTimeout = 30 * time.Second

// TestSoak holds thousands of idle sessions after TLS, then runs sustained
// load for a while with config reloads and a backend restart in the middle,
// and ends it by stopping the edge with SIGTERM. It checks the accounting:
// every message that got 250 was stored exactly once, a message stored
// without a 250 is one whose client was told of a failure (it retries), and
// the shutdown ended every session with 421 4.3.2 or refused it. It prints
// its figures.
//
//	SMTP_EDGE_SOAK=1 go test -run TestSoak -v ./integration/
//
// SMTP_EDGE_SOAK_SESSIONS (default 5000) and SMTP_EDGE_SOAK_SECONDS (default
// 90) change its size.
func TestSoak(t *testing.T) {
	if os.Getenv(soakEnv) != "1" {
		t.Skipf("the soak test runs with %s=1 (it takes minutes)", soakEnv)
	}
	t.Parallel()
	sessions := envInt(t, "SMTP_EDGE_SOAK_SESSIONS", 5000)
	duration := time.Duration(envInt(t, "SMTP_EDGE_SOAK_SECONDS", 90)) * time.Second

	dir := t.TempDir()
	sinkDir := filepath.Join(dir, "mail")
	if err := os.MkdirAll(sinkDir, 0o700); err != nil {
		t.Fatal(err)
	}
	sinkAddr := freeAddr(t)
	startBackend := func() *caddyProc {
		return startCaddy(t, func() caddySetup {
			return caddySetup{
				config: caddyConfig{Sinks: []sinkConfig{{Addr: sinkAddr, Dir: sinkDir, MaxMessageSize: 1 << 20}}},
				addrs:  []string{sinkAddr},
				roots:  x509.NewCertPool(), // no TLS here, so no local CA to wait for
			}
		})
	}
	backend := startBackend()

	implicit := listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
	starttls := listener{name: "submission", mode: startTLS, addr: freeAddr(t)}
	admin := freeAddr(t)
	edgeConfig := func(generation int) string {
		return fmt.Sprintf(`{
	admin %s
	skip_install_trust
	layer4 {
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
				smtp %s {
					greeting "ESMTP generation-%d"
					backend %s
				}
			}
		}
	}
}
`, admin, implicit.addr, firstHost, sinkAddr, starttls.addr, firstHost, generation, sinkAddr)
	}
	edge := startCaddy(t, func() caddySetup {
		return caddySetup{
			caddyfile: edgeConfig(0),
			addrs:     []string{implicit.addr, starttls.addr},
			probe:     implicit,
			hostnames: []string{firstHost},
		}
	})
	cfg := edge.tlsConfig(firstHost)

	// Phase 1: hold idle sessions after TLS, then all of them answer NOOP.
	start := time.Now()
	held := make([]*smtp.Client, 0, sessions)
	var holdErrors int
	for i := range sessions {
		l := implicit
		if i%2 == 1 {
			l = starttls
		}
		c, err := smtpClientErr(l, cfg)
		if err != nil {
			holdErrors++
			if holdErrors <= 5 {
				t.Errorf("idle session %d: %v", i, err)
			}
			continue
		}
		held = append(held, c)
	}
	opened := time.Since(start)
	var noopOK atomic.Int64
	var wg sync.WaitGroup
	for chunk := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := chunk; i < len(held); i += 16 {
				if held[i].Noop() == nil {
					noopOK.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	for _, c := range held {
		c.Close()
	}
	fmt.Printf("soak: %d idle sessions after TLS opened in %s (%d failed); %d of them answered NOOP\n",
		len(held), opened.Round(time.Millisecond), holdErrors, noopOK.Load())
	if int(noopOK.Load()) != sessions {
		t.Errorf("%d of %d idle sessions answered NOOP", noopOK.Load(), sessions)
	}

	// Phase 2: sustained sessions with messages; reloads and a backend
	// restart while they run.
	var (
		mu       sync.Mutex
		accepted = make(map[string]bool)
		failed   = make(map[string]bool) // messages whose client got no 250
		// messages whose client got no 250 during the shutdown: none may be stored
		failedInShutdown = make(map[string]bool)
		outcomes         = make(map[string]int) // by kind, for the figures
	)
	// failures are expected only while the backend restarts (and just
	// after, while the sessions it cut report it); any other failure, such
	// as a session cut by a reload, is counted apart and fails the test
	//
	// The one exception: Caddy opens each config's listener beside the old
	// one with SO_REUSEPORT, and connections still waiting in the old one's
	// accept queue when a reload closes it are reset by the kernel. That is
	// a new connection refused (the client retries), not a session cut, so
	// a reset of a new session around a reload is counted on its own line.
	//
	// During the shutdown at the end, sessions must get 421 4.3.2 (between
	// transactions) and new connections must be refused (or, queued at the
	// listener's close, reset, as at a reload).
	var restarting, reloading, shuttingDown atomic.Bool
	var failuresElsewhere atomic.Int64
	failure := func(kind string, newSession bool, err error) string {
		switch {
		case restarting.Load():
			return kind
		case newSession && reloading.Load() && listenerReset(err):
			return kind + " (a new connection, at a reload's listener swap)"
		case shuttingDown.Load() && replyCode(err) == 421 && strings.Contains(err.Error(), "4.3.2"):
			return kind + " 4.3.2 (shutdown)"
		case shuttingDown.Load() && newSession && errors.Is(err, syscall.ECONNREFUSED):
			return kind + " (shutdown)"
		case shuttingDown.Load() && newSession && listenerReset(err):
			return kind + " (a new connection, at the shutdown's listener close)"
		}
		failuresElsewhere.Add(1)
		return kind + " (not during the backend restart or the shutdown)"
	}
	count := func(kind string) {
		mu.Lock()
		outcomes[kind]++
		mu.Unlock()
	}
	stop := make(chan struct{})
	var workers sync.WaitGroup
	var seq atomic.Int64
	for w := range 16 {
		workers.Add(1)
		go func() {
			defer workers.Done()
			l := implicit
			if w%2 == 1 {
				l = starttls
			}
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := smtpClientErr(l, cfg)
				if err != nil {
					count(failure("session refused or failed before MAIL: "+classify(err), true, err))
					if shuttingDown.Load() && errors.Is(err, syscall.ECONNREFUSED) {
						return
					}
					continue
				}
				if err := authenticate(c); err != nil {
					count(failure("session failed at AUTH: "+classify(err), false, err))
					c.Close()
					continue
				}
				for range 3 {
					token := fmt.Sprintf("soak-%d", seq.Add(1))
					err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(token, "soak"))
					if err != nil {
						mu.Lock()
						failed[token] = true
						failedInShutdown[token] = shuttingDown.Load()
						outcomes[failure("message not accepted: "+classify(err), false, err)]++
						mu.Unlock()
						break
					}
					mu.Lock()
					accepted[token] = true
					outcomes["message accepted (250)"]++
					mu.Unlock()
				}
				c.Close()
			}
		}()
	}

	reload := func(generation int) {
		reloading.Store(true)
		defer func() {
			time.Sleep(time.Second) // connections reset at the swap report it within this
			reloading.Store(false)
		}()
		req, _ := http.NewRequest(http.MethodPost, "http://"+admin+"/load", strings.NewReader(edgeConfig(generation)))
		req.Header.Set("Content-Type", "text/caddyfile")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Errorf("reload %d: %v", generation, err)
			return
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("reload %d: %s", generation, resp.Status)
			return
		}
		// a new session gets the new config
		greeting := greetingOf(t, starttls)
		if !strings.Contains(greeting, fmt.Sprintf("generation-%d", generation)) {
			t.Errorf("after reload %d a new session was greeted %q", generation, greeting)
		}
	}
	step := duration / 5
	time.Sleep(step) // the load's pace: these are the points in it where things happen
	reload(1)
	time.Sleep(step)
	reload(2)
	time.Sleep(step)
	restarting.Store(true)
	backend.stop(t)
	startBackend()          // stopped at cleanup
	time.Sleep(time.Second) // sessions cut by the restart report it within this
	restarting.Store(false)
	time.Sleep(step - time.Second)
	reload(3)
	time.Sleep(step)

	// Phase 3: SIGTERM to the edge under load.
	shuttingDown.Store(true)
	if err := edge.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	shutdownStart := time.Now()
	select {
	case <-edge.exited:
		fmt.Printf("soak: the edge exited %s after SIGTERM\n", time.Since(shutdownStart).Round(time.Millisecond))
	case <-time.After(defaultShutdownTimeout + stopTimeout):
		t.Errorf("the edge did not exit within %s of SIGTERM", defaultShutdownTimeout+stopTimeout)
	}
	close(stop)
	workers.Wait()

	stored, others := readSinkDir(t, sinkDir)
	storedTokens := make(map[string]int)
	for _, content := range stored {
		for _, line := range strings.Split(string(content), "\r\n") {
			if token, ok := strings.CutPrefix(line, "Subject: "); ok {
				storedTokens[token]++
			}
		}
	}
	// A message stored without its 250 is allowed only where the client was
	// told of a failure for that very message (the backend restart hit it
	// between storing and replying): the client retries it, which is SMTP's
	// duplicate window (RFC 5321 section 6.1), not a loss.
	var lost, duplicated, unconfirmed, unexplained, halfAccepted int
	for token := range accepted {
		switch storedTokens[token] {
		case 0:
			lost++
		case 1:
		default:
			duplicated++
		}
	}
	for token := range storedTokens {
		if !accepted[token] {
			unconfirmed++
			if !failed[token] {
				unexplained++
			}
			if failedInShutdown[token] {
				halfAccepted++
			}
		}
	}

	kinds := make([]string, 0, len(outcomes))
	for kind := range outcomes {
		kinds = append(kinds, kind)
	}
	sort.Strings(kinds)
	var b bytes.Buffer
	fmt.Fprintf(&b, "soak: %s of sustained load, 16 clients, 3 reloads, a backend restart, and SIGTERM at the end:\n", duration)
	for _, kind := range kinds {
		fmt.Fprintf(&b, "soak:   %-60s %d\n", kind, outcomes[kind])
	}
	fmt.Fprintf(&b, "soak:   250 replies %d, .eml files %d, lost %d, duplicated %d, other files %d\n",
		len(accepted), len(stored), lost, duplicated, len(others))
	fmt.Fprintf(&b, "soak:   stored although the client got an error for it (it retries) %d, of them in the shutdown %d, stored with no reply at all %d\n",
		unconfirmed-unexplained, halfAccepted, unexplained)
	fmt.Print(b.String())

	if lost > 0 || duplicated > 0 {
		t.Errorf("%d messages that got 250 are not stored, %d are stored more than once", lost, duplicated)
	}
	if unexplained > 0 {
		t.Errorf("%d messages were stored without their client getting a 250 or an error", unexplained)
	}
	if halfAccepted > 0 {
		t.Errorf("%d messages were stored although their client got an error during the shutdown", halfAccepted)
	}
	if len(others) > 0 {
		t.Errorf("files other than messages in the sink: %v", others)
	}
	if n := failuresElsewhere.Load(); n > 0 {
		t.Errorf("%d sessions or messages failed outside the backend restart and the shutdown, or failed in the shutdown without 421 4.3.2", n)
	}
	if len(accepted) == 0 {
		t.Error("no message was accepted")
	}
}

// listenerReset reports whether err is the kernel's reset of a connection
// still queued at a listener that was closed: ECONNRESET on a read, or EPIPE
// on a write that came after the reset.
func listenerReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// classify names the kind of a failure: the SMTP reply code, or the
// network error.
func classify(err error) string {
	if code := replyCode(err); code != 0 {
		return strconv.Itoa(code)
	}
	var text string
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		text = "timeout"
	default:
		text = err.Error()
		if i := strings.LastIndex(text, ": "); i >= 0 {
			text = text[i+2:]
		}
	}
	return text
}

// greetingOf returns the greeting line of a new session on l.
func greetingOf(t *testing.T, l listener) string {
	t.Helper()
	line, err := (&unbufferedLineReader{r: dialRaw(t, l.addr)}).readLine()
	if err != nil {
		t.Fatalf("greeting: %v", err)
	}
	return line
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a whole number of at least 1", name, v)
	}
	return n
}
