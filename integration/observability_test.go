package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/smtp"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestObservability runs one caddy at Caddy's default log level, with the
// access log options of examples/fail2ban/Caddyfile, in front of the
// AUTH-requiring backend, and makes known sessions from known loopback
// addresses: good ones, wrong passwords, an injection, and the failures a
// new user meets (implicit TLS on the STARTTLS port, STARTTLS on the
// implicit one, TLS 1.1 only, a name the certificate does not cover, no TLS
// at all), and one with its backend down. Then it checks each session's
// access line; that the real fail2ban-regex with examples/fail2ban's filter
// matches the guessers and the injector and nobody else; the counts in a
// real Prometheus that scrapes caddy's admin endpoint; and that every
// metric examples/grafana's dashboard queries is in the scrape.
func TestObservability(t *testing.T) {
	t.Parallel()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	accessLog := filepath.Join(dir, "smtp-access.log")
	logOptions, err := os.ReadFile(filepath.Join(root, "examples", "fail2ban", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	backend := startAuthBackend(t)
	var implicit, starttls, down, probe listener
	var admin, caddyfile string
	proc := startCaddy(t, func() caddySetup {
		implicit = listener{name: "submissions", mode: implicitTLS, addr: freeAddr(t)}
		starttls = listener{name: "submission", mode: startTLS, addr: freeAddr(t)}
		down = listener{name: "backend down", mode: implicitTLS, addr: freeAddr(t)}
		probe = listener{name: "probe", mode: implicitTLS, addr: freeAddr(t)}
		admin = freeAddr(t)
		dead := freeAddr(t) // nothing listens here
		caddyfile = observabilityCaddyfile(t, string(logOptions), accessLog, admin, map[listener]string{
			implicit: backend.addr, starttls: backend.addr, down: dead, probe: backend.addr,
		})
		return caddySetup{
			caddyfile: caddyfile,
			addrs:     []string{implicit.addr, starttls.addr, down.addr, probe.addr, admin},
			probe:     probe,
			hostnames: []string{firstHost},
		}
	})

	// the sessions, each kind from an address of its own
	good := func(l listener, ip string) {
		c, err := smtpClientFrom(l, proc.tlsConfig(firstHost), ip)
		if err != nil {
			t.Fatalf("%s from %s: %v", l.name, ip, err)
		}
		defer c.Close()
		if err := c.Auth(smtp.PlainAuth("", backendUser, backendPassword, firstHost)); err != nil {
			t.Fatalf("AUTH from %s: %v", ip, err)
		}
		if err := deliver(c, "sender@example.com", []string{"rcpt@example.com"}, testMessage(uniqueToken(t), "observed")); err != nil {
			t.Fatalf("delivery from %s: %v", ip, err)
		}
		if err := c.Quit(); err != nil {
			t.Errorf("QUIT from %s: %v", ip, err)
		}
	}
	guess := func(ip string) {
		c, err := smtpClientFrom(starttls, proc.tlsConfig(firstHost), ip)
		if err != nil {
			t.Fatalf("from %s: %v", ip, err)
		}
		defer c.Close()
		if err := c.Auth(smtp.PlainAuth("", backendUser, "guess", firstHost)); replyCode(err) != 535 {
			t.Errorf("a wrong password from %s: %v, want 535", ip, err)
		}
		c.Quit()
	}
	const (
		goodImplicit   = "127.0.0.21"
		goodSTARTTLS   = "127.0.0.22"
		guesser        = "127.0.0.23"
		injector       = "127.0.0.24"
		tlsOnSTARTTLS  = "127.0.0.25"
		startOnImplict = "127.0.0.26"
		oldTLS         = "127.0.0.27"
		wrongName      = "127.0.0.28"
		noTLS          = "127.0.0.29"
		backendDown    = "127.0.0.30"
	)
	good(implicit, goodImplicit)
	good(starttls, goodSTARTTLS)
	for range 3 {
		guess(guesser)
	}
	plain := func(l listener, ip string, script func(conn net.Conn, r *bufio.Reader)) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
		conn, err := d.Dial("tcp", l.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(ioTimeout))
		script(conn, bufio.NewReader(conn))
	}
	plain(starttls, injector, func(conn net.Conn, r *bufio.Reader) {
		r.ReadString('\n')
		io.WriteString(conn, "STARTTLS\r\nMAIL FROM:<x@example.com>\r\n")
		io.Copy(io.Discard, r)
	})
	plain(starttls, tlsOnSTARTTLS, func(conn net.Conn, r *bufio.Reader) {
		if tls.Client(conn, proc.tlsConfig(firstHost)).Handshake() == nil {
			t.Error("implicit TLS on the STARTTLS port succeeded")
		}
	})
	if c, err := smtpClientFrom(listener{mode: startTLS, addr: implicit.addr}, proc.tlsConfig(firstHost), startOnImplict); err != nil {
		t.Errorf("STARTTLS on the implicit port: %v", err)
	} else {
		c.Quit()
	}
	plain(implicit, oldTLS, func(conn net.Conn, r *bufio.Reader) {
		cfg := proc.tlsConfig(firstHost)
		cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS11, tls.VersionTLS11
		if tls.Client(conn, cfg).Handshake() == nil {
			t.Error("a TLS 1.1 handshake succeeded")
		}
	})
	plain(implicit, wrongName, func(conn net.Conn, r *bufio.Reader) {
		if tls.Client(conn, proc.tlsConfig("smtp.example.com")).Handshake() == nil {
			t.Error("a handshake for a name the certificate does not cover succeeded")
		}
	})
	plain(starttls, noTLS, func(conn net.Conn, r *bufio.Reader) {
		r.ReadString('\n')
		io.WriteString(conn, "MAIL FROM:<x@example.com>\r\n")
		r.ReadString('\n')
		io.WriteString(conn, "QUIT\r\n")
		io.Copy(io.Discard, r)
	})
	plain(down, backendDown, func(conn net.Conn, r *bufio.Reader) {
		tlsConn := tls.Client(conn, proc.tlsConfig(firstHost))
		if err := tlsConn.Handshake(); err != nil {
			t.Errorf("TLS to the listener whose backend is down: %v", err)
			return
		}
		io.Copy(io.Discard, tlsConn)
	})

	t.Run("access lines", func(t *testing.T) {
		ours := func(l map[string]any) bool {
			return strings.HasPrefix(fmt.Sprint(l["client_ip"]), "127.0.0.") && l["client_ip"] != "127.0.0.1"
		}
		lines := waitAccessLines(t, accessLog, ours, 12)
		byIP := make(map[string][]map[string]any)
		for _, l := range lines {
			ip, _ := l["client_ip"].(string)
			byIP[ip] = append(byIP[ip], l)
		}
		expect := []struct {
			ip, listener, mode, outcome, detail string
			sessions                            int
			check                               func(map[string]any) string
		}{
			{goodImplicit, implicit.addr, "implicit", "quit", "", 1, authenticated},
			{goodSTARTTLS, starttls.addr, "starttls", "quit", "", 1, authenticated},
			{guesser, starttls.addr, "starttls", "quit", "", 3, func(l map[string]any) string {
				if l["auth_failures"] != 1.0 || l["user_id"] != nil {
					return "want one failed AUTH and no user"
				}
				return ""
			}},
			{injector, starttls.addr, "starttls", "injection_refused", "pipelined", 1, nil},
			{tlsOnSTARTTLS, starttls.addr, "starttls", "unexpected_tls", "", 1, nil},
			{startOnImplict, implicit.addr, "starttls", "quit", "", 1, withTLS},
			{oldTLS, implicit.addr, "implicit", "tls_version_refused", "TLS 1.1", 1, nil},
			{wrongName, implicit.addr, "implicit", "handshake_failed", "client_alert", 1, nil},
			{noTLS, starttls.addr, "starttls", "quit", "", 1, func(l map[string]any) string {
				if l["tls"] != nil {
					return "want no tls"
				}
				return ""
			}},
			{backendDown, down.addr, "implicit", "backend_unreachable", "", 1, withTLS},
		}
		for _, e := range expect {
			got := byIP[e.ip]
			if len(got) != e.sessions {
				t.Errorf("%s: %d access lines, want %d: %v", e.ip, len(got), e.sessions, got)
				continue
			}
			for _, l := range got {
				detail, _ := l["detail"].(string)
				if l["listener"] != e.listener || l["mode"] != e.mode || l["outcome"] != e.outcome || !strings.Contains(detail, e.detail) {
					t.Errorf("%s: %v, want listener %s, mode %s, outcome %s, detail with %q", e.ip, l, e.listener, e.mode, e.outcome, e.detail)
				}
				if e.check != nil {
					if problem := e.check(l); problem != "" {
						t.Errorf("%s: %v: %s", e.ip, l, problem)
					}
				}
			}
		}
		// a client's failure is its access line, not a warning; the
		// backend that is down is the operator's to fix (and so is the
		// certificate the readiness probe, from 127.0.0.1, met before it
		// was issued)
		for _, e := range proc.logEntries(t) {
			logger, _ := e["logger"].(string)
			if (e["level"] == "warn" || e["level"] == "error") && strings.HasPrefix(logger, "layer4.handlers.smtp") &&
				e["msg"] != "mail server unavailable" && e["remote_ip"] != "127.0.0.1" {
				t.Errorf("a warning in caddy's log: %v", e)
			}
		}
		// what each handler serves, when the config starts
		var serving []string
		for _, e := range proc.logEntries(t) {
			if e["msg"] == "serving SMTP" && e["level"] == "info" {
				listen, _ := e["listen"].([]any)
				for _, a := range listen {
					serving = append(serving, fmt.Sprint(a))
				}
			}
		}
		for _, l := range []listener{implicit, starttls, down, probe} {
			if !slices.Contains(serving, l.addr) {
				t.Errorf("no 'serving SMTP' line names %s (lines name %q)", l.addr, serving)
			}
		}
	})

	t.Run("fail2ban", func(t *testing.T) {
		regex := requireTool(t, "fail2ban-regex", "fail2ban")
		filter := filepath.Join(root, "examples", "fail2ban", "filter.d", "caddy-smtp.conf")
		out, err := runTool(t, nil, regex, "-o", "ip", accessLog, filter)
		if err != nil {
			t.Fatalf("fail2ban-regex: %v", err)
		}
		matched := make(map[string]int)
		for _, line := range scanLines(out) {
			if ip := strings.TrimSpace(line); net.ParseIP(ip) != nil {
				matched[ip]++
			}
		}
		want := map[string]int{guesser: 3, injector: 1}
		if fmt.Sprint(matched) != fmt.Sprint(want) {
			t.Errorf("fail2ban-regex matched %v, want %v", matched, want)
		}
	})

	prom := startPrometheus(t, admin)
	t.Run("Prometheus", func(t *testing.T) {
		for query, want := range map[string]float64{
			fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="quit"})`, implicit.addr):                    2,
			fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="quit",mode="starttls"})`, implicit.addr):    1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="quit"})`, starttls.addr):                    5,
			fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="tls_version_refused"})`, implicit.addr):     1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="handshake_failed"})`, implicit.addr):        1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="backend_unreachable"})`, down.addr):         1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_auth_total{listener=%q,result="success"})`, starttls.addr):                      1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_auth_total{listener=%q,result="failure"})`, starttls.addr):                      3,
			fmt.Sprintf(`sum(caddy_layer4_smtp_messages_total{listener=~%q})`, implicit.addr+"|"+starttls.addr):                2,
			fmt.Sprintf(`sum(caddy_layer4_smtp_recipients_total{listener=~%q})`, implicit.addr+"|"+starttls.addr):              2,
			fmt.Sprintf(`sum(caddy_layer4_smtp_tls_handshakes_total{listener=%q,result="failed"})`, implicit.addr):             2,
			fmt.Sprintf(`sum(caddy_layer4_smtp_turned_away_total{listener=%q,reason="injection_refused"})`, starttls.addr):     1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_active_sessions{listener=~%q})`, implicit.addr+"|"+starttls.addr+"|"+down.addr): 0,
			`sum(caddy_layer4_smtp_backend_dial_failures_total) > bool 0`:                                                      1,
			// the readiness poll's connections are sessions too
			fmt.Sprintf(`sum(caddy_layer4_smtp_session_duration_seconds_count{listener=%q}) > bool 6`, starttls.addr):    1,
			fmt.Sprintf(`sum(caddy_layer4_smtp_bytes_total{listener=%q,direction="to_client"}) > bool 0`, implicit.addr): 1,
		} {
			if got := prom.waitValue(t, query, want); got != want {
				t.Errorf("%s = %v, want %v", query, got, want)
			}
		}
	})

	t.Run("reload keeps the counts", func(t *testing.T) {
		quits := fmt.Sprintf(`sum(caddy_layer4_smtp_sessions_total{listener=%q,outcome="quit"})`, implicit.addr)
		before, _ := prom.query(t, quits)
		req, _ := http.NewRequest(http.MethodPost, "http://"+admin+"/load", strings.NewReader(caddyfile))
		req.Header.Set("Content-Type", "text/caddyfile")
		req.Header.Set("Cache-Control", "must-revalidate") // reload the same config
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("reload: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("reload: %s", resp.Status)
		}
		// the new config has said what it serves
		servingLines := func() int {
			n := 0
			for _, e := range proc.logEntries(t) {
				if e["msg"] == "serving SMTP" && strings.Contains(fmt.Sprint(e["listen"]), implicit.addr) {
					n++
				}
			}
			return n
		}
		if n := servingLines(); n != 2 {
			t.Fatalf("%d 'serving SMTP' lines for %s, want 2: the config did not reload", n, implicit.addr)
		}
		good(implicit, goodImplicit)
		if got := prom.waitValue(t, quits, before+1); got != before+1 {
			t.Errorf("after a reload and one more session: %v, want %v (the count must not start afresh)", got, before+1)
		}
	})

	t.Run("Grafana dashboard", func(t *testing.T) {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		scrape, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		dashboard, err := os.ReadFile(filepath.Join(root, "examples", "grafana", "smtp-edge.json"))
		if err != nil {
			t.Fatal(err)
		}
		exprs := dashboardQueries(t, dashboard)
		if len(exprs) == 0 {
			t.Fatal("the dashboard has no queries")
		}
		name := regexp.MustCompile(`caddy_layer4_smtp_[a-z_]+`)
		for _, expr := range exprs {
			names := name.FindAllString(expr, -1)
			if len(names) == 0 {
				t.Errorf("query %q names no caddy_layer4_smtp metric", expr)
			}
			for _, n := range names {
				if !bytes.Contains(scrape, []byte("\n"+n+"{")) && !bytes.Contains(scrape, []byte("\n"+n+" ")) {
					t.Errorf("query %q: %s is not in caddy's /metrics", expr, n)
				}
			}
			// and Prometheus takes it, with the dashboard's variables filled in
			prom.query(t, strings.NewReplacer("$listener", ".*", "$__rate_interval", "1m").Replace(expr))
		}
	})
}

func authenticated(l map[string]any) string {
	if l["user_id"] != backendUser || l["messages"] != 1.0 || l["recipients"] != 1.0 || l["tls"] == nil {
		return "want user " + backendUser + ", one message to one recipient, over TLS"
	}
	return ""
}

func withTLS(l map[string]any) string {
	if l["tls"] == nil {
		return "want tls"
	}
	return ""
}

// observabilityCaddyfile is a caddy with an admin endpoint, the global log
// options of examples/fail2ban/Caddyfile writing to accessLog, and an smtp
// handler per listener, into the backend given for it.
func observabilityCaddyfile(t *testing.T, logOptions, accessLog, admin string, edges map[listener]string) string {
	t.Helper()
	inner := strings.TrimSpace(logOptions)
	if i := strings.Index(inner, "{"); i >= 0 {
		inner = inner[i+1:]
	}
	inner = strings.TrimSuffix(strings.TrimSpace(inner), "}")
	if !strings.Contains(inner, "/var/log/caddy/smtp-access.log") {
		t.Fatal("examples/fail2ban/Caddyfile no longer writes /var/log/caddy/smtp-access.log")
	}
	inner = strings.ReplaceAll(inner, "/var/log/caddy/smtp-access.log", accessLog)
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin %s\n\tskip_install_trust\n%s\n\tlayer4 {\n", admin, inner)
	for l, backend := range edges {
		option := ""
		if l.mode == implicitTLS {
			option = "implicit_tls\n\t\t\t\t\t"
		}
		fmt.Fprintf(&b, "\t\t%s {\n\t\t\troute {\n\t\t\t\tsmtp %s {\n\t\t\t\t\t%sbackend %s\n\t\t\t\t}\n\t\t\t}\n\t\t}\n",
			l.addr, firstHost, option, backend)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// waitAccessLines polls the access log file, within ioTimeout, until it
// holds at least n lines that match (the last sessions' lines are written
// as they close), and returns those.
func waitAccessLines(t *testing.T, path string, match func(map[string]any) bool, n int) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		data, _ := os.ReadFile(path)
		var lines []map[string]any
		for _, raw := range bytes.Split(data, []byte("\n")) {
			var l map[string]any
			if json.Unmarshal(raw, &l) == nil && l["logger"] == "layer4.handlers.smtp.access" && match(l) {
				lines = append(lines, l)
			}
		}
		if len(lines) >= n || time.Now().After(deadline) {
			return lines
		}
		time.Sleep(50 * time.Millisecond) // polling interval of a file another process writes
	}
}

// dashboardQueries are the expr fields of a Grafana dashboard's panels.
func dashboardQueries(t *testing.T, dashboard []byte) []string {
	t.Helper()
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(dashboard, &d); err != nil {
		t.Fatalf("the dashboard is not JSON: %v", err)
	}
	var exprs []string
	for _, p := range d.Panels {
		for _, target := range p.Targets {
			exprs = append(exprs, target.Expr)
		}
	}
	return exprs
}

// prometheus is a Prometheus server that the test started.
type prometheus struct{ addr string }

// startPrometheus starts Debian's prometheus, scraping caddy's admin
// endpoint at admin every second, with its data in a temporary directory,
// and waits until it is ready.
func startPrometheus(t *testing.T, admin string) *prometheus {
	t.Helper()
	bin := requireTool(t, "prometheus", "prometheus")
	dir := t.TempDir()
	config := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
scrape_configs:
  - job_name: caddy
    static_configs:
      - targets: [%q]
`, admin)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &prometheus{addr: freeAddr(t)}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "--config.file="+config, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+p.addr, "--log.level=warn")
	logFile, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting prometheus: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		logFile.Close()
		if t.Failed() {
			out, _ := os.ReadFile(logFile.Name())
			t.Logf("prometheus output:\n%s", out)
		}
	})
	deadline := time.Now().Add(startupTimeout)
	for {
		resp, err := http.Get("http://" + p.addr + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready after %s: %v", startupTimeout, err)
		}
		time.Sleep(100 * time.Millisecond) // polling interval of a readiness check
	}
}

// query runs an instant query and returns its single value, or false when it
// has no result.
func (p *prometheus) query(t *testing.T, query string) (float64, bool) {
	t.Helper()
	resp, err := http.Get("http://" + p.addr + "/api/v1/query?query=" + url.QueryEscape(query))
	if err != nil {
		t.Fatalf("querying prometheus: %v", err)
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("prometheus's answer to %s: %v", query, err)
	}
	if r.Status != "success" {
		t.Fatalf("prometheus refused %s: %s", query, r.Error)
	}
	if len(r.Data.Result) != 1 {
		return 0, false
	}
	s, _ := r.Data.Result[0].Value[1].(string)
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		t.Fatalf("prometheus's value for %s: %q", query, s)
	}
	return v, true
}

// waitValue polls the query, within ioTimeout, until it yields want (the
// scrapes come every second), and returns its last value.
func (p *prometheus) waitValue(t *testing.T, query string, want float64) float64 {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		got, ok := p.query(t, query)
		if ok && got == want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(200 * time.Millisecond) // polling interval of the scrapes
	}
}
