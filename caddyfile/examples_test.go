package caddyfile

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The example Caddyfiles adapt without errors or warnings, and the
// production examples keep the global email (see examples/Caddyfile's
// comment on key_type).
func TestExamplesAdapt(t *testing.T) {
	for _, path := range []string{"../examples/Caddyfile", "../examples/quickstart/Caddyfile",
		"../examples/load-balancing/Caddyfile", "../examples/sni-routing/Caddyfile"} {
		t.Run(filepath.Base(filepath.Dir(path)), func(t *testing.T) {
			body, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": path})
			if err != nil {
				t.Fatalf("adapting %s: %v", path, err)
			}
			for _, w := range warnings {
				t.Errorf("%s:%d: %s", path, w.Line, w.Message)
			}
			if path == "../examples/quickstart/Caddyfile" {
				return // no ACME: local certificates only
			}
			var cfg struct {
				Apps struct {
					TLS struct {
						Automation struct {
							Policies []struct {
								Issuers []struct {
									Email string `json:"email"`
								} `json:"issuers"`
							} `json:"policies"`
						} `json:"automation"`
					} `json:"tls"`
				} `json:"apps"`
			}
			if err := json.Unmarshal(out, &cfg); err != nil {
				t.Fatal(err)
			}
			policies := cfg.Apps.TLS.Automation.Policies
			if len(policies) == 0 || len(policies[0].Issuers) == 0 || policies[0].Issuers[0].Email != "postmaster@example.com" {
				t.Errorf("the global email did not reach the ACME issuer: %s", out)
			}
		})
	}
}
