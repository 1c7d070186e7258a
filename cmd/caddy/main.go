// Command caddy is a caddy with Caddy's standard modules, caddy-l4 and the
// SMTP edge modules of this repository. It is what `go run ./cmd/caddy` and the
// integration tests run; a production build uses xcaddy (see the README).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/mailfront/caddy-smtp"
)

func main() {
	caddycmd.Main()
}
