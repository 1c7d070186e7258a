// Command report turns the results compare.sh collects (one JSON record per
// line: a case, a peer, a round and loadgen's JSON result) into one table:
// the median over the rounds of each figure, each peer's ratio to the edge,
// the CPU time each session cost (when the results have it), the speed-up
// of resumed TLS sessions over full handshakes and the share of handshakes
// each peer let resume (when the results have the resumed cases), and the
// targets checked against the figures. Older results, without the later
// fields or cases, reprint as they did.
//
//	report results.jsonl
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: report results.jsonl")
		os.Exit(2)
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
	defer f.Close()
	recs, err := read(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
	write(os.Stdout, summarize(recs))
}

// record is one line of the results file.
type record struct {
	Case   string `json:"case"`  // starttls-c8, implicit-c256, hold, bulk, rtt, ...
	Title  string `json:"title"` // what the case is, for the table
	Peer   string `json:"peer"`  // "edge 587", "nginx 587", "backend (plain)", ...
	Base   string `json:"base"`  // the peer the ratio is taken to
	Round  int    `json:"round"`
	Result struct {
		// run
		SessionsPerSec float64        `json:"sessions_per_s"`
		MessagesPerSec float64        `json:"messages_per_s"`
		P50ms          float64        `json:"p50_ms"`
		P99ms          float64        `json:"p99_ms"`
		Errors         int            `json:"errors"`
		ErrorKinds     map[string]int `json:"error_kinds"`
		// run, with TLS: the handshakes and how many resumed (absent in
		// results from before loadgen counted them); resume: the run
		// offered to resume (loadgen -resume)
		Resume     bool `json:"resume"`
		Handshakes *int `json:"handshakes"`
		Resumed    *int `json:"resumed"`
		// hold
		Held   int `json:"held"`
		NoopOK int `json:"noop_ok"`
		// bulk
		MiBPerSec float64 `json:"mib_per_s"`
		// rtt
		P50us float64 `json:"p50_us"`
		P99us float64 `json:"p99_us"`

		Mode string `json:"mode"`
		TLS  *struct {
			Version string `json:"version"`
			Cipher  string `json:"cipher"`
			Curve   string `json:"curve"`
		} `json:"tls"`
	} `json:"result"`
	// hold: resident memory of the peer's processes, KiB
	RSSBeforeKiB float64 `json:"rss_before_kib"`
	RSSAfterKiB  float64 `json:"rss_after_kib"`
	// run: CPU time (user + system) used during the run, ms per completed
	// session, by the peer's processes, by smtp-sink (absent when the peer
	// is the sink itself) and by loadgen. Absent in results from before
	// compare.sh measured it.
	CPU *struct {
		Peer    float64  `json:"peer"`
		Sink    *float64 `json:"sink"`
		Loadgen float64  `json:"loadgen"`
	} `json:"cpu_ms_per_session"`
	// a run that produced no result
	Failed string `json:"failed"`
	// compare.sh --pinned: the peer ran on one CPU, loadgen and the sink on
	// the other
	Pinned bool `json:"pinned"`
}

func read(r io.Reader) ([]record, error) {
	var recs []record
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var rec record
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		recs = append(recs, rec)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(recs) == 0 {
		return nil, errors.New("no results")
	}
	return recs, nil
}

// row is one peer in one case: medians over its rounds.
type row struct {
	peer, base string
	rounds     int
	failed     []string
	value      float64 // the case's main figure
	lo, hi     float64 // its range over the rounds
	p50, p99   float64 // run: session latency ms; rtt: µs per round trip
	msgs       float64 // run: messages/s
	errors     int
	errorKinds map[string]int
	held, noop int // hold
	tls        string
	cpu        *cpuRow // run, when the results have CPU times
	// run: the handshakes of all rounds and how many resumed (handshakes
	// 0: not counted); resume: some round offered to resume
	handshakes, resumed int
	resume              bool
	pinned              bool
}

// cpuRow is the CPU time per completed session of one peer in one run case,
// ms, medians over the rounds that measured it. Each sum is taken per round,
// then its median.
type cpuRow struct {
	peer, sink, loadgen float64 // sink NaN: the peer is the sink
	peerSink            float64 // the peer and the sink: the proxy's share
	total               float64 // everything the session cost the machine
	busy                float64 // CPUs kept busy: total × sessions/s
	// pinned runs: the CPU of the peer (peer × sessions/s) and the one of
	// loadgen and the sink ((loadgen + sink) × sessions/s) kept busy
	busyPeer, busyLoad float64
}

type table struct {
	cases []string
	title map[string]string
	kind  map[string]string // run, hold, bulk, rtt
	rows  map[string][]*row // by case, in the order the peers first appear
}

func summarize(recs []record) *table {
	t := &table{title: map[string]string{}, kind: map[string]string{}, rows: map[string][]*row{}}
	values := map[*row][][4]float64{} // value, p50, p99, msgs per round
	cpus := map[*row][][8]float64{}   // the fields of cpuRow per round
	for _, rec := range recs {
		if _, ok := t.title[rec.Case]; !ok {
			t.cases = append(t.cases, rec.Case)
			t.title[rec.Case] = rec.Title
		}
		i := slices.IndexFunc(t.rows[rec.Case], func(r *row) bool { return r.peer == rec.Peer })
		if i < 0 {
			t.rows[rec.Case] = append(t.rows[rec.Case], &row{peer: rec.Peer, base: rec.Base, errorKinds: map[string]int{}})
			i = len(t.rows[rec.Case]) - 1
		}
		r := t.rows[rec.Case][i]
		r.rounds++
		r.pinned = r.pinned || rec.Pinned
		if rec.Failed != "" {
			r.failed = append(r.failed, rec.Failed)
			continue
		}
		res := rec.Result
		if res.Mode != "" {
			t.kind[rec.Case] = res.Mode
		}
		if res.TLS != nil {
			r.tls = res.TLS.Version + " " + res.TLS.Cipher + " " + res.TLS.Curve
		}
		var v [4]float64
		switch res.Mode {
		case "run":
			v = [4]float64{res.SessionsPerSec, res.P50ms, res.P99ms, res.MessagesPerSec}
			r.errors += res.Errors
			for k, n := range res.ErrorKinds {
				r.errorKinds[k] += n
			}
			if res.Handshakes != nil && res.Resumed != nil {
				r.handshakes += *res.Handshakes
				r.resumed += *res.Resumed
			}
			r.resume = r.resume || res.Resume
			if c := rec.CPU; c != nil {
				sink, sinkUsed, sinkRan := math.NaN(), 0.0, 0.0
				if c.Sink != nil {
					sink, sinkRan = *c.Sink, *c.Sink
					// the ceiling has no backend: what the sink used
					// beside it is its idle, not the session's cost
					if !isCeiling(rec.Peer) {
						sinkUsed = sink
					}
				}
				total := c.Loadgen + c.Peer + sinkUsed
				perSec := res.SessionsPerSec / 1000 // ms of CPU per session × sessions/s
				cpus[r] = append(cpus[r], [8]float64{c.Peer, sink, c.Loadgen,
					c.Peer + sinkUsed, total, total * perSec,
					c.Peer * perSec, (c.Loadgen + sinkRan) * perSec})
			}
		case "hold":
			perSession := math.NaN()
			if res.Held > 0 {
				perSession = (rec.RSSAfterKiB - rec.RSSBeforeKiB) / float64(res.Held)
			}
			v[0] = perSession
			r.held, r.noop = res.Held, res.NoopOK
		case "bulk":
			v[0] = res.MiBPerSec
		case "rtt":
			v = [4]float64{res.P50us, res.P50us, res.P99us, 0}
		}
		values[r] = append(values[r], v)
	}
	for _, c := range t.cases {
		if t.kind[c] == "" { // every run of the case failed: go by its name
			t.kind[c] = "run"
			for _, k := range []string{"hold", "bulk", "rtt"} {
				if strings.HasPrefix(c, k) {
					t.kind[c] = k
				}
			}
		}
	}
	for _, rows := range t.rows {
		for _, r := range rows {
			vs := values[r]
			if len(vs) == 0 {
				r.value, r.lo, r.hi, r.p50, r.p99 = math.NaN(), math.NaN(), math.NaN(), math.NaN(), math.NaN()
				continue
			}
			col := func(i int) []float64 {
				c := make([]float64, len(vs))
				for j, v := range vs {
					c[j] = v[i]
				}
				return c
			}
			r.value, r.lo, r.hi = median(col(0)), slices.Min(col(0)), slices.Max(col(0))
			r.p50, r.p99, r.msgs = median(col(1)), median(col(2)), median(col(3))
		}
	}
	for r, cs := range cpus {
		col := func(i int) float64 {
			c := make([]float64, len(cs))
			for j, v := range cs {
				c[j] = v[i]
			}
			return median(c)
		}
		r.cpu = &cpuRow{peer: col(0), sink: col(1), loadgen: col(2), peerSink: col(3), total: col(4), busy: col(5),
			busyPeer: col(6), busyLoad: col(7)}
	}
	return t
}

// isCeiling says whether a peer is the ceiling, which answers SMTP itself
// and has no backend.
func isCeiling(peer string) bool { return strings.HasPrefix(peer, "ceiling") }

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func (t *table) find(c, peer string) *row {
	for _, r := range t.rows[c] {
		if r.peer == peer {
			return r
		}
	}
	return nil
}

// ratio is a peer's figure divided by its base's (the edge's).
func (t *table) ratio(c string, r *row) float64 {
	b := t.find(c, r.base)
	if b == nil {
		return math.NaN()
	}
	return r.value / b.value
}

func write(w io.Writer, t *table) {
	fmt.Fprintf(w, "%-20s %10s %9s %9s %8s %7s %9s  %s\n",
		"peer", "value", "p50", "p99", "spread", "errors", "peer/edge", "notes")
	for _, c := range t.cases {
		kind := t.kind[c]
		k := kinds[kind]
		head := fmt.Sprintf("── %s  [%s; %s", t.title[c], k.unit, k.better)
		if k.latency != "" {
			head += "; p50/p99 " + k.latency
		}
		fmt.Fprintf(w, "%s]\n", head)
		var backend *row
		if kind == "rtt" {
			backend = t.find(c, "backend (plain)")
		}
		for _, r := range t.rows[c] {
			var notes []string
			if len(r.failed) > 0 {
				notes = append(notes, fmt.Sprintf("%d of %d rounds failed: %s", len(r.failed), r.rounds, r.failed[0]))
			}
			p50, p99 := fmtF(r.p50), fmtF(r.p99)
			if kind == "hold" || kind == "bulk" {
				p50, p99 = "", ""
			}
			if kind == "hold" {
				notes = append(notes, fmt.Sprintf("held %d, %d answered NOOP", r.held, r.noop))
			}
			if kind == "run" && r.handshakes > 0 && (r.resume || r.resumed > 0) {
				notes = append(notes, fmt.Sprintf("resumed %s of %d handshakes", fmtShare(r.resumed, r.handshakes), r.handshakes))
			}
			if kind == "rtt" && backend != nil && r != backend {
				notes = append(notes, fmt.Sprintf("adds %+.1f µs p50 to the backend", r.value-backend.value))
			}
			if len(r.errorKinds) > 0 {
				var ks []string
				for _, k := range sortedKeys(r.errorKinds) {
					ks = append(ks, fmt.Sprintf("%d× %s", r.errorKinds[k], k))
				}
				notes = append(notes, strings.Join(ks, ", "))
			}
			spread := ""
			if r.rounds > 1 && r.value != 0 && !math.IsNaN(r.value) {
				spread = fmt.Sprintf("±%.0f%%", 50*(r.hi-r.lo)/math.Abs(r.value))
			}
			errs := ""
			if kind == "run" {
				errs = fmt.Sprint(r.errors)
			}
			fmt.Fprintf(w, "  %-18s %10s %9s %9s %8s %7s %9s  %s\n",
				r.peer, fmtF(r.value), p50, p99, spread, errs, fmtRatio(t.ratio(c, r)), strings.Join(notes, "; "))
		}
	}
	writeCPU(w, t)
	writeResumption(w, t)
	writeTLS(w, t)
	writeTargets(w, t)
}

// writeCPU says what each session cost in CPU time in the run cases, and
// how that compares with the ceiling's: where the CPUs are saturated (CPUs
// busy near the machine's count), sessions/s is about the CPUs divided by
// the total, so the ratio to the ceiling's total bounds the ratio of
// sessions/s. Nothing is written for results without CPU times.
func writeCPU(w io.Writer, t *table) {
	var cases []string
	for _, c := range t.cases {
		if t.kind[c] == "run" && slices.ContainsFunc(t.rows[c], func(r *row) bool { return r.cpu != nil }) {
			cases = append(cases, c)
		}
	}
	if len(cases) == 0 {
		return
	}
	pinned := slices.ContainsFunc(cases, func(c string) bool {
		return slices.ContainsFunc(t.rows[c], func(r *row) bool { return r.pinned })
	})
	fmt.Fprintln(w, "\nCPU time per completed session, ms (medians; user + system of all the processes of each):")
	fmt.Fprintln(w, "  total = loadgen + peer + sink (the ceiling's without the sink, which it does not use);")
	if pinned {
		fmt.Fprintln(w, "  ÷ ceiling = total ÷ the ceiling's total; pinned: the peer on CPU 1, loadgen and the sink on CPU 0")
		fmt.Fprintln(w, "  (the backend: the sink on CPU 1); CPU 1 busy = peer × sessions/s, CPU 0 busy = (loadgen + sink)")
		fmt.Fprintln(w, "  × sessions/s: the CPU near 1.00 is the one that bounds sessions/s")
		fmt.Fprintf(w, "%-20s %9s %9s %10s %9s %9s %10s %10s %10s\n",
			"", "peer", "sink", "peer+sink", "loadgen", "total", "÷ ceiling", "CPU 1 busy", "CPU 0 busy")
	} else {
		fmt.Fprintln(w, "  ÷ ceiling = total ÷ the ceiling's total; CPUs busy = total × sessions/s")
		fmt.Fprintf(w, "%-20s %9s %9s %10s %9s %9s %10s %10s\n",
			"", "peer", "sink", "peer+sink", "loadgen", "total", "÷ ceiling", "CPUs busy")
	}
	for _, c := range cases {
		fmt.Fprintf(w, "── %s\n", t.title[c])
		var ceiling *row
		if i := slices.IndexFunc(t.rows[c], func(r *row) bool { return isCeiling(r.peer) && r.cpu != nil }); i >= 0 {
			ceiling = t.rows[c][i]
		}
		for _, r := range t.rows[c] {
			if r.cpu == nil {
				fmt.Fprintf(w, "  %-18s %9s\n", r.peer, "-")
				continue
			}
			ratio := math.NaN()
			if ceiling != nil {
				ratio = r.cpu.total / ceiling.cpu.total
			}
			busy := fmt.Sprintf(" %10s", fmtF(r.cpu.busy))
			if pinned {
				busy = fmt.Sprintf(" %10s %10s", fmtF(r.cpu.busyPeer), fmtF(r.cpu.busyLoad))
			}
			fmt.Fprintf(w, "  %-18s %9s %9s %10s %9s %9s %10s%s\n", r.peer,
				fmtMs(r.cpu.peer), fmtMs(r.cpu.sink), fmtMs(r.cpu.peerSink), fmtMs(r.cpu.loadgen),
				fmtMs(r.cpu.total), fmtRatio(ratio), busy)
		}
	}
}

// resumedSuffix names a case of resumed sessions: the case of full
// handshakes it is compared with, plus this.
const resumedSuffix = "-resumed"

// writeResumption compares each case of resumed sessions (name ending in
// resumedSuffix) with its case of full handshakes: each peer's sessions/s
// in both, the factor resumed ÷ full, and the share of the handshakes of the
// resumed case that the peer let resume (a peer that resumes none is as
// fast as with full handshakes, give or take the client's cache). Nothing
// is written for results without such cases.
func writeResumption(w io.Writer, t *table) {
	header := false
	for _, c := range t.cases {
		full, ok := strings.CutSuffix(c, resumedSuffix)
		if !ok || t.kind[c] != "run" {
			continue
		}
		if !header {
			fmt.Fprintln(w, "\nTLS resumption: sessions/s with resumed sessions (loadgen -resume, one client session")
			fmt.Fprintln(w, "  cache) beside full handshakes (medians); resumed = the share of the resumed case's")
			fmt.Fprintln(w, "  handshakes that the peer let resume, summed over the rounds")
			fmt.Fprintf(w, "%-20s %10s %10s %16s %9s %9s\n", "", "full", "resumed", "resumed ÷ full", "resumed", "peer/edge")
			header = true
		}
		fmt.Fprintf(w, "── %s\n", t.title[c])
		for _, r := range t.rows[c] {
			f := t.find(full, r.peer)
			fv := math.NaN()
			if f != nil {
				fv = f.value
			}
			share := "-"
			if r.handshakes > 0 {
				share = fmtShare(r.resumed, r.handshakes)
			}
			fmt.Fprintf(w, "  %-18s %10s %10s %16s %9s %9s\n",
				r.peer, fmtF(fv), fmtF(r.value), fmtRatio(r.value/fv), share, fmtRatio(t.ratio(c, r)))
		}
	}
}

// fmtShare formats n of total as a percentage; one decimal, so that a few
// resumed handshakes out of thousands do not print as 0 %.
func fmtShare(n, total int) string {
	return fmt.Sprintf("%.1f%%", 100*float64(n)/float64(total))
}

// writeTLS says what TLS each peer negotiated with loadgen.
func writeTLS(w io.Writer, t *table) {
	var tlses []string
	peers := map[string][]string{}
	for _, c := range t.cases {
		for _, r := range t.rows[c] {
			if r.tls == "" || slices.Contains(peers[r.tls], r.peer) {
				continue
			}
			if len(peers[r.tls]) == 0 {
				tlses = append(tlses, r.tls)
			}
			peers[r.tls] = append(peers[r.tls], r.peer)
		}
	}
	if len(tlses) == 0 {
		return
	}
	fmt.Fprintln(w, "\nTLS negotiated:")
	for _, s := range tlses {
		fmt.Fprintf(w, "  %s: %s\n", s, strings.Join(peers[s], ", "))
	}
}

// kinds describes the main figure of each kind of case.
var kinds = map[string]struct{ unit, better, latency string }{
	"run":  {"sessions/s", "higher is better", "per session, ms"},
	"hold": {"KiB per session (RSS at N minus before, ÷ N)", "lower is better", ""},
	"bulk": {"MiB/s", "higher is better", ""},
	"rtt":  {"µs p50 per NOOP", "lower is better", "per NOOP, µs"},
}

func sortedKeys(m map[string]int) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func fmtF(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// fmtMs formats ms of CPU per session: a session costs about a millisecond,
// and the sink's share a tenth of that, so three decimals below 1.
func fmtMs(v float64) string {
	if !math.IsNaN(v) && math.Abs(v) < 1 {
		return fmt.Sprintf("%.3f", v)
	}
	return fmtF(v)
}

func fmtRatio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "-"
	}
	return fmt.Sprintf("%.2f", v)
}

// target is a figure of the table checked against a bound.
type target struct {
	what     string
	c, a, b  string  // case; figure a over figure b (b empty: a alone)
	min, max float64 // bounds (0: none)
	added    bool    // rtt: a minus the backend, in µs
}

// The targets of issue 5, against full handshakes.
var targets5 = []target{
	{what: "STARTTLS c=256 sessions/s, edge ÷ nginx", c: "starttls-c256", a: "edge 587", b: "nginx 587", min: 1.2},
	{what: "STARTTLS c=256 sessions/s, edge ÷ ceiling", c: "starttls-c256", a: "edge 587", b: "ceiling 587", min: 0.9},
	{what: "STARTTLS c=8 sessions/s, edge ÷ nginx", c: "starttls-c8", a: "edge 587", b: "nginx 587", min: 5},
	{what: "implicit c=256 sessions/s, edge ÷ HAProxy", c: "implicit-c256", a: "edge 465", b: "haproxy 465", min: 1.15},
	{what: "implicit c=256 sessions/s, edge ÷ caddy-l4", c: "implicit-c256", a: "edge 465", b: "caddy-l4 465", min: 1.0},
	{what: "implicit c=256 sessions/s, edge ÷ ceiling", c: "implicit-c256", a: "edge 465", b: "ceiling 465", min: 0.9},
	{what: "memory per idle session after TLS, edge 587 (KiB)", c: "hold", a: "edge 587", max: 48},
	{what: "memory per idle session after TLS, edge 465 (KiB)", c: "hold", a: "edge 465", max: 48},
	{what: "25 MiB message MiB/s, edge 465 ÷ caddy-l4", c: "bulk", a: "edge 465", b: "caddy-l4 465", min: 0.9},
	{what: "25 MiB message MiB/s, edge 587 ÷ caddy-l4", c: "bulk", a: "edge 587", b: "caddy-l4 465", min: 0.9},
	{what: "p50 µs added per command vs the backend, edge 587", c: "rtt", a: "edge 587", added: true, max: 200},
	{what: "p50 µs added per command vs the backend, edge 465", c: "rtt", a: "edge 465", added: true, max: 200},
	{what: "the same, everything on one CPU, edge 587", c: "rtt-1cpu", a: "edge 587", added: true, max: 200},
	{what: "the same, everything on one CPU, edge 465", c: "rtt-1cpu", a: "edge 465", added: true, max: 200},
}

// The targets with resumed TLS sessions, each peer with resumption as its
// defaults give it.
var targetsResumed = []target{
	{what: "STARTTLS c=256 resumed sessions/s, edge ÷ nginx", c: "starttls-c256" + resumedSuffix, a: "edge 587", b: "nginx 587", min: 1.1},
	{what: "STARTTLS c=8 resumed sessions/s, edge ÷ nginx", c: "starttls-c8" + resumedSuffix, a: "edge 587", b: "nginx 587", min: 1.1},
	{what: "implicit c=256 resumed sessions/s, edge ÷ HAProxy", c: "implicit-c256" + resumedSuffix, a: "edge 465", b: "haproxy 465", min: 1.1},
	{what: "implicit c=8 resumed sessions/s, edge ÷ HAProxy", c: "implicit-c8" + resumedSuffix, a: "edge 465", b: "haproxy 465", min: 1.1},
}

func writeTargets(w io.Writer, t *table) {
	checkTargets(w, t, "targets of issue 5 (medians of this run):", targets5)
	checkTargets(w, t, "targets with TLS resumption (medians of this run):", targetsResumed)
}

// checkTargets writes the heading and a line for each target whose figures
// the table has: the measured figure, the bound, met or NOT MET. Nothing
// when the table has none of them.
func checkTargets(w io.Writer, t *table, heading string, targets []target) {
	header := false
	for _, tg := range targets {
		a := t.find(tg.c, tg.a)
		if a == nil || math.IsNaN(a.value) {
			continue
		}
		v, bound := a.value, ""
		switch {
		case tg.added:
			be := t.find(tg.c, "backend (plain)")
			if be == nil {
				continue
			}
			v -= be.value
		case tg.b != "":
			b := t.find(tg.c, tg.b)
			if b == nil || math.IsNaN(b.value) || b.value == 0 {
				continue
			}
			v /= b.value
		}
		ok := true
		if tg.min != 0 {
			ok, bound = v >= tg.min, fmt.Sprintf("≥ %g", tg.min)
		}
		if tg.max != 0 {
			ok, bound = v <= tg.max, fmt.Sprintf("≤ %g", tg.max)
		}
		verdict := "met"
		if !ok {
			verdict = "NOT MET"
		}
		if !header {
			fmt.Fprintln(w, "\n"+heading)
			header = true
		}
		fmt.Fprintf(w, "  %-52s %8s  (target %s)  %s\n", tg.what, fmtF(v), bound, verdict)
	}
}
