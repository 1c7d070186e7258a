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
	if h.pool != nil || h.proxyProtocol != 0 {
		t.Errorf("backends %v, proxy protocol %d; want none", h.pool, h.proxyProtocol)
	}
}

func TestSetupBackends(t *testing.T) {
	t.Setenv("SMTP_EDGE_TEST_BACKEND", "10.0.0.5:10587")
	h := &Handler{Hostnames: []string{"m.example"}, ProxyProtocol: "v1",
		Backends: []string{"127.0.0.1:10025", "{env.SMTP_EDGE_TEST_BACKEND}", "[::1]:25", "unix//run/mta.sock"}}
	if _, err := h.setup(); err != nil {
		t.Fatal(err)
	}
	want := "[{tcp 127.0.0.1:10025} {tcp 10.0.0.5:10587} {tcp [::1]:25} {unix /run/mta.sock}]"
	if got := fmt.Sprint(h.pool.addrs()); got != want || h.proxyProtocol != 1 {
		t.Errorf("backends %s, proxy protocol %d; want %s, 1", got, h.proxyProtocol, want)
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
		{"backend without a port", Handler{Hostnames: []string{"m.example"}, Backends: []string{"127.0.0.1"}}, `backend "127.0.0.1"`},
		{"backend port range", Handler{Hostnames: []string{"m.example"}, Backends: []string{"127.0.0.1:25-26"}}, "exactly one port"},
		{"backend without a host", Handler{Hostnames: []string{"m.example"}, Backends: []string{":25"}}, "needs a host"},
		{"udp backend", Handler{Hostnames: []string{"m.example"}, Backends: []string{"udp/127.0.0.1:25"}}, "cannot carry SMTP"},
		{"proxy_protocol without backend", Handler{Hostnames: []string{"m.example"}, ProxyProtocol: "v2"}, "set proxy_protocol there"},
		{"proxy_protocol v3", Handler{Hostnames: []string{"m.example"}, Backends: []string{"127.0.0.1:25"}, ProxyProtocol: "v3"}, "v1 or v2"},
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
