package main

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReport(t *testing.T) {
	const input = `
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"edge 587","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":1200,"p50_ms":10,"p99_ms":20,"tls":{"version":"TLS 1.3","cipher":"TLS_AES_128_GCM_SHA256","curve":"X25519"}}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"nginx 587","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":1000,"p50_ms":12,"p99_ms":25,"errors":2,"error_kinds":{"tls: timeout":2}}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"edge 587","base":"edge 587","round":2,"result":{"mode":"run","sessions_per_s":1300,"p50_ms":11,"p99_ms":21}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"nginx 587","base":"edge 587","round":2,"result":{"mode":"run","sessions_per_s":1000,"p50_ms":12,"p99_ms":25}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"edge 587","base":"edge 587","round":3,"result":{"mode":"run","sessions_per_s":1250,"p50_ms":10,"p99_ms":20}}
{"case":"hold","title":"hold","peer":"edge 587","base":"edge 587","round":1,"result":{"mode":"hold","held":1000,"noop_ok":1000},"rss_before_kib":10000,"rss_after_kib":50000}
{"case":"rtt","title":"rtt","peer":"edge 587","base":"edge 587","round":1,"result":{"mode":"rtt","p50_us":150,"p99_us":300}}
{"case":"rtt","title":"rtt","peer":"backend (plain)","base":"edge 587","round":1,"result":{"mode":"rtt","p50_us":60,"p99_us":100}}
{"case":"bulk","title":"bulk","peer":"stunnel 465","base":"edge 465","round":1,"failed":"tls: reset"}
`
	recs, err := read(strings.NewReader(input))
	if err != nil {
		t.Fatal(err)
	}
	tb := summarize(recs)
	if r := tb.find("starttls-c256", "edge 587"); r.value != 1250 || r.lo != 1200 || r.hi != 1300 || r.rounds != 3 {
		t.Errorf("edge: %+v, want the median 1250 of three rounds", r)
	}
	if r := tb.find("hold", "edge 587"); r.value != 40 {
		t.Errorf("hold: %v KiB per session, want 40", r.value)
	}
	var b strings.Builder
	write(&b, tb)
	out := b.String()
	for _, want := range []string{
		"nginx 587                1000",    // the median
		"0.80",                             // nginx ÷ edge
		"2× tls: timeout",                  // error kinds
		"adds +90.0 µs p50 to the backend", // rtt
		"1 of 1 rounds failed: tls: reset", // a failed run
		"edge ÷ nginx                  1.25  (target ≥ 1.2)  met", // targets
		"edge 587 (KiB)        40.0  (target ≤ 48)  met",
		"backend, edge 587        90.0  (target ≤ 200)  met",
		"── bulk  [MiB/s; higher is better]",
		"TLS 1.3 TLS_AES_128_GCM_SHA256 X25519: edge 587",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestReportCPU(t *testing.T) {
	// three rounds of the edge, one of them from before compare.sh measured
	// CPU time; nginx; the ceiling, whose sink figure is idle and left out
	// of its total; the backend, which is the sink and has no sink figure
	const input = `
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"edge 587","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":1000,"sessions":10000},"cpu_ms_per_session":{"peer":0.6,"sink":0.2,"loadgen":0.9}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"edge 587","base":"edge 587","round":2,"result":{"mode":"run","sessions_per_s":1200,"sessions":12000},"cpu_ms_per_session":{"peer":0.5,"sink":0.1,"loadgen":0.8}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"edge 587","base":"edge 587","round":3,"result":{"mode":"run","sessions_per_s":1100,"sessions":11000}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"nginx 587","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":1000,"sessions":10000},"cpu_ms_per_session":{"peer":0.7,"sink":0.25,"loadgen":0.85}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"ceiling 587","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":2000,"sessions":20000},"cpu_ms_per_session":{"peer":0.4,"sink":0.01,"loadgen":0.6}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"backend (plain)","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":8000,"sessions":80000},"cpu_ms_per_session":{"peer":0.1,"loadgen":0.15}}
{"case":"starttls-c256","title":"STARTTLS c=256","peer":"stunnel 587","base":"edge 587","round":1,"failed":"tls: reset"}
{"case":"hold","title":"hold","peer":"edge 587","base":"edge 587","round":1,"result":{"mode":"hold","held":1000,"noop_ok":1000},"rss_before_kib":10000,"rss_after_kib":50000}
`
	recs, err := read(strings.NewReader(input))
	if err != nil {
		t.Fatal(err)
	}
	tb := summarize(recs)
	edge := tb.find("starttls-c256", "edge 587")
	if edge.value != 1100 || edge.cpu == nil {
		t.Fatalf("edge: %+v, want 1100 sessions/s over three rounds and CPU times from two", edge)
	}
	// medians of two rounds; the sums per round, then their median
	if c := edge.cpu; !near(c.peer, 0.55) || !near(c.sink, 0.15) || !near(c.loadgen, 0.85) ||
		!near(c.peerSink, 0.7) || !near(c.total, 1.55) || !near(c.busy, (1.7*1.0+1.4*1.2)/2) {
		t.Errorf("edge CPU: %+v", *c)
	}
	if c := tb.find("starttls-c256", "ceiling 587").cpu; !near(c.total, 1.0) || !near(c.sink, 0.01) {
		t.Errorf("ceiling CPU: %+v, want a total of loadgen and ceiling only", *c)
	}
	if c := tb.find("starttls-c256", "backend (plain)").cpu; !math.IsNaN(c.sink) || !near(c.total, 0.25) {
		t.Errorf("backend CPU: %+v, want no sink figure beside the peer", *c)
	}
	if tb.find("hold", "edge 587").cpu != nil {
		t.Error("hold has CPU times")
	}
	var b strings.Builder
	write(&b, tb)
	out := b.String()
	for _, want := range []string{
		"CPU time per completed session, ms",
		"── STARTTLS c=256\n",
		//  peer      sink  peer+sink  loadgen    total  ÷ ceiling  CPUs busy
		"  edge 587               0.550     0.150      0.700     0.850      1.55       1.55       1.69\n",
		"  nginx 587              0.700     0.250      0.950     0.850      1.80       1.80       1.80\n",
		"  ceiling 587            0.400     0.010      0.400     0.600      1.00       1.00       2.00\n",
		"  backend (plain)        0.100         -      0.100     0.150     0.250       0.25       2.00\n",
		"  stunnel 587                -\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

// TestReprint: the committed raw results, which have no CPU times, still
// reprint the committed table exactly.
func TestReprint(t *testing.T) {
	files, err := filepath.Glob("../results-*.jsonl")
	if err != nil || len(files) == 0 {
		t.Skip("no committed results")
	}
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		recs, err := read(f)
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var b strings.Builder
		write(&b, summarize(recs))
		txt, err := os.ReadFile(strings.TrimSuffix(name, ".jsonl") + ".txt")
		if err != nil {
			t.Logf("%s: no table beside it: %v", name, err)
			continue
		}
		if !strings.Contains(string(txt), b.String()) {
			t.Errorf("%s does not reprint its table; the report says:\n%s", name, b.String())
		}
	}
}

func TestReportResumption(t *testing.T) {
	// full handshakes (counted, none resumed) and resumed sessions over two
	// rounds; caddy-l4 resumes none; an old record without the counts
	const input = `
{"case":"implicit-c256","title":"implicit c=256","peer":"edge 465","base":"edge 465","round":1,"result":{"mode":"run","sessions_per_s":2000,"handshakes":20000,"resumed":0,"resumed_share":0}}
{"case":"implicit-c256","title":"implicit c=256","peer":"haproxy 465","base":"edge 465","round":1,"result":{"mode":"run","sessions_per_s":1900}}
{"case":"implicit-c256","title":"implicit c=256","peer":"caddy-l4 465","base":"edge 465","round":1,"result":{"mode":"run","sessions_per_s":2100,"handshakes":21000,"resumed":0,"resumed_share":0}}
{"case":"implicit-c256-resumed","title":"implicit c=256 resumed","peer":"edge 465","base":"edge 465","round":1,"result":{"mode":"run","sessions_per_s":3000,"resume":true,"handshakes":30000,"resumed":29744,"resumed_share":0.99}}
{"case":"implicit-c256-resumed","title":"implicit c=256 resumed","peer":"edge 465","base":"edge 465","round":2,"result":{"mode":"run","sessions_per_s":3200,"resume":true,"handshakes":10000,"resumed":9744,"resumed_share":0.97}}
{"case":"implicit-c256-resumed","title":"implicit c=256 resumed","peer":"haproxy 465","base":"edge 465","round":1,"result":{"mode":"run","sessions_per_s":2800,"resume":true,"handshakes":28000,"resumed":27744,"resumed_share":0.99}}
{"case":"implicit-c256-resumed","title":"implicit c=256 resumed","peer":"caddy-l4 465","base":"edge 465","round":1,"result":{"mode":"run","sessions_per_s":2050,"resume":true,"handshakes":20500,"resumed":0,"resumed_share":0}}
{"case":"starttls-c256-resumed","title":"STARTTLS c=256 resumed","peer":"edge 587","base":"edge 587","round":1,"result":{"mode":"run","sessions_per_s":3000,"resume":true,"handshakes":30000,"resumed":29744}}
{"case":"starttls-c256-resumed","title":"STARTTLS c=256 resumed","peer":"nginx 587","base":"edge 587","round":1,"failed":"tls: reset"}
`
	recs, err := read(strings.NewReader(input))
	if err != nil {
		t.Fatal(err)
	}
	tb := summarize(recs)
	if r := tb.find("implicit-c256-resumed", "edge 465"); r.value != 3100 || r.handshakes != 40000 || r.resumed != 39488 || !r.resume {
		t.Errorf("edge resumed: %+v, want the median 3100 and the handshakes of both rounds", r)
	}
	var b strings.Builder
	write(&b, tb)
	out := b.String()
	for _, want := range []string{
		// the main table: the share where the run offered to resume, none
		// in the full-handshake case
		"resumed 98.7% of 40000 handshakes",
		"  caddy-l4 465             2050      0.00      0.00                0      0.66  resumed 0.0% of 20500 handshakes\n",
		"  edge 465                 2000      0.00      0.00                0      1.00  \n",
		// resumed ÷ full, the share, the ratio to the edge
		"TLS resumption: sessions/s with resumed sessions",
		"── implicit c=256 resumed\n",
		"  edge 465                 2000       3100             1.55     98.7%      1.00\n",
		"  haproxy 465              1900       2800             1.47     99.1%      0.90\n",
		"  caddy-l4 465             2100       2050             0.98      0.0%      0.66\n",
		"  edge 587                    -       3000                -     99.1%      1.00\n",
		"  nginx 587                   -          -                -         -         -\n",
		// the targets with resumption: the one with both figures
		"targets with TLS resumption (medians of this run):\n" +
			"  implicit c=256 resumed sessions/s, edge ÷ HAProxy        1.11  (target ≥ 1.1)  met\n",
		"implicit c=256 sessions/s, edge ÷ HAProxy                1.05  (target ≥ 1.15)  NOT MET",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "STARTTLS c=256 resumed sessions/s, edge ÷ nginx") {
		t.Errorf("a target without the peer's figure is checked:\n%s", out)
	}
}

func TestReportPinned(t *testing.T) {
	const input = `
{"case":"implicit-c256","title":"implicit c=256","peer":"edge 465","base":"edge 465","round":1,"pinned":true,"result":{"mode":"run","sessions_per_s":2000,"sessions":20000},"cpu_ms_per_session":{"peer":0.4,"sink":0.1,"loadgen":0.4}}
{"case":"implicit-c256","title":"implicit c=256","peer":"ceiling 465","base":"edge 465","round":1,"pinned":true,"result":{"mode":"run","sessions_per_s":2500,"sessions":25000},"cpu_ms_per_session":{"peer":0.3,"sink":0.004,"loadgen":0.38}}
{"case":"implicit-c256","title":"implicit c=256","peer":"backend (plain)","base":"edge 465","round":1,"pinned":true,"result":{"mode":"run","sessions_per_s":8000,"sessions":80000},"cpu_ms_per_session":{"peer":0.08,"loadgen":0.1}}
`
	recs, err := read(strings.NewReader(input))
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	write(&b, summarize(recs))
	out := b.String()
	for _, want := range []string{
		"pinned: the peer on CPU 1, loadgen and the sink on CPU 0",
		"CPU 1 busy CPU 0 busy\n",
		//  peer      sink  peer+sink  loadgen    total  ÷ ceiling  CPU 1  CPU 0
		"  edge 465               0.400     0.100      0.500     0.400     0.900       1.32       0.80       1.00\n",
		// the ceiling's sink idles, on CPU 0 all the same
		"  ceiling 465            0.300     0.004      0.300     0.380     0.680       1.00       0.75       0.96\n",
		"  backend (plain)        0.080         -      0.080     0.100     0.180       0.26       0.64       0.80\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}
