package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// errorBackoff is how long a run worker waits after a failed session, so that
// a server refusing connections does not turn the generator into a busy loop.
const errorBackoff = 10 * time.Millisecond

// sigRelease ends a hold early, as SIGINT and SIGTERM also do.
const sigRelease = syscall.SIGUSR1

// errorCounts counts errors by kind and keeps the first one of each kind as an
// example.
type errorCounts struct {
	kinds    map[string]int
	examples map[string]string
}

func (e *errorCounts) add(err error) {
	if e.kinds == nil {
		e.kinds, e.examples = make(map[string]int), make(map[string]string)
	}
	k := errorKind(err)
	if e.kinds[k] == 0 {
		e.examples[k] = err.Error()
	}
	e.kinds[k]++
}

func (e *errorCounts) merge(o errorCounts) {
	for k, n := range o.kinds {
		if e.kinds == nil {
			e.kinds, e.examples = make(map[string]int), make(map[string]string)
		}
		if e.kinds[k] == 0 {
			e.examples[k] = o.examples[k]
		}
		e.kinds[k] += n
	}
}

func (e *errorCounts) total() int {
	n := 0
	for _, c := range e.kinds {
		n += c
	}
	return n
}

// logExamples writes one example of each kind of error.
func (e *errorCounts) logExamples(w io.Writer) {
	for _, k := range slices.Sorted(maps.Keys(e.kinds)) {
		fmt.Fprintf(w, "loadgen: %d× %s, e.g. %s\n", e.kinds[k], k, e.examples[k])
	}
}

func formatKinds(kinds map[string]int) string {
	if len(kinds) == 0 {
		return ""
	}
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(kinds)) {
		fmt.Fprintf(&b, "\n  %6d  %s", kinds[k], k)
	}
	return b.String()
}

// runResult is the report of the run mode.
type runResult struct {
	Mode           string         `json:"mode"`
	TLSMode        string         `json:"tls_mode"`
	Addr           string         `json:"addr"`
	Concurrency    int            `json:"concurrency"`
	BodyBytes      int            `json:"body_bytes"`
	Seconds        float64        `json:"seconds"`
	Sessions       int            `json:"sessions"`
	Messages       int            `json:"messages"`
	SessionsPerSec float64        `json:"sessions_per_s"`
	MessagesPerSec float64        `json:"messages_per_s"`
	P50ms          float64        `json:"p50_ms"`
	P99ms          float64        `json:"p99_ms"`
	Errors         int            `json:"errors"`
	ErrorKinds     map[string]int `json:"error_kinds,omitempty"`
	TLS            *tlsInfo       `json:"tls,omitempty"`
	// Resume is -resume: the run offered the sessions it had to resume.
	Resume bool `json:"resume,omitempty"`
	// the TLS handshakes of the run, absent without TLS
	*HandshakeCount
}

// HandshakeCount counts the TLS handshakes of a run and how many of them
// resumed a session, so that a table can show which servers resumed. A
// handshake counts when its session got as far as the EHLO after it,
// whether the session then succeeded or not.
type HandshakeCount struct {
	Handshakes   int     `json:"handshakes"`
	Resumed      int     `json:"resumed"`
	ResumedShare float64 `json:"resumed_share"` // resumed ÷ handshakes, 0 when there were none
}

func (h *HandshakeCount) count(state *tls.ConnectionState) {
	h.Handshakes++
	if state.DidResume {
		h.Resumed++
	}
}

func (h *HandshakeCount) add(o HandshakeCount) {
	h.Handshakes += o.Handshakes
	h.Resumed += o.Resumed
	if h.Handshakes > 0 {
		h.ResumedShare = float64(h.Resumed) / float64(h.Handshakes)
	}
}

func (r *runResult) String() string {
	hs := ""
	if r.HandshakeCount != nil {
		hs = fmt.Sprintf("handshakes %8d  resumed %d (%.1f%%)\n", r.Handshakes, r.Resumed, 100*r.ResumedShare)
	}
	return fmt.Sprintf("%s %s, concurrency %d, %d-byte messages, %.1fs: TLS %v\n"+
		"sessions   %8d  %10.1f/s   latency p50 %.2f ms, p99 %.2f ms\n"+
		"messages   %8d  %10.1f/s\n"+
		"%s"+
		"errors     %8d%s\n",
		r.TLSMode, r.Addr, r.Concurrency, r.BodyBytes, r.Seconds, r.TLS,
		r.Sessions, r.SessionsPerSec, r.P50ms, r.P99ms,
		r.Messages, r.MessagesPerSec,
		hs,
		r.Errors, formatKinds(r.ErrorKinds))
}

// runLoad runs sessions of msgs messages each from c workers until d has
// passed; a session under way at the end is finished and counted.
func runLoad(t target, c int, d time.Duration, msgs int, body []byte, stderr io.Writer) *runResult {
	type worker struct {
		latencies []time.Duration
		messages  int
		errs      errorCounts
		tls       *tls.ConnectionState
		hs        HandshakeCount
	}
	workers := make([]worker, c)
	start := time.Now()
	end := start.Add(d)
	var wg sync.WaitGroup
	for i := range workers {
		w := &workers[i]
		wg.Go(func() {
			for time.Now().Before(end) {
				began := time.Now()
				sent, state, err := t.session(msgs, body)
				w.messages += sent
				if state != nil {
					w.tls = state
					w.hs.count(state)
				}
				if err != nil {
					w.errs.add(err)
					time.Sleep(errorBackoff)
					continue
				}
				w.latencies = append(w.latencies, time.Since(began))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()

	r := &runResult{Mode: "run", TLSMode: t.mode, Addr: t.addr, Concurrency: c, BodyBytes: len(body), Seconds: elapsed,
		Resume: t.tls != nil && t.tls.ClientSessionCache != nil}
	if t.mode != modePlain {
		r.HandshakeCount = new(HandshakeCount)
	}
	var all []time.Duration
	var errs errorCounts
	for _, w := range workers {
		all = append(all, w.latencies...)
		r.Messages += w.messages
		errs.merge(w.errs)
		if r.HandshakeCount != nil {
			r.HandshakeCount.add(w.hs)
		}
		if w.tls != nil {
			r.TLS = describeTLS(w.tls)
		}
	}
	slices.Sort(all)
	r.Sessions = len(all)
	r.SessionsPerSec = float64(r.Sessions) / elapsed
	r.MessagesPerSec = float64(r.Messages) / elapsed
	r.P50ms = ms(percentile(all, 0.50))
	r.P99ms = ms(percentile(all, 0.99))
	r.Errors, r.ErrorKinds = errs.total(), errs.kinds
	errs.logExamples(stderr)
	return r
}

// session runs one complete session and says how many messages got 250.
func (t *target) session(msgs int, body []byte) (sent int, state *tls.ConnectionState, err error) {
	s, err := t.open()
	if err != nil {
		return 0, nil, err
	}
	for range msgs {
		if err := s.send(t, body); err != nil {
			s.conn.Close()
			return sent, s.tls, err
		}
		sent++
	}
	return sent, s.tls, s.quit()
}

// percentile is the nearest-rank percentile of sorted durations.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// holdResult is the report of the hold mode.
type holdResult struct {
	Mode        string         `json:"mode"`
	TLSMode     string         `json:"tls_mode"`
	Addr        string         `json:"addr"`
	Wanted      int            `json:"wanted"`
	Held        int            `json:"held"`
	OpenSeconds float64        `json:"open_seconds"`
	Errors      int            `json:"errors"`
	ErrorKinds  map[string]int `json:"error_kinds,omitempty"`
	Checked     bool           `json:"checked"`
	NoopOK      int            `json:"noop_ok"`
	NoopErrors  map[string]int `json:"noop_error_kinds,omitempty"`
	TLS         *tlsInfo       `json:"tls,omitempty"`
}

func (r *holdResult) String() string {
	s := fmt.Sprintf("%s %s: held %d of %d sessions (opened in %.1fs), TLS %v\nerrors %d%s\n",
		r.TLSMode, r.Addr, r.Held, r.Wanted, r.OpenSeconds, r.TLS, r.Errors, formatKinds(r.ErrorKinds))
	if r.Checked {
		s += fmt.Sprintf("answered NOOP at the end: %d of %d%s\n", r.NoopOK, r.Held, formatKinds(r.NoopErrors))
	}
	return s
}

// hold opens n sessions, c at a time, up to the EHLO after TLS, and keeps
// them open, with no deadline, until wait has passed or a SIGUSR1, SIGINT or
// SIGTERM arrives. Once all are open (or failed) it writes the number held to
// readyFile, if given, and a line to stderr. With check, every held session
// must then answer NOOP.
func hold(t target, n, c int, readyFile string, wait time.Duration, check bool, stderr io.Writer) (*holdResult, error) {
	release := make(chan os.Signal, 1)
	signal.Notify(release, sigRelease, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(release)

	r := &holdResult{Mode: "hold", TLSMode: t.mode, Addr: t.addr, Wanted: n, Checked: check}
	held, errs := openMany(t, n, c)
	r.Held = len(held.sessions)
	r.OpenSeconds = held.seconds
	r.Errors, r.ErrorKinds = errs.total(), errs.kinds
	errs.logExamples(stderr)
	if len(held.sessions) > 0 {
		r.TLS = describeTLS(held.sessions[0].tls)
	}
	for _, s := range held.sessions {
		s.conn.SetDeadline(time.Time{})
	}

	if readyFile != "" {
		if err := writeReady(readyFile, r.Held); err != nil {
			for _, s := range held.sessions {
				s.conn.Close()
			}
			return nil, err
		}
	}
	fmt.Fprintf(stderr, "loadgen: holding %d sessions\n", r.Held)
	timer := time.NewTimer(wait)
	select {
	case <-release:
	case <-timer.C:
	}
	timer.Stop()

	if check {
		var noopErrs errorCounts
		r.NoopOK, noopErrs = forEach(held.sessions, c, func(s *session) error {
			s.conn.SetDeadline(time.Now().Add(t.timeout))
			return s.cmd("noop", "NOOP", 250)
		})
		r.NoopErrors = noopErrs.kinds
		noopErrs.logExamples(stderr)
	}
	for _, s := range held.sessions {
		s.conn.Close()
	}
	return r, nil
}

// writeReady writes the count to file in one step (a reader never sees it
// half written).
func writeReady(file string, count int) error {
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(count)+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

type opened struct {
	sessions []*session
	seconds  float64
}

// openMany opens n sessions from c workers.
func openMany(t target, n, c int) (opened, errorCounts) {
	var next atomic.Int64
	var mu sync.Mutex
	var res opened
	var errs errorCounts
	start := time.Now()
	var wg sync.WaitGroup
	for range min(c, n) {
		wg.Go(func() {
			var mine []*session
			var myErrs errorCounts
			for next.Add(1) <= int64(n) {
				s, err := t.open()
				if err != nil {
					myErrs.add(err)
					continue
				}
				mine = append(mine, s)
			}
			mu.Lock()
			res.sessions = append(res.sessions, mine...)
			errs.merge(myErrs)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.seconds = time.Since(start).Seconds()
	return res, errs
}

// forEach runs f on every session from c workers and counts the successes.
func forEach(sessions []*session, c int, f func(*session) error) (int, errorCounts) {
	var next atomic.Int64
	var mu sync.Mutex
	ok := 0
	var errs errorCounts
	var wg sync.WaitGroup
	for range min(c, len(sessions)) {
		wg.Go(func() {
			myOK := 0
			var myErrs errorCounts
			for i := next.Add(1) - 1; i < int64(len(sessions)); i = next.Add(1) - 1 {
				if err := f(sessions[i]); err != nil {
					myErrs.add(err)
					continue
				}
				myOK++
			}
			mu.Lock()
			ok += myOK
			errs.merge(myErrs)
			mu.Unlock()
		})
	}
	wg.Wait()
	return ok, errs
}

// bulkResult is the report of the bulk mode.
type bulkResult struct {
	Mode           string   `json:"mode"`
	TLSMode        string   `json:"tls_mode"`
	Addr           string   `json:"addr"`
	Bytes          int      `json:"bytes"`
	Messages       int      `json:"messages"`
	MiBPerSec      float64  `json:"mib_per_s"`      // the median message
	BestMiBPerSec  float64  `json:"best_mib_per_s"` // the fastest message
	SessionSeconds float64  `json:"session_seconds"`
	TLS            *tlsInfo `json:"tls,omitempty"`
}

func (r *bulkResult) String() string {
	return fmt.Sprintf("%s %s: %d message(s) of %d bytes, from DATA to the 250 after the dot: median %.1f MiB/s, best %.1f MiB/s (whole session %.3fs), TLS %v\n",
		r.TLSMode, r.Addr, r.Messages, r.Bytes, r.MiBPerSec, r.BestMiBPerSec, r.SessionSeconds, r.TLS)
}

// bulk sends n messages with body in one session, and times each from the
// DATA command to the reply after the final dot.
func bulk(t target, body []byte, n int) (*bulkResult, error) {
	start := time.Now()
	s, err := t.open()
	if err != nil {
		return nil, err
	}
	defer s.conn.Close()
	times := make([]time.Duration, n)
	for i := range times {
		if err := s.cmd("mail", "MAIL FROM:<"+t.from+">", 250); err != nil {
			return nil, err
		}
		if err := s.cmd("rcpt", "RCPT TO:<"+t.to+">", 250); err != nil {
			return nil, err
		}
		began := time.Now()
		if err := s.data(body); err != nil {
			return nil, err
		}
		times[i] = time.Since(began)
	}
	if err := s.quit(); err != nil {
		return nil, err
	}
	slices.Sort(times)
	rate := func(d time.Duration) float64 { return float64(len(body)) / (1 << 20) / d.Seconds() }
	return &bulkResult{
		Mode: "bulk", TLSMode: t.mode, Addr: t.addr, Bytes: len(body), Messages: n,
		MiBPerSec:      rate(percentile(times, 0.5)),
		BestMiBPerSec:  rate(times[0]),
		SessionSeconds: time.Since(start).Seconds(),
		TLS:            describeTLS(s.tls),
	}, nil
}

// rttResult is the report of the rtt mode.
type rttResult struct {
	Mode    string   `json:"mode"`
	TLSMode string   `json:"tls_mode"`
	Addr    string   `json:"addr"`
	Count   int      `json:"count"`
	P50us   float64  `json:"p50_us"`
	P99us   float64  `json:"p99_us"`
	MeanUs  float64  `json:"mean_us"`
	MinUs   float64  `json:"min_us"`
	TLS     *tlsInfo `json:"tls,omitempty"`
}

func (r *rttResult) String() string {
	return fmt.Sprintf("%s %s: %d NOOP round trips: p50 %.1f µs, p99 %.1f µs, mean %.1f µs, min %.1f µs, TLS %v\n",
		r.TLSMode, r.Addr, r.Count, r.P50us, r.P99us, r.MeanUs, r.MinUs, r.TLS)
}

// rtt opens one session, starts a transaction (MAIL and RCPT: a proxy that
// answers the dialogue itself until then, as nginx does, relays from there
// on), and times n NOOP round trips after 100 untimed ones.
func rtt(t target, n int) (*rttResult, error) {
	s, err := t.open()
	if err != nil {
		return nil, err
	}
	defer s.conn.Close()
	if err := s.cmd("mail", "MAIL FROM:<"+t.from+">", 250); err != nil {
		return nil, err
	}
	if err := s.cmd("rcpt", "RCPT TO:<"+t.to+">", 250); err != nil {
		return nil, err
	}
	for range 100 {
		if err := s.cmd("noop", "NOOP", 250); err != nil {
			return nil, err
		}
	}
	times := make([]time.Duration, n)
	var sum time.Duration
	for i := range times {
		began := time.Now()
		if err := s.cmd("noop", "NOOP", 250); err != nil {
			return nil, err
		}
		times[i] = time.Since(began)
		sum += times[i]
	}
	if err := s.cmd("rset", "RSET", 250); err != nil {
		return nil, err
	}
	if err := s.quit(); err != nil {
		return nil, err
	}
	slices.Sort(times)
	return &rttResult{
		Mode: "rtt", TLSMode: t.mode, Addr: t.addr, Count: n,
		P50us:  us(percentile(times, 0.50)),
		P99us:  us(percentile(times, 0.99)),
		MeanUs: us(sum / time.Duration(n)),
		MinUs:  us(times[0]),
		TLS:    describeTLS(s.tls),
	}, nil
}
