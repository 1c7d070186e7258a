package l4smtp

import (
	"crypto/tls"
	"strings"
	"testing"
)

// A session goes to the route of the name it asked for by SNI, in any case;
// every other session to the handler's own backends.
func TestRouteForSNI(t *testing.T) {
	h := &Handler{
		Hostnames:      []string{"mail.a.example", "Mail.B.example", "mail.c.example"},
		BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:10025"}},
		SNIRoutes: []*SNIRoute{{SNI: []string{"mail.b.example", "mail.c.example."},
			BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:10026"}, XClient: true}}},
	}
	if _, err := h.setup(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	for sni, want := range map[string]string{
		"": "127.0.0.1:10025", "mail.a.example": "127.0.0.1:10025", "MAIL.B.EXAMPLE": "127.0.0.1:10026",
		"mail.c.example": "127.0.0.1:10026", "alias.example": "127.0.0.1:10025",
	} {
		route := h.routeFor(&session{tls: &tls.ConnectionState{ServerName: sni}})
		if got := route.pool.upstreams[0].addr.address; got != want || route.xclient != (want == "127.0.0.1:10026") {
			t.Errorf("SNI %q: backend %s, xclient %v; want %s", sni, got, route.xclient, want)
		}
	}
	if len(h.sniRoutes) != 1 {
		t.Errorf("%d routes set up, want one for its two names", len(h.sniRoutes))
	}
}

func TestSNIRoutesInvalid(t *testing.T) {
	backends := BackendOptions{Backends: []string{"127.0.0.1:10026"}}
	for _, tc := range []struct {
		name   string
		routes []*SNIRoute
		want   string
	}{
		{"no names", []*SNIRoute{{BackendOptions: backends}}, "needs at least one hostname"},
		{"no backends", []*SNIRoute{{SNI: []string{"mail.b.example"}}}, "needs backends or upstreams"},
		{"not a hostname", []*SNIRoute{{SNI: []string{"mail.z.example"}, BackendOptions: backends}}, "not one of the handler's hostnames"},
		{"in two routes", []*SNIRoute{{SNI: []string{"mail.b.example"}, BackendOptions: backends},
			{SNI: []string{"MAIL.b.example"}, BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:10027"}}}}, "in two routes"},
		{"bad backend", []*SNIRoute{{SNI: []string{"mail.b.example"}, BackendOptions: BackendOptions{Backends: []string{"127.0.0.1"}}}}, "sni_routes [mail.b.example]: backend"},
		{"xclient and proxy_protocol", []*SNIRoute{{SNI: []string{"mail.b.example"},
			BackendOptions: BackendOptions{Backends: []string{"127.0.0.1:10026"}, XClient: true, ProxyProtocol: "v2"}}}, "use one of them"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Handler{Hostnames: []string{"mail.a.example", "mail.b.example"}, SNIRoutes: tc.routes}
			_, err := h.setup()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}
