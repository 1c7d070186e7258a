package integration

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/smtp"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	gosmtp "github.com/emersion/go-smtp"
	"github.com/pires/go-proxyproto"
)

// A cluster of edges (examples/cluster/): two caddy processes with the
// example's Caddyfile on one shared file_system storage, Pebble as their CA,
// the TLS app's distributed session ticket keys, and a real HAProxy with the
// example's haproxy.cfg in front of them (mode tcp, send-proxy-v2,
// roundrobin, smtpchk). Both edges relay to one backend in this process that
// reads the edges' PROXY v2 header and records, per message, the client
// address in it.
//
// The example's addresses map onto loopback: HAProxy (10.0.0.10) is
// 127.0.0.1, the edges (10.0.0.21, 10.0.0.22) listen on 127.0.0.21 and
// 127.0.0.22 with the same ports (as two machines would), the backend
// (10.0.0.30:10587) is the test's.

const (
	clusterHost = "mail.example.com" // the example's name; Pebble issues for it

	// the lifetime of Pebble's certificates: with renewal_window_ratio 0.5
	// an edge renews after half of it, late enough that the steps before
	// the renewal see the first certificate, early enough to keep the test
	// short
	clusterValidity = 48 * time.Second

	// what the edges and the backend accept for AUTH PLAIN
	clusterUser, clusterPassword = "alice", "secret"
)

// clusterEdge is one caddy of the cluster.
type clusterEdge struct {
	name                    string // edge1, edge2: HAProxy's server names
	ip                      string
	proc                    *caddyProc
	submission, submissions listener
}

// TestCluster: see the comment at the top of this file; each step is a
// subtest and says what it proves.
func TestCluster(t *testing.T) {
	t.Parallel()
	haproxyBin := requireTool(t, "haproxy", "haproxy")
	pebble := startPebble(t, pebbleOptions{validity: clusterValidity})
	backend := startClusterBackend(t)
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared-storage")

	// one pair of ports for both edges, as on two machines
	_, p587, _ := net.SplitHostPort(freeAddr(t))
	_, p465, _ := net.SplitHostPort(freeAddr(t))

	// Both edges start at once, so that both ask for the certificate while
	// it is not in the storage yet: one obtains it under the storage's
	// lock, the other waits for the lock and then loads it.
	edges := []*clusterEdge{
		{name: "edge1", ip: "127.0.0.21"},
		{name: "edge2", ip: "127.0.0.22"},
	}
	for _, e := range edges {
		e.submission = listener{name: e.name + " submission", mode: startTLS, addr: net.JoinHostPort(e.ip, p587)}
		e.submissions = listener{name: e.name + " submissions", mode: implicitTLS, addr: net.JoinHostPort(e.ip, p465)}
		e.proc = startClusterEdge(t, e, pebble, shared, backend.addr)
	}
	for _, e := range edges {
		waitEdgeCertificate(t, e)
	}

	hp := startHAProxy(t, haproxyBin, dir, edges)
	viaHAProxy := listener{name: "HAProxy submission", mode: startTLS, addr: hp.submission}
	viaHAProxyImplicit := listener{name: "HAProxy submissions", mode: implicitTLS, addr: hp.submissions}
	clientTLS := &tls.Config{ServerName: clusterHost, RootCAs: pebble.roots, MinVersion: tls.VersionTLS12}

	// HAProxy's smtpchk is answered by each edge before STARTTLS, through
	// its proxy_protocol handler (the check's LOCAL header leaves HAProxy's
	// own address): a session that ends with QUIT and never starts TLS.
	t.Run("health checks", func(t *testing.T) {
		for _, e := range edges {
			lines := waitClusterAccessLines(t, []*clusterEdge{e}, func(l map[string]any) bool {
				return l["client_ip"] == "127.0.0.1" && l["mode"] == "starttls" && l["outcome"] == "quit" && l["tls"] == nil
			}, 1)
			if len(lines) == 0 {
				t.Errorf("%s logged no health check session", e.name)
			}
		}
	})

	// (1) One issuance between the two edges, and both serve it on both
	// listeners, directly and through HAProxy on each edge.
	var first string
	t.Run("one certificate", func(t *testing.T) {
		issued := pebble.issuedSerials(t)
		if len(issued) != 1 {
			t.Fatalf("pebble issued %d certificates (%q), want one for the cluster", len(issued), issued)
		}
		first = issued[0]
		obtained := obtainedCount(t, edges[0].proc, clusterHost) + obtainedCount(t, edges[1].proc, clusterHost)
		if obtained != 1 {
			t.Errorf("the edges obtained %s %d times between them, want once (the other loads it from the storage)", clusterHost, obtained)
		}
		for _, e := range edges {
			t.Logf("%s obtained the certificate %d times", e.name, obtainedCount(t, e.proc, clusterHost))
			for _, l := range []listener{e.submission, e.submissions} {
				chain := edgeLeaf(t, l, directClientIP())
				checkPebbleLeaf(t, pebble, l.name, chain, clusterHost)
				if s := serial(chain[0]); s != first {
					t.Errorf("%s serves %s, want the one issued, %s", l.name, s, first)
				}
			}
		}
		for _, l := range []listener{viaHAProxy, viaHAProxyImplicit} {
			backendName := "edges_submission"
			if l.mode == implicitTLS {
				backendName = "edges_submissions"
			}
			// roundrobin alternates; HAProxy's own session counter per
			// server says which edge each connection went to
			seen := map[string]string{}
			for range 6 {
				before := hp.stats(t)
				// from an address of its own: a session from 127.0.0.1, the
				// address of HAProxy's health checks, could meet one
				conn, err := dialTLSFrom(l, &tls.Config{
					ServerName:         clusterHost,
					InsecureSkipVerify: true, // verified below, against pebble's root
					MinVersion:         tls.VersionTLS12,
				}, directClientIP())
				if err != nil {
					t.Fatalf("%s: %v", l.name, err)
				}
				chain := conn.ConnectionState().PeerCertificates
				conn.Close()
				after := hp.stats(t)
				edge := hp.newSessionOn(t, backendName, before, after)
				checkPebbleLeaf(t, pebble, l.name+" on "+edge, chain, clusterHost)
				seen[edge] = serial(chain[0])
				if len(seen) == len(edges) {
					break
				}
			}
			for _, e := range edges {
				if s, ok := seen[e.name]; !ok {
					t.Errorf("%s: no connection landed on %s", l.name, e.name)
				} else if s != first {
					t.Errorf("%s on %s: serial %s, want %s", l.name, e.name, s, first)
				}
			}
		}
	})
	if first == "" {
		t.FailNow()
	}

	// (3) A TLS session of one edge resumes on the other (the ticket keys
	// come from the shared storage), both ways, TLS 1.2 and 1.3.
	t.Run("resumption across edges", func(t *testing.T) {
		for _, version := range tlsVersions {
			for i := range edges {
				from, to := edges[i], edges[1-i]
				cfg := clusterTLS(pebble, version)
				if clusterSessionResumed(t, from.submissions, cfg) {
					t.Errorf("%s: the first session on %s resumed", tls.VersionName(version), from.name)
				}
				if !clusterSessionResumed(t, to.submissions, cfg) {
					t.Errorf("%s: %s did not resume a session of %s", tls.VersionName(version), to.name, from.name)
				}
			}
		}
	})

	// (4) The client's address, from HAProxy's header through the edge's
	// own, reaches the backend, the edge's access log and its limits.
	t.Run("client address", func(t *testing.T) {
		token := uniqueToken(t)
		c, err := haproxySession(viaHAProxy, clientTLS, "127.0.0.7")
		if err != nil {
			t.Fatal(err)
		}
		if stage, err := clusterMessage(c, token); err != nil {
			t.Fatalf("from 127.0.0.7 through HAProxy (%s): %v", stage, err)
		}
		_ = c.Quit()
		if got := backend.wait(t, token); !slices.Equal(got, []string{"127.0.0.7"}) {
			t.Errorf("the backend got the message from %q, want [127.0.0.7] (the PROXY header of the edge)", got)
		}
		line := waitClusterAccessLine(t, edges, func(l map[string]any) bool {
			return l["client_ip"] == "127.0.0.7" && l["messages"] == 1.0
		})
		if line["user_id"] != clusterUser {
			t.Errorf("the access line of 127.0.0.7's session: %v, want user %s", line, clusterUser)
		}

		// The limit is per edge (max_connections_per_ip 1 here): each edge
		// counts the sessions it serves itself, so the cluster serves up to
		// one session per address on each edge, whichever edge HAProxy
		// picks. So: open sessions from 127.0.0.7 one by one, holding those
		// that are greeted, until two are held (roundrobin gives them to the
		// two edges at the second try; a try that lands on an edge that
		// already holds one is refused, and the loop goes on). Then both
		// edges hold a session of 127.0.0.7 and any further one is refused,
		// whichever edge it lands on; 127.0.0.8, which neither edge has
		// counted, is served wherever it lands. That the two held sessions
		// are on different edges is not assumed: HAProxy's count of current
		// sessions per server shows it, and a limit that did not work would
		// have let both be held on one edge.
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for try := 0; len(held) < len(edges); try++ {
			if try == 6 {
				t.Fatalf("only %d sessions from 127.0.0.7 were greeted in %d tries", len(held), try)
			}
			conn, code, text := haproxyGreeting(t, hp.submission, "127.0.0.7")
			if code == 220 {
				held = append(held, conn)
				continue
			}
			conn.Close()
			checkTooManyConnections(t, "127.0.0.7 with "+strconv.Itoa(len(held))+" session(s) held", code, text)
		}
		// polled: HAProxy counts a refused session until it has seen both
		// ends close
		var st haproxyStats
		oneEach := func() bool {
			st = hp.stats(t)
			for _, e := range edges {
				if st.field(t, "edges_submission", e.name, "scur") != "1" {
					return false
				}
			}
			return true
		}
		deadline := time.Now().Add(ioTimeout)
		for !oneEach() {
			if time.Now().After(deadline) {
				t.Fatalf("HAProxy's current sessions per edge are not one each (one of 127.0.0.7's on each): edge1 %s, edge2 %s",
					st.field(t, "edges_submission", "edge1", "scur"), st.field(t, "edges_submission", "edge2", "scur"))
			}
			time.Sleep(50 * time.Millisecond) // polling interval
		}
		for range 2 {
			conn, code, text := haproxyGreeting(t, hp.submission, "127.0.0.7")
			conn.Close()
			checkTooManyConnections(t, "a third session of 127.0.0.7", code, text)
		}
		other := uniqueToken(t) + "-other"
		c, err = haproxySession(viaHAProxy, clientTLS, "127.0.0.8")
		if err != nil {
			t.Fatalf("127.0.0.8, while 127.0.0.7 holds a session on each edge: %v", err)
		}
		if stage, err := clusterMessage(c, other); err != nil {
			t.Fatalf("from 127.0.0.8 (%s): %v", stage, err)
		}
		_ = c.Quit()
		if got := backend.wait(t, other); !slices.Equal(got, []string{"127.0.0.8"}) {
			t.Errorf("the backend got 127.0.0.8's message from %q", got)
		}
		refused := waitClusterAccessLines(t, edges, func(l map[string]any) bool {
			return l["client_ip"] == "127.0.0.7" && l["outcome"] == "connection_limit"
		}, 2)
		if len(refused) < 2 {
			t.Errorf("the edges logged %d sessions of 127.0.0.7 refused for the limit, want at least 2", len(refused))
		}
	})

	// Only HAProxy's header is believed: a client elsewhere that sends one
	// itself (claiming 127.0.0.99) is the address it connects from. The
	// example's fallback_policy reject is what makes this so: caddy-l4
	// v0.1.2's handler reads a header from any address that is not refused.
	t.Run("forged PROXY header", func(t *testing.T) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.66")}, Timeout: 10 * time.Second}
		conn, err := d.Dial("tcp", edges[0].submission.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(ioTimeout))
		header := proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.ParseIP("127.0.0.99"), Port: 40000}, conn.RemoteAddr())
		if _, err := header.WriteTo(conn); err != nil {
			t.Fatal(err)
		}
		// whether the edge took the header or not, this ends the session
		if _, err := io.WriteString(conn, "QUIT\r\n"); err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, conn)
		line := waitClusterAccessLine(t, edges, func(l map[string]any) bool {
			return l["client_ip"] == "127.0.0.66" || l["client_ip"] == "127.0.0.99"
		})
		if line["client_ip"] != "127.0.0.66" {
			t.Errorf("a header from 127.0.0.66 made the edge log the client %v", line["client_ip"])
		}
	})

	// (2) The renewal by one edge is served by the other: both serve the
	// new certificate, and Pebble issued it once.
	t.Run("renewal", func(t *testing.T) {
		deadline := time.Now().Add(renewalTimeout)
		var renewed string
		for {
			serials := map[string]string{}
			for _, e := range edges {
				serials[e.name] = serial(edgeLeaf(t, e.submissions, directClientIP())[0])
			}
			if s := serials[edges[0].name]; s != first && s == serials[edges[1].name] {
				renewed = s
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the edges serve %v after %s, want both a renewal of %s", serials, renewalTimeout, first)
			}
			time.Sleep(250 * time.Millisecond) // polling interval for the renewal
		}
		for _, e := range edges {
			for _, l := range []listener{e.submission, e.submissions} {
				chain := edgeLeaf(t, l, directClientIP())
				checkPebbleLeaf(t, pebble, l.name+" after the renewal", chain, clusterHost)
			}
		}
		issued := pebble.issuedSerials(t)
		if !slices.Contains(issued, renewed) {
			t.Errorf("the edges serve %s, which pebble did not issue (%q)", renewed, issued)
		}
		counts := map[string]int{}
		total := 0
		for _, e := range edges {
			counts[e.name] = obtainedCount(t, e.proc, clusterHost)
			total += counts[e.name]
		}
		t.Logf("renewed %s -> %s; pebble issued %q; obtained by edge: %v", first, renewed, issued, counts)
		if total != len(issued) {
			t.Errorf("the edges obtained %d certificates between them and pebble issued %d: an edge obtained one the other had", total, len(issued))
		}
		// a client verifying the name gets through on the new certificate
		c, err := haproxySession(viaHAProxy, clientTLS, "127.0.0.10")
		if err != nil {
			t.Fatal(err)
		}
		if stage, err := clusterMessage(c, uniqueToken(t)); err != nil {
			t.Errorf("after the renewal (%s): %v", stage, err)
		}
		_ = c.Quit()
	})

	// (5) One edge killed under load: HAProxy's check marks it down, the
	// sessions after that all go to the other, and every message that got
	// 250 is stored once.
	t.Run("edge killed under load", func(t *testing.T) {
		clusterKillUnderLoad(t, hp, backend, edges, viaHAProxy, clientTLS)
	})
}

// clusterKillUnderLoad runs clients through HAProxy, SIGKILLs edge2 once
// some messages went through, waits until HAProxy's health check marks it
// down, lets the clients go on until enough sessions that began after that
// have ended, and checks the accounting.
func clusterKillUnderLoad(t *testing.T, hp *haproxyProc, backend *clusterBackend, edges []*clusterEdge,
	l listener, cfg *tls.Config) {
	const (
		workers   = 6
		beforeAll = 12 // messages through before the kill
		afterDown = 12 // sessions begun after the down mark, ended
	)
	type result struct {
		token, ip string
		phase     int32 // 0 before the kill, 1 killed, 2 marked down
		stage     string
		err       error
	}
	var (
		phase     atomic.Int32
		stop      atomic.Bool
		delivered atomic.Int64
		afterDone atomic.Int64
		mu        sync.Mutex
		results   []result
		wg        sync.WaitGroup
	)
	base := uniqueToken(t)
	for w := 1; w <= workers; w++ {
		wg.Go(func() {
			for i := 0; !stop.Load(); i++ {
				// a new client address for every session (for 250 × 254
				// sessions per worker), so that the per-address limit of 1
				// never meets a session whose end the edge has not seen yet
				ip := fmt.Sprintf("127.%d.%d.%d", 1+i/250%254, w, 1+i%250)
				r := result{token: fmt.Sprintf("%s-w%d-%d", base, w, i), ip: ip, phase: phase.Load()}
				c, err := haproxySession(l, cfg, ip)
				if err != nil {
					r.stage, r.err = "connect", err
				} else {
					r.stage, r.err = clusterMessage(c, r.token)
					if r.err == nil {
						delivered.Add(1)
						_ = c.Quit()
					}
					c.Close()
				}
				if r.phase == 2 {
					afterDone.Add(1)
				}
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			}
		})
	}
	defer func() {
		stop.Store(true)
		wg.Wait()
	}()

	waitFor(t, "messages delivered before the kill", func() bool { return delivered.Load() >= beforeAll })
	victim, survivor := edges[1], edges[0]
	if err := victim.proc.cmd.Process.Kill(); err != nil {
		t.Fatalf("SIGKILL %s: %v", victim.name, err)
	}
	phase.Store(1)
	<-victim.proc.exited
	killed := time.Now()
	var downStats haproxyStats
	waitFor(t, "HAProxy's health check to mark "+victim.name+" down", func() bool {
		downStats = hp.stats(t)
		return strings.HasPrefix(downStats.field(t, "edges_submission", victim.name, "status"), "DOWN")
	})
	phase.Store(2)
	t.Logf("HAProxy marked %s down %s after the kill (check: %s)", victim.name,
		time.Since(killed).Round(100*time.Millisecond), downStats.field(t, "edges_submission", victim.name, "check_status"))
	waitFor(t, "sessions begun after the down mark", func() bool { return afterDone.Load() >= afterDown })
	stop.Store(true)
	wg.Wait()

	end := hp.stats(t)
	if a, b := downStats.field(t, "edges_submission", victim.name, "stot"), end.field(t, "edges_submission", victim.name, "stot"); a != b {
		t.Errorf("HAProxy sent sessions to %s after marking it down (total %s, then %s)", victim.name, a, b)
	}
	if a, b := downStats.field(t, "edges_submission", survivor.name, "stot"), end.field(t, "edges_submission", survivor.name, "stot"); a == b {
		t.Errorf("no session went to %s after %s was down (total %s)", survivor.name, victim.name, a)
	}

	// the accounting
	stored := backend.all()
	acked, failed, lostReply := 0, 0, 0
	sent := make(map[string]bool, len(results))
	for _, r := range results {
		sent[r.token] = true
		sources := stored[r.token]
		switch {
		case r.err == nil:
			acked++
			if !slices.Equal(sources, []string{r.ip}) {
				t.Errorf("%s got 250 from %s, and the backend stored it from %q", r.token, r.ip, sources)
			}
		case len(sources) > 0 && r.stage == "final dot":
			// RFC 5321 6.1: the backend took the message, and the kill
			// cut the session before its 250 reached the client
			lostReply++
			failed++
		case len(sources) > 0:
			t.Errorf("%s failed at %s (%v) and was stored %d times", r.token, r.stage, r.err, len(sources))
		default:
			failed++
			if r.phase == 2 {
				t.Errorf("a session begun after %s was marked down failed at %s: %v", victim.name, r.stage, r.err)
			}
		}
	}
	n := 0
	for token, sources := range stored {
		if !strings.HasPrefix(token, base) {
			continue
		}
		n++
		if !sent[token] {
			t.Errorf("the backend stored %s, which no client sent", token)
		}
		if len(sources) > 1 {
			t.Errorf("the backend stored %s %d times", token, len(sources))
		}
	}
	t.Logf("%d sessions: %d messages got 250, %d sessions failed (%d of them after the backend took the message); the backend stored %d",
		len(results), acked, failed, lostReply, n)
	if acked != n-lostReply {
		t.Errorf("%d messages got 250, the backend stored %d (%d whose 250 the kill cut off)", acked, n, lostReply)
	}
}

// waitFor polls cond, within ioTimeout.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %s", what, ioTimeout)
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
}

// startClusterEdge starts one edge with examples/cluster/Caddyfile and
// session-tickets.json, its addresses on e.ip, its storage shared, Pebble as
// its CA.
func startClusterEdge(t *testing.T, e *clusterEdge, pebble *pebbleCA, shared, backendAddr string) *caddyProc {
	t.Helper()
	tickets, err := os.ReadFile(filepath.Join(examplesDir(t), "cluster", "session-tickets.json"))
	if err != nil {
		t.Fatal(err)
	}
	var sessionTickets map[string]any
	if err := json.Unmarshal(tickets, &sessionTickets); err != nil {
		t.Fatalf("examples/cluster/session-tickets.json: %v", err)
	}
	_, p587, _ := net.SplitHostPort(e.submission.addr)
	_, p465, _ := net.SplitHostPort(e.submissions.addr)
	return startCaddy(t, func() caddySetup {
		_, httpPort, _ := net.SplitHostPort(freeAddr(t))
		_, httpsPort, _ := net.SplitHostPort(freeAddr(t))
		globals := strings.Join([]string{
			"email postmaster@example.com",
			"admin off",
			"debug", // the cert_obtained events
			"acme_ca " + pebble.dirURL,
			"acme_ca_root " + pebble.tlsCertPath,
			"http_port " + httpPort,
			"https_port " + httpsPort,
			"default_bind " + e.ip,
			"renew_interval 1s",
			"renewal_window_ratio 0.5",
		}, "\n\t")
		caddyfile := readExample(t, "cluster/Caddyfile", map[string]string{
			"\temail postmaster@example.com\n":         "\t" + globals + "\n",
			"storage file_system /srv/caddy-cluster\n": "storage file_system " + strconv.Quote(shared) + "\n",
			"\t\t:587 {":                  "\t\t" + e.ip + ":" + p587 + " {",
			"\t\t:465 {":                  "\t\t" + e.ip + ":" + p465 + " {",
			"allow 10.0.0.10/32":          "allow 127.0.0.1/32",
			"backend 10.0.0.30:10587":     "backend " + backendAddr,
			"max_connections_per_ip 10\n": "max_connections_per_ip 1\n",
		})
		return caddySetup{
			caddyfile: caddyfile,
			editJSON: func(config map[string]any) {
				tlsApp(config)["session_tickets"] = sessionTickets
			},
			addrs: []string{e.submission.addr, e.submissions.addr},
			roots: pebble.roots,
			// no hostnames: startCaddy's probe would connect without the
			// PROXY header these listeners require; waitEdgeCertificate
			// waits for the certificate instead
		}
	})
}

// waitEdgeCertificate polls, within startupTimeout, until e serves a
// certificate for clusterHost that verifies against Pebble's root.
func waitEdgeCertificate(t *testing.T, e *clusterEdge) {
	t.Helper()
	deadline := time.Now().Add(startupTimeout)
	cfg := &tls.Config{ServerName: clusterHost, RootCAs: e.proc.roots, MinVersion: tls.VersionTLS12}
	for {
		conn, err := edgeTLS(e.submissions, cfg, directClientIP())
		if err == nil {
			conn.Close()
			return
		}
		select {
		case <-e.proc.exited:
			t.Fatalf("%s exited: %v", e.name, e.proc.waitErr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s serves no certificate for %s after %s: %v", e.name, clusterHost, startupTimeout, err)
		}
		time.Sleep(50 * time.Millisecond) // polling interval of a readiness check
	}
}

// directClientIP is a new client address for the PROXY header of a direct
// connection to an edge: with max_connections_per_ip 1, a session from an
// address whose previous session the edge has not finished yet would be
// refused.
func directClientIP() string {
	n := directClients.Add(1)
	return fmt.Sprintf("127.2.%d.%d", n/250%250, 1+n%250)
}

var directClients atomic.Int64

// dialEdge connects to an edge's listener directly, as HAProxy does: from
// 127.0.0.1, with a PROXY v2 header that names clientIP as the client.
func dialEdge(l listener, clientIP string) (net.Conn, error) {
	conn, err := net.DialTimeout("tcp", l.addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	header := proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.ParseIP(clientIP), Port: 40000}, conn.RemoteAddr())
	if _, err := header.WriteTo(conn); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// edgeTLS is dialTLS directly to an edge's listener (dialEdge).
func edgeTLS(l listener, cfg *tls.Config, clientIP string) (*tls.Conn, error) {
	conn, err := dialEdge(l, clientIP)
	if err != nil {
		return nil, err
	}
	return tlsOn(conn, l.mode, cfg)
}

// edgeLeaf is the chain an edge's listener serves (verified by the caller).
func edgeLeaf(t *testing.T, l listener, clientIP string) []*x509.Certificate {
	t.Helper()
	conn, err := edgeTLS(l, &tls.Config{
		ServerName:         clusterHost,
		InsecureSkipVerify: true, // verified by the caller, against pebble's root
		MinVersion:         tls.VersionTLS12,
	}, clientIP)
	if err != nil {
		t.Fatalf("%s (%s): %v", l.name, l.addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates
}

// clusterTLS is a client configuration with a session cache of its own.
func clusterTLS(pebble *pebbleCA, version uint16) *tls.Config {
	return &tls.Config{
		ServerName:         clusterHost,
		RootCAs:            pebble.roots,
		MinVersion:         tls.VersionTLS12,
		MaxVersion:         version,
		ClientSessionCache: tls.NewLRUClientSessionCache(8),
	}
}

// clusterSessionResumed opens a session directly on l (greeting, EHLO,
// QUIT: the client has then read the TLS 1.3 ticket) and reports whether
// TLS resumed.
func clusterSessionResumed(t *testing.T, l listener, cfg *tls.Config) bool {
	t.Helper()
	conn, err := dialEdge(l, directClientIP())
	if err != nil {
		t.Fatal(err)
	}
	c, err := smtpClientOn(conn, l.mode, cfg)
	if err != nil {
		t.Fatalf("%s: %v", l.name, err)
	}
	defer c.Close()
	state, _ := c.TLSConnectionState()
	if err := c.Quit(); err != nil {
		t.Errorf("%s: QUIT: %v", l.name, err)
	}
	return state.DidResume
}

// haproxySession is an SMTP session through HAProxy from the loopback
// address ip, after TLS and AUTH.
func haproxySession(l listener, cfg *tls.Config, ip string) (*smtp.Client, error) {
	c, err := smtpClientFrom(l, cfg, ip)
	if err != nil {
		return nil, err
	}
	if err := c.Auth(smtp.PlainAuth("", clusterUser, clusterPassword, firstHost)); err != nil {
		c.Close()
		return nil, fmt.Errorf("AUTH: %w", err)
	}
	return c, nil
}

// clusterMessage sends a message with token as its subject, and returns
// the step that failed, if one did.
func clusterMessage(c *smtp.Client, token string) (string, error) {
	if err := c.Mail("sender@example.com"); err != nil {
		return "MAIL", err
	}
	if err := c.Rcpt("rcpt@example.com"); err != nil {
		return "RCPT", err
	}
	w, err := c.Data()
	if err != nil {
		return "DATA", err
	}
	if _, err := w.Write(testMessage(token, "through the cluster")); err != nil {
		return "message", err
	}
	if err := w.Close(); err != nil {
		return "final dot", err
	}
	return "", nil
}

// haproxyGreeting connects to addr from ip and reads the first reply.
func haproxyGreeting(t *testing.T, addr, ip string) (net.Conn, int, string) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("from %s: %v", ip, err)
	}
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	code, text, err := textproto.NewReader(bufio.NewReader(conn)).ReadResponse(0)
	if err != nil && code == 0 {
		conn.Close()
		t.Fatalf("from %s: the greeting: %v", ip, err)
	}
	return conn, code, text
}

// checkTooManyConnections fails t unless the reply is the edge's refusal
// for a connection limit: 421 with the enhanced code 4.7.0.
func checkTooManyConnections(t *testing.T, what string, code int, text string) {
	t.Helper()
	if code != 421 || !strings.HasPrefix(text, "4.7.0 ") {
		t.Errorf("%s: %d %s, want 421 4.7.0", what, code, text)
	}
}

// waitClusterAccessLine waits for an access line of either edge that
// match accepts.
func waitClusterAccessLine(t *testing.T, edges []*clusterEdge, match func(map[string]any) bool) map[string]any {
	t.Helper()
	lines := waitClusterAccessLines(t, edges, match, 1)
	if len(lines) == 0 {
		t.Fatalf("no such access line on either edge after %s", ioTimeout)
	}
	return lines[0]
}

// waitClusterAccessLines polls both edges' logs, within ioTimeout, until
// they hold n access lines that match, and returns those it found.
func waitClusterAccessLines(t *testing.T, edges []*clusterEdge, match func(map[string]any) bool, n int) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		var lines []map[string]any
		for _, e := range edges {
			for _, l := range e.proc.logEntries(t) {
				if l["logger"] == "layer4.handlers.smtp.access" && match(l) {
					lines = append(lines, l)
				}
			}
		}
		if len(lines) >= n || time.Now().After(deadline) {
			return lines
		}
		time.Sleep(50 * time.Millisecond) // polling interval of a file another process writes
	}
}

// clusterBackend is the mail server behind the edges: go-smtp behind
// go-proxyproto's listener, which requires a PROXY header on every
// connection; it accepts any AUTH PLAIN and records, for each message (by
// its subject), the client address of the header, once per time it was
// stored.
type clusterBackend struct {
	addr string

	mu     sync.Mutex
	stored map[string][]string
}

func startClusterBackend(t *testing.T) *clusterBackend {
	t.Helper()
	b := &clusterBackend{stored: make(map[string][]string)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = ln.Addr().String()
	pl := &proxyproto.Listener{
		Listener: ln,
		ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			return proxyproto.REQUIRE, nil
		},
		ReadHeaderTimeout: 10 * time.Second,
	}
	srv := gosmtp.NewServer(b)
	srv.Domain = "backend.localhost"
	srv.AllowInsecureAuth = true // behind the TLS-terminating edges
	srv.ReadTimeout = ioTimeout
	srv.WriteTimeout = ioTimeout
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(pl)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return b
}

// NewSession implements gosmtp.Backend.
func (b *clusterBackend) NewSession(c *gosmtp.Conn) (gosmtp.Session, error) {
	ip, _, _ := net.SplitHostPort(c.Conn().RemoteAddr().String())
	return &clusterBackendSession{b: b, client: ip}, nil
}

// wait returns the client addresses of the message with the subject token,
// waiting (within ioTimeout) for it to arrive.
func (b *clusterBackend) wait(t *testing.T, token string) []string {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		b.mu.Lock()
		got := slices.Clone(b.stored[token])
		b.mu.Unlock()
		if len(got) > 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("the backend has no message %s after %s", token, ioTimeout)
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
}

// all is a copy of what the backend stored.
func (b *clusterBackend) all() map[string][]string {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := make(map[string][]string, len(b.stored))
	for k, v := range b.stored {
		m[k] = slices.Clone(v)
	}
	return m
}

type clusterBackendSession struct {
	b      *clusterBackend
	client string
	authed bool
}

func (s *clusterBackendSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (s *clusterBackendSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, username, password string) error {
		if username != clusterUser || password != clusterPassword {
			return gosmtp.ErrAuthFailed
		}
		s.authed = true
		return nil
	}), nil
}

func (s *clusterBackendSession) Mail(string, *gosmtp.MailOptions) error {
	if !s.authed {
		return errAuthRequired
	}
	return nil
}

func (*clusterBackendSession) Rcpt(string, *gosmtp.RcptOptions) error { return nil }
func (*clusterBackendSession) Reset()                                 {}
func (*clusterBackendSession) Logout() error                          { return nil }

func (s *clusterBackendSession) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	hdr, err := textproto.NewReader(bufio.NewReader(strings.NewReader(string(data)))).ReadMIMEHeader()
	if err != nil {
		return &gosmtp.SMTPError{Code: 554, EnhancedCode: gosmtp.EnhancedCode{5, 6, 0}, Message: "unparsable header"}
	}
	s.b.mu.Lock()
	defer s.b.mu.Unlock()
	subject := hdr.Get("Subject")
	s.b.stored[subject] = append(s.b.stored[subject], s.client)
	return nil
}

var _ gosmtp.AuthSession = (*clusterBackendSession)(nil)

// haproxyProc is a running HAProxy with examples/cluster/haproxy.cfg.
type haproxyProc struct {
	submission, submissions string // its frontends
	socket                  string // the runtime API
	logPath                 string
	cmd                     *exec.Cmd
	exited                  chan struct{}
	waitErr                 error
}

// startHAProxy runs HAProxy in the foreground with the example's
// configuration, its frontends on free loopback ports and its servers the
// edges, and waits until its health checks have passed on every server.
func startHAProxy(t *testing.T, bin, dir string, edges []*clusterEdge) *haproxyProc {
	t.Helper()
	h := &haproxyProc{
		submission:  freeAddr(t),
		submissions: freeAddr(t),
		socket:      filepath.Join(dir, "haproxy.sock"),
		logPath:     filepath.Join(dir, "haproxy.log"),
		exited:      make(chan struct{}),
	}
	replace := map[string]string{
		"stats socket /run/haproxy/cluster.sock": "stats socket " + h.socket,
		"bind :587\n":                            "bind " + h.submission + "\n",
		"bind :465\n":                            "bind " + h.submissions + "\n",
	}
	for i, e := range edges {
		_, p587, _ := net.SplitHostPort(e.submission.addr)
		_, p465, _ := net.SplitHostPort(e.submissions.addr)
		replace[fmt.Sprintf("10.0.0.2%d:587", i+1)] = e.ip + ":" + p587
		replace[fmt.Sprintf("10.0.0.2%d:465", i+1)] = e.ip + ":" + p465
	}
	cfg := readExample(t, "cluster/haproxy.cfg", replace)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s\n%s", err, out, cfg)
	}
	logFile, err := os.Create(h.logPath)
	if err != nil {
		t.Fatal(err)
	}
	// -db: in the foreground, stopped by the test
	h.cmd = exec.Command(bin, "-db", "-f", cfgPath)
	h.cmd.Stdout, h.cmd.Stderr = logFile, logFile
	if err := h.cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("starting haproxy: %v", err)
	}
	go func() {
		h.waitErr = h.cmd.Wait()
		logFile.Close()
		close(h.exited)
	}()
	t.Cleanup(func() {
		stopProcess(t, "haproxy", h.cmd, h.exited)
		if t.Failed() {
			out, _ := os.ReadFile(h.logPath)
			t.Logf("haproxy.cfg:\n%s\nhaproxy output:\n%s", cfg, out)
		}
	})

	// L7OK: the smtpchk check got its 2xx replies from the edge, through
	// the edge's proxy_protocol handler
	deadline := time.Now().Add(startupTimeout)
	for {
		select {
		case <-h.exited:
			t.Fatalf("haproxy exited: %v", h.waitErr)
		default:
		}
		st, err := h.readStats()
		ready := err == nil
		for _, e := range edges {
			checked, tracking := st["edges_submission/"+e.name], st["edges_submissions/"+e.name]
			if checked["status"] != "UP" || checked["check_status"] != "L7OK" || tracking["status"] != "UP" {
				ready = false
			}
		}
		if ready {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("HAProxy's servers are not all up with a passed smtpchk after %s: %v %v", startupTimeout, st, err)
		}
		time.Sleep(100 * time.Millisecond) // polling interval of a readiness check
	}
}

// haproxyStats is HAProxy's `show stat`: "backend/server" -> field -> value.
type haproxyStats map[string]map[string]string

// field is one field of one server's row.
func (s haproxyStats) field(t *testing.T, backend, server, name string) string {
	t.Helper()
	row, ok := s[backend+"/"+server]
	if !ok {
		t.Fatalf("HAProxy's stats have no server %s/%s", backend, server)
	}
	return row[name]
}

// stats reads HAProxy's statistics through its runtime API.
func (h *haproxyProc) stats(t *testing.T) haproxyStats {
	t.Helper()
	st, err := h.readStats()
	if err != nil {
		t.Fatalf("HAProxy's stats: %v", err)
	}
	return st
}

func (h *haproxyProc) readStats() (haproxyStats, error) {
	conn, err := net.DialTimeout("unix", h.socket, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := io.WriteString(conn, "show stat\n"); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(conn)
	if err != nil {
		return nil, err
	}
	// CSV whose first line, the field names, starts with "# "
	text := strings.TrimPrefix(strings.TrimSpace(string(data)), "# ")
	r := csv.NewReader(strings.NewReader(text))
	r.FieldsPerRecord = -1
	records, err := r.ReadAll()
	if err != nil || len(records) < 2 {
		return nil, fmt.Errorf("show stat: %v: %q", err, data)
	}
	st := make(haproxyStats)
	names := records[0]
	for _, rec := range records[1:] {
		row := make(map[string]string, len(names))
		for i, name := range names {
			if i < len(rec) {
				row[name] = rec[i]
			}
		}
		st[row["pxname"]+"/"+row["svname"]] = row
	}
	return st, nil
}

// newSessionOn names the server of backend whose session total grew by one
// between before and after, failing t unless exactly one did.
func (h *haproxyProc) newSessionOn(t *testing.T, backend string, before, after haproxyStats) string {
	t.Helper()
	var grew []string
	for key, row := range after {
		name, ok := strings.CutPrefix(key, backend+"/")
		if !ok || name == "BACKEND" || name == "FRONTEND" {
			continue
		}
		a, _ := strconv.Atoi(row["stot"])
		b, _ := strconv.Atoi(before[key]["stot"])
		if a == b+1 {
			grew = append(grew, name)
		} else if a != b {
			t.Fatalf("%s: session total %d -> %d for one connection", key, b, a)
		}
	}
	if len(grew) != 1 {
		t.Fatalf("%s: one connection, and the session totals of %q grew", backend, grew)
	}
	return grew[0]
}
