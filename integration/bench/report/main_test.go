package main

import (
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
