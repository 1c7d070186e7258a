// Package caddyfile holds the Caddyfile surface of the SMTP edge as fixtures:
// one testdata/*.caddytest file per directive and option. A fixture is a
// Caddyfile, a line of ten dashes, and then either the JSON the Caddyfile must
// adapt to, or (when that part does not start with '{') a piece of the error
// message that adapting it must fail with.
package caddyfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/mailfront/caddy-smtp"
)

func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.caddytest"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no fixtures in testdata")
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			caddyfileText, expected, ok := strings.Cut(string(data), "----------")
			if !ok {
				t.Fatalf("%s: no ---------- separator", file)
			}
			caddyfileText = strings.TrimSpace(caddyfileText) + "\n"
			expected = strings.TrimSpace(strings.ReplaceAll(expected, "\r\n", "\n"))

			if strings.HasPrefix(expected, "{") {
				if !caddytest.CompareAdapt(t, file, caddyfileText, "caddyfile", expected) {
					t.Errorf("%s: adapted JSON differs (diff above)", file)
				}
				return
			}
			_, _, err = caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), nil)
			if err == nil {
				t.Fatalf("%s: adapting succeeded, want an error containing %q", file, expected)
			}
			if !strings.Contains(err.Error(), expected) {
				t.Errorf("%s: error\n\t%v\ndoes not contain\n\t%s", file, err, expected)
			}
		})
	}
}
