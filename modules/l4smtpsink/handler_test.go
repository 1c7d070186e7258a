package l4smtpsink

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func newContext(t *testing.T) caddy.Context {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	return ctx
}

func TestProvisionFailsWithoutDirectory(t *testing.T) {
	h := &Handler{}
	err := h.Provision(newContext(t))
	if err == nil || !strings.Contains(err.Error(), "directory is required") {
		t.Fatalf("Provision with no directory: got %v, want an error saying the directory is required", err)
	}
	if err := h.Cleanup(); err != nil {
		t.Errorf("Cleanup after a failed Provision: %v", err)
	}
}

func TestProvisionFailsOnBadConfig(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		h    *Handler
		want string
	}{
		{"directory is a file", &Handler{Directory: file}, "creating directory"},
		{"negative size", &Handler{Directory: t.TempDir(), MaxMessageSize: -1}, "max_message_size must be positive"},
		{"hostname with a space", &Handler{Directory: t.TempDir(), Hostname: "a b"}, "hostname"},
		{"hostname with CRLF", &Handler{Directory: t.TempDir(), Hostname: "a\r\n250 x"}, "hostname"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.h.Provision(newContext(t))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
			if err := tt.h.Cleanup(); err != nil {
				t.Errorf("Cleanup after a failed Provision: %v", err)
			}
		})
	}
}

func TestProvisionCreatesDirectory(t *testing.T) {
	t.Chdir(t.TempDir())
	h := &Handler{Directory: filepath.Join("a", "b", "mail")} // relative to the working directory
	if err := h.Provision(newContext(t)); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := h.Cleanup(); err != nil {
			t.Error(err)
		}
	}()
	info, err := os.Stat(filepath.Join("a", "b", "mail"))
	if err != nil {
		t.Fatal(err)
	}
	if !info.IsDir() || info.Mode().Perm() != 0o700 {
		t.Errorf("directory mode %v, want a directory with 0700", info.Mode())
	}
	entries, err := os.ReadDir(h.Directory)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("Provision left files in the directory: %v", entries)
	}
}

func TestCleanupEndsOpenSessions(t *testing.T) {
	s := startSink(t, &Handler{})

	// An idle session and one in the middle of a message.
	idle, _ := s.dialRaw(t)
	idle.cmd(250, "EHLO client.test")
	busy, _ := s.dialRaw(t)
	busy.cmd(250, "EHLO client.test")
	busy.cmd(250, "MAIL FROM:<a@example.test>")
	busy.cmd(250, "RCPT TO:<b@example.test>")
	busy.line("BDAT 10")
	busy.send([]byte("0123456789"))
	busy.expect(250)

	if err := s.h.Cleanup(); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	// Cleanup returns only when both sessions are over and the message in
	// flight is discarded.
	s.h.mu.Lock()
	open := len(s.h.conns)
	s.h.mu.Unlock()
	if open != 0 {
		t.Errorf("%d connections still served after Cleanup", open)
	}
	s.expectEmpty(t)
	for _, c := range []*rawClient{idle, busy} {
		if _, err := c.text.ReadLine(); err == nil {
			t.Error("session still open after Cleanup")
		}
	}
	s.waitHandled(t, 2)

	// A connection after Cleanup is refused without blocking.
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	err := s.h.Handle(layer4.WrapConnection(server, nil, zap.NewNop()), nil)
	if !errors.Is(err, errShutDown) {
		t.Errorf("Handle after Cleanup: got %v, want %v", err, errShutDown)
	}
}

func TestUnmarshalCaddyfile(t *testing.T) {
	// The exported fields of a Handler.
	type config struct {
		Directory      string
		Hostname       string
		MaxMessageSize int64
	}
	tests := []struct {
		input   string
		want    config
		wantErr string
	}{{
		input: `smtp_sink {
			directory ./mail
			hostname sink.localhost
			max_message_size 25MB
		}`,
		want: config{Directory: "./mail", Hostname: "sink.localhost", MaxMessageSize: 25000000},
	}, {
		input: `smtp_sink {
			directory "/var/mail sink"
			max_message_size 52428800
		}`,
		want: config{Directory: "/var/mail sink", MaxMessageSize: 52428800},
	}, {
		input: `smtp_sink {
			directory x
			max_message_size 1MiB
		}`,
		want: config{Directory: "x", MaxMessageSize: 1 << 20},
	}, {
		input:   `smtp_sink`,
		wantErr: "smtp_sink needs a directory",
	}, {
		input:   `smtp_sink ./mail`,
		wantErr: "smtp_sink takes no arguments on its line",
	}, {
		input:   "smtp_sink {\n directory\n}",
		wantErr: "wrong argument count or unexpected line ending after 'directory'",
	}, {
		input:   "smtp_sink {\n directory a b\n}",
		wantErr: "smtp_sink option 'directory' takes one argument, got also 'b'",
	}, {
		input:   "smtp_sink {\n directory a\n directory b\n}",
		wantErr: "duplicate smtp_sink option 'directory'",
	}, {
		input:   "smtp_sink {\n directory a\n folder b\n}",
		wantErr: "unknown smtp_sink option 'folder'",
	}, {
		input:   "smtp_sink {\n directory a\n max_message_size lots\n}",
		wantErr: "smtp_sink option 'max_message_size': bad size 'lots'",
	}, {
		input:   "smtp_sink {\n directory a\n max_message_size 0\n}",
		wantErr: "smtp_sink option 'max_message_size' must be at least 1 byte",
	}, {
		input:   "smtp_sink {\n directory a\n max_message_size 10 MB\n}",
		wantErr: "smtp_sink option 'max_message_size' takes one argument",
	}, {
		input:   "smtp_sink {\n directory a {\n x\n }\n}",
		wantErr: "smtp_sink option 'directory' does not take a block",
	}}
	for _, tt := range tests {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%q: got error %v, want one containing %q", tt.input, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tt.input, err)
			continue
		}
		if got := (config{h.Directory, h.Hostname, h.MaxMessageSize}); got != tt.want {
			t.Errorf("%q: got %+v, want %+v", tt.input, got, tt.want)
		}
	}
}
