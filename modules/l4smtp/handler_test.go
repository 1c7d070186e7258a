package l4smtp

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestSetupDefaults(t *testing.T) {
	h := &Handler{Hostnames: []string{"Mail.Example.com."}}
	names, err := h.setup()
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 1 || names[0] != "mail.example.com" || h.hostname != "mail.example.com" {
		t.Errorf("names %q, hostname %q", names, h.hostname)
	}
	if string(h.greeting) != "220 mail.example.com ESMTP\r\n" {
		t.Errorf("greeting %q", h.greeting)
	}
	if h.timeout.command != time.Minute || h.timeout.handshake != 10*time.Second || h.timeout.backend != 30*time.Second || h.timeout.idle != 10*time.Minute {
		t.Errorf("timeouts %v %v %v %v", h.timeout.command, h.timeout.handshake, h.timeout.backend, h.timeout.idle)
	}
	if h.maxErrors != 5 {
		t.Errorf("max errors %d", h.maxErrors)
	}
	if h.route.pool != nil {
		t.Errorf("backends %v; want none", h.route.pool)
	}
}

func TestSetupBackends(t *testing.T) {
	t.Setenv("SMTP_EDGE_TEST_BACKEND", "10.0.0.5:10587")
	h := &Handler{
		Hostnames:      []string{"m.example"},
		BackendOptions: BackendOptions{ProxyProtocol: "v1", Backends: []string{"127.0.0.1:10025", "{env.SMTP_EDGE_TEST_BACKEND}", "[::1]:25", "unix//run/mta.sock"}},
	}
	if _, err := h.setup(); err != nil {
		t.Fatal(err)
	}
	want := "[{tcp 127.0.0.1:10025} {tcp 10.0.0.5:10587} {tcp [::1]:25} {unix /run/mta.sock}]"
	if got := fmt.Sprint(h.route.pool.addrs()); got != want || h.route.pool.proxyProtocol != 1 {
		t.Errorf("backends %s, proxy protocol %d; want %s, 1", got, h.route.pool.proxyProtocol, want)
	}
}

// The long form's defaults: policy first, weight 1, checks every 30s
// within 5s, rise and fall 1, passive fail_duration 30s.
func TestSetupUpstreamDefaults(t *testing.T) {
	h := &Handler{
		Hostnames:      []string{"m.example"},
		BackendOptions: BackendOptions{ProxyProtocol: "v2", Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:10025"}}, {Dial: []string{"127.0.0.1:10026"}, Weight: 3}}, HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{}, Passive: &PassiveHealthChecks{}}},
	}
	if _, err := h.setup(); err != nil {
		t.Fatal(err)
	}
	defer h.route.pool.close()
	p := h.route.pool
	a := p.active
	if p.policy != "first" || p.upstreams[0].weight != 1 || p.upstreams[1].weight != 3 || p.proxyProtocol != 2 ||
		p.failDuration != 30*time.Second || a.interval != 30*time.Second || a.timeout != 5*time.Second ||
		a.rise != 1 || a.fall != 1 || a.ehlo != "health-check.m.example" {
		t.Errorf("pool %+v, checks %+v", p, a)
	}
}

func TestSetupPlaceholders(t *testing.T) {
	t.Setenv("SMTP_EDGE_TEST_HOST", "mx.example.net")
	h := &Handler{Hostnames: []string{"{env.SMTP_EDGE_TEST_HOST}"}, Greeting: "{env.SMTP_EDGE_TEST_HOST} ready"}
	if _, err := h.setup(); err != nil {
		t.Fatal(err)
	}
	if string(h.greeting) != "220 mx.example.net mx.example.net ready\r\n" {
		t.Errorf("greeting %q", h.greeting)
	}
}

func TestSetupErrors(t *testing.T) {
	tests := []struct {
		name string
		h    Handler
		want string
	}{
		{"no hostname", Handler{}, "at least one hostname"},
		{"empty hostname", Handler{Hostnames: []string{""}}, "empty hostname"},
		{"wildcard", Handler{Hostnames: []string{"*.example.com"}}, "wildcards"},
		{"space in hostname", Handler{Hostnames: []string{"mail example.com"}}, "invalid character"},
		{"CRLF in hostname", Handler{Hostnames: []string{"mail.example.com\r\n250 x"}}, "invalid character"},
		{"unicode hostname", Handler{Hostnames: []string{"mäil.example.com"}}, "xn--"},
		{"CRLF in greeting", Handler{Hostnames: []string{"m.example"}, Greeting: "hi\r\n250 x"}, "single line"},
		{"negative max_errors", Handler{Hostnames: []string{"m.example"}, MaxErrors: -1}, "max_errors"},
		{"backend without a port", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{Backends: []string{"127.0.0.1"}}}, `backend "127.0.0.1"`},
		{"backend port range", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:25-26"}}}, "exactly one port"},
		{"backend without a host", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{Backends: []string{":25"}}}, "needs a host"},
		{"udp backend", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{Backends: []string{"udp/127.0.0.1:25"}}}, "cannot carry SMTP"},
		{"proxy_protocol without backend", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{ProxyProtocol: "v2"}}, "set proxy_protocol there"},
		{"proxy_protocol v3", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:25"}, ProxyProtocol: "v3"}}, "v1 or v2"},
		{"backends and upstreams", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:25"}, Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:26"}}}},
		}, "not both"},
		{"backends and load_balancing", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:25"}, LoadBalancing: &LoadBalancing{Policy: "random"}},
		}, "not both"},
		{"health_checks without upstreams", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{HealthChecks: &HealthChecks{Passive: &PassiveHealthChecks{}}},
		}, "need upstreams"},
		{"upstream with two addresses", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25", "127.0.0.1:26"}}}},
		}, "exactly one address"},
		{"upstream without an address", Handler{Hostnames: []string{"m.example"}, BackendOptions: BackendOptions{Upstreams: []*Upstream{{}}}}, "exactly one address"},
		{"upstream twice", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25"}}, {Dial: []string{"127.0.0.1:25"}}}},
		}, "named twice"},
		{"negative weight", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25"}, Weight: -1}}},
		}, "weight must not be negative"},
		{"bad upstream address", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"udp/127.0.0.1:25"}}}},
		}, "cannot carry SMTP"},
		{"unknown policy", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25"}}}, LoadBalancing: &LoadBalancing{Policy: "weighted_round_robin"}},
		}, "policy must be"},
		{"negative health interval", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25"}}}, HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{Interval: -1}}},
		}, "must not be negative"},
		{"negative rise", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25"}}}, HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{Rise: -1}}},
		}, "rise and fall must not be negative"},
		{"negative fail_duration", Handler{
			Hostnames:      []string{"m.example"},
			BackendOptions: BackendOptions{Upstreams: []*Upstream{{Dial: []string{"127.0.0.1:25"}}}, HealthChecks: &HealthChecks{Passive: &PassiveHealthChecks{FailDuration: -1}}},
		}, "fail_duration must not be negative"},
		{"negative timeout", Handler{Hostnames: []string{"m.example"}, Timeouts: Timeouts{Idle: caddy.Duration(-time.Second)}}, "idle must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.h.setup()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}
