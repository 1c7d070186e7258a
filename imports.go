// Package caddysmtp is the SMTP edge for the Caddy layer4 app. Importing it
// registers every module of this repository, so that
//
//	xcaddy build --with github.com/mholt/caddy-l4 --with github.com/mailfront/caddy-smtp
//
// builds a caddy that has them all.
package caddysmtp

import (
	_ "github.com/mailfront/caddy-smtp/modules/l4smtp"
	_ "github.com/mailfront/caddy-smtp/modules/l4smtpsink"
)
