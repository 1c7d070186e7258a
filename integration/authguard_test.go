package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/smtp"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The password guard against a real Dovecot that checks the passwords:
// Dovecot's submission service (examples/dovecot-submission) behind two
// edges, implicit TLS and STARTTLS, with the smtp handler's backend and
// PROXY v2, as in TestDovecotSubmissionBehindEdge.

const (
	// The guard's options in this test: the defaults' max_failures, a
	// window that outlasts the test, and a ban and delays far shorter
	// than the defaults (1h, 2s to 15s), so that the test waits out a ban
	// in seconds. The ban must still outlast the steps that need it: two
	// refusals, a login with a message from another address, a config
	// reload and two more refusals, on a busy two-CPU machine.
	guardMaxFailures = 10
	guardBan         = 5 * time.Second
	guardOptions     = `auth_guard {
						max_failures 10
						window 10m
						ban 5s
						delay 100ms 400ms
					}`

	guesserIP = "127.0.0.8"  // ten wrong passwords: banned
	otherIP   = "127.0.0.9"  // logs in while guesserIP is banned
	ownerIP   = "127.0.0.30" // alice, after ten addresses guessed her password
)

// accountGuessers are ten addresses that each try one wrong password for
// alice: ten failures of one account, none of them an address's tenth.
func accountGuessers() []string {
	var ips []string
	for n := 20; n < 30; n++ {
		ips = append(ips, fmt.Sprintf("127.0.0.%d", n))
	}
	return ips
}

// TestAuthGuardDovecot: ten wrong passwords (Dovecot's 535) from one
// address, and the edge turns it away at connect with 421 4.7.0 in
// plaintext, on both listeners, while another address logs in and sends a
// message; the ban outlives a config reload (POST /load) of the caddy; after
// the ban the right password from the guesser's address works. Ten
// addresses with one wrong password each for one account ban nobody and do
// not lock the account out. The access log and the metrics (caddy's admin
// /metrics) count each step.
func TestAuthGuardDovecot(t *testing.T) {
	requireRootMTA(t, map[string]string{"dovecot": "dovecot-core", "/usr/lib/dovecot/submission": "dovecot-submissiond"})
	dir := mtaTempDir(t)
	sink := startMTASink(t)
	dovecot, submissionAddr := startExampleDovecot(t, dir, sink)

	accessLog := filepath.Join(dir, "smtp-access.log")
	var implicit, starttls listener
	var admin string
	proc := startCaddy(t, func() caddySetup {
		implicit = listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
		starttls = listener{name: "submission", mode: startTLS, addr: freeAddr(t)}
		admin = freeAddr(t)
		return caddySetup{
			caddyfile: authGuardCaddyfile(admin, accessLog, implicit, starttls, submissionAddr, 0),
			addrs:     []string{implicit.addr, starttls.addr, admin},
			probe:     implicit,
			hostnames: []string{firstHost},
		}
	})
	cfg := proc.tlsConfig(firstHost)
	listeners := []listener{implicit, starttls}
	m := guardMetrics{admin: admin}
	refused := 0 // connections the test saw turned away

	wrongPassword := func(t *testing.T, l listener, ip, mech string) {
		t.Helper()
		c := dialFrom(t, l, cfg, ip)
		if code, msg := authSteps(t, c.Text, wrongPasswordSteps(mech)); code != 535 {
			t.Fatalf("AUTH %s with a wrong password from %s: %d %s, want Dovecot's 535", mech, ip, code, msg)
		}
		if err := c.Quit(); err != nil {
			t.Errorf("QUIT: %v", err)
		}
	}
	login := func(t *testing.T, l listener, ip string) {
		t.Helper()
		c := dialFrom(t, l, cfg, ip)
		if err := c.Auth(smtp.PlainAuth("", postfixUser, postfixPassword, firstHost)); err != nil {
			t.Fatalf("AUTH PLAIN with the right password from %s: %v", ip, err)
		}
		token := uniqueToken(t)
		if err := deliver(c, postfixUser+"@example.com", []string{"rcpt@example.com"}, testMessage(token, "past the guard")); err != nil {
			t.Fatalf("a message from %s: %v", ip, err)
		}
		sink.wait(t, token)
		if err := c.Quit(); err != nil {
			t.Errorf("QUIT: %v", err)
		}
	}
	var banStart time.Time
	mustRefuse := func(t *testing.T, l listener) {
		t.Helper()
		line, closed, err := firstLine(l, guesserIP)
		if err != nil {
			t.Fatalf("%s from %s: %v", l.name, guesserIP, err)
		}
		if !strings.HasPrefix(line, "421 4.7.0 ") || !closed {
			if since := time.Since(banStart); since >= guardBan {
				t.Fatalf("%s from %s: %q, but the steps since the ban took %s, longer than the ban (%s): the machine is too slow for this test's ban",
					l.name, guesserIP, line, since.Round(time.Millisecond), guardBan)
			}
			t.Fatalf("%s from %s: %q (closed after it: %v), want 421 4.7.0 in plaintext and a close", l.name, guesserIP, line, closed)
		}
		refused++
	}

	t.Run("ten wrong passwords", func(t *testing.T) {
		for i := range guardMaxFailures {
			mech := []string{"PLAIN", "LOGIN"}[i/2%2]
			if i == guardMaxFailures-1 {
				// the ban starts after this: the time since is at
				// least the ban's age
				banStart = time.Now()
			}
			wrongPassword(t, listeners[i%2], guesserIP, mech)
		}
		// Dovecot checked every one of them
		dovecot.log.waitCount(t, dovecotPasswordMismatch(guesserIP), guardMaxFailures)
	})
	if t.Failed() {
		return
	}
	t.Run("refused at connect", func(t *testing.T) {
		for _, l := range []listener{starttls, implicit} {
			mustRefuse(t, l)
		}
		m.want(t, "caddy_layer4_smtp_auth_bans_total", nil, 1)
		m.want(t, "caddy_layer4_smtp_turned_away_total", []string{`reason="auth_banned"`}, float64(refused))
	})
	t.Run("another address logs in", func(t *testing.T) {
		login(t, implicit, otherIP)
	})
	t.Run("the ban outlives a reload", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, "http://"+admin+"/load",
			strings.NewReader(authGuardCaddyfile(admin, accessLog, implicit, starttls, submissionAddr, 1)))
		req.Header.Set("Content-Type", "text/caddyfile")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("reload: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("reload: %s %s", resp.Status, body)
		}
		// the new config serves: its greeting
		if line, _, err := firstLine(starttls, "127.0.0.1"); err != nil || !strings.Contains(line, "generation-1") {
			t.Fatalf("after the reload the STARTTLS listener greets %q (%v), want the new config's greeting", line, err)
		}
		for _, l := range []listener{starttls, implicit} {
			mustRefuse(t, l)
		}
		m.want(t, "caddy_layer4_smtp_auth_bans_total", nil, 1)
	})
	if t.Failed() {
		return
	}
	t.Run("after the ban", func(t *testing.T) {
		// reconnect until the edge greets instead, within a bound
		deadline := banStart.Add(guardBan + ioTimeout)
		for {
			line, _, err := firstLine(starttls, guesserIP)
			if err != nil {
				t.Fatalf("from %s: %v", guesserIP, err)
			}
			if strings.HasPrefix(line, "220 ") {
				break
			}
			if !strings.HasPrefix(line, "421 4.7.0 ") {
				t.Fatalf("from %s: %q, want 421 4.7.0 or, after the ban, 220", guesserIP, line)
			}
			refused++
			if time.Now().After(deadline) {
				t.Fatalf("%s still refused %s after the ban of %s", guesserIP, time.Since(banStart).Round(time.Second), guardBan)
			}
			time.Sleep(200 * time.Millisecond) // polling interval of the ban's end
		}
		login(t, implicit, guesserIP)
	})
	t.Run("an account is never locked", func(t *testing.T) {
		// alice's account has twenty failures in the window now (the
		// guesser's ten and these), twice max_failures
		for i, ip := range accountGuessers() {
			wrongPassword(t, listeners[i%2], ip, "PLAIN")
		}
		dovecot.log.waitCount(t, regexp.MustCompile(`passwd-file\(`+postfixUser+`,127\.0\.0\.(2[0-9])[,)].*Password mismatch`), len(accountGuessers()))
		for _, ip := range accountGuessers() {
			line, _, err := firstLine(starttls, ip)
			if err != nil || !strings.HasPrefix(line, "220 ") {
				t.Errorf("from %s after one wrong password: %q (%v), want the greeting", ip, line, err)
			}
		}
		login(t, starttls, ownerIP)
		m.want(t, "caddy_layer4_smtp_auth_bans_total", nil, 1)
	})

	t.Run("metrics", func(t *testing.T) {
		m.want(t, "caddy_layer4_smtp_auth_bans_total", nil, 1)
		m.want(t, "caddy_layer4_smtp_turned_away_total", []string{`reason="auth_banned"`}, float64(refused))
		m.want(t, "caddy_layer4_smtp_sessions_total", []string{`outcome="auth_banned"`}, float64(refused))
		m.want(t, "caddy_layer4_smtp_auth_total", []string{`result="failure"`}, float64(guardMaxFailures+len(accountGuessers())))
		m.want(t, "caddy_layer4_smtp_auth_total", []string{`result="success"`}, 3)
		// the guesser's entry went with its login after the ban; the ten
		// account guessers keep theirs, alice's account has one
		m.want(t, "caddy_layer4_smtp_auth_guard_entries", []string{`table="addresses"`}, float64(len(accountGuessers())))
		m.want(t, "caddy_layer4_smtp_auth_guard_entries", []string{`table="accounts"`}, 1)
	})

	t.Run("access log", func(t *testing.T) {
		// every session the test made from an address of its own: the
		// guesser's ten, its refusals, its greeting and its login, the
		// other login, two sessions of each account guesser, the owner's
		// login
		total := guardMaxFailures + refused + 2 + 1 + 2*len(accountGuessers()) + 1
		lines := waitAccessLines(t, accessLog, func(l map[string]any) bool { return l["remote_ip"] != "127.0.0.1" }, total)
		if len(lines) != total {
			t.Fatalf("%d access lines from the test's addresses, want %d", len(lines), total)
		}
		byIP := map[string][]map[string]any{}
		for _, l := range lines {
			ip := fmt.Sprint(l["remote_ip"])
			byIP[ip] = append(byIP[ip], l)
		}
		kinds := func(ip string) (failed, banned, loggedIn, other int) {
			for _, l := range byIP[ip] {
				switch {
				case l["outcome"] == "auth_banned":
					if l["tls"] != nil || l["auth_attempts"] != nil {
						t.Errorf("%s: a refused session with TLS or AUTH: %v", ip, l)
					}
					banned++
				case l["auth_attempts"] == 1.0 && l["auth_failures"] == 1.0 && l["user_id"] == nil:
					failed++
				case l["auth_attempts"] == 1.0 && l["auth_failures"] == 0.0 && l["user_id"] == postfixUser && l["messages"] == 1.0:
					loggedIn++
				default:
					other++
				}
			}
			return
		}
		for _, c := range []struct {
			ip                              string
			failed, banned, loggedIn, other int
		}{
			// other: the first greeting after the ban, then QUIT
			{guesserIP, guardMaxFailures, refused, 1, 1},
			{otherIP, 0, 0, 1, 0},
			{ownerIP, 0, 0, 1, 0},
		} {
			f, b, li, o := kinds(c.ip)
			if f != c.failed || b != c.banned || li != c.loggedIn || o != c.other {
				t.Errorf("%s: %d sessions with a failed AUTH, %d refused as auth_banned, %d logged in as %s with a message, %d others; want %d, %d, %d, %d: %v",
					c.ip, f, b, li, postfixUser, o, c.failed, c.banned, c.loggedIn, c.other, byIP[c.ip])
			}
		}
		for _, ip := range accountGuessers() {
			// the second session: the greeting, then a close
			if f, b, li, o := kinds(ip); f != 1 || b != 0 || li != 0 || o != 1 {
				t.Errorf("%s: %d failed, %d refused, %d logged in, %d others; want 1, 0, 0, 1: %v", ip, f, b, li, o, byIP[ip])
			}
		}
	})
}

// authGuardCaddyfile is the test's caddy: an admin endpoint, the access
// lines in their own file, and the two edges into Dovecot with the
// guardOptions; the STARTTLS listener's greeting names the config's
// generation, so that a reload shows.
func authGuardCaddyfile(admin, accessLog string, implicit, starttls listener, backend string, generation int) string {
	return fmt.Sprintf(`{
	admin %s
	skip_install_trust
	log smtp_access {
		output file %s
		format json
		include layer4.handlers.smtp.access
	}
	layer4 {
		%s {
			route {
				smtp %s {
					implicit_tls
					backend %s
					proxy_protocol v2
					%s
				}
			}
		}
		%s {
			route {
				smtp %s {
					greeting "generation-%d"
					backend %s
					proxy_protocol v2
					%s
				}
			}
		}
	}
}
`, admin, accessLog, implicit.addr, firstHost, backend, guardOptions,
		starttls.addr, firstHost, generation, backend, guardOptions)
}

// firstLine connects to l from localIP without TLS and returns the first
// line the edge writes (without its CRLF); for a 421 it also says whether
// the edge then closed the connection. Any other line is answered with
// QUIT.
func firstLine(l listener, localIP string) (line string, closed bool, err error) {
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	conn, err := d.Dial("tcp", l.addr)
	if err != nil {
		return "", false, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	r := bufio.NewReader(conn)
	line, err = r.ReadString('\n')
	if err != nil {
		return line, false, fmt.Errorf("reading the first line: %w (got %q)", err, line)
	}
	line = strings.TrimSuffix(line, "\r\n")
	if strings.HasPrefix(line, "421") {
		rest, err := io.ReadAll(r)
		return line, err == nil && len(rest) == 0, nil
	}
	_, _ = conn.Write([]byte("QUIT\r\n"))
	return line, false, nil
}

// guardMetrics reads caddy's admin /metrics.
type guardMetrics struct{ admin string }

// sum is the sum of the samples of name (its series with every label
// matcher in labels, each a `label="value"` as written in the exposition
// format).
func (m guardMetrics) sum(t *testing.T, name string, labels []string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + m.admin + "/metrics")
	if err != nil {
		t.Fatalf("scraping caddy's metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping caddy's metrics: %s %v", resp.Status, err)
	}
	total := 0.0
sample:
	for _, line := range strings.Split(string(body), "\n") {
		series, value, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		metric, labelText, _ := strings.Cut(series, "{")
		if metric != name {
			continue
		}
		for _, l := range labels {
			if !strings.Contains(","+strings.TrimSuffix(labelText, "}")+",", ","+l+",") {
				continue sample
			}
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("metrics: %q: %v", line, err)
		}
		total += v
	}
	return total
}

// want checks a metric's sum. The counters are updated as a session ends,
// which the client may see just before: a few scrapes within a bound.
func (m guardMetrics) want(t *testing.T, name string, labels []string, want float64) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		got := m.sum(t, name, labels)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s%v = %v, want %v", name, labels, got, want)
			return
		}
		time.Sleep(50 * time.Millisecond) // polling interval of the scrapes
	}
}
