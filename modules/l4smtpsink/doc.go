// Package l4smtpsink is the layer4.handlers.smtp_sink handler: a plaintext
// SMTP server, built on github.com/emersion/go-smtp, that runs as a caddy-l4
// handler and stores every accepted message as one .eml file in a directory.
//
// It is a backend for developing and testing the SMTP edge, never for
// production: it accepts AUTH PLAIN with any credentials and any sender and
// recipient. See Handler for the options and the Caddyfile syntax.
//
// A message that got 250 is on disk: it was written to a temporary file
// (named .tmp-*, never *.eml), fsynced, renamed to its final name and the
// directory fsynced before the reply. A message that is refused or cut short
// leaves no file.
package l4smtpsink
