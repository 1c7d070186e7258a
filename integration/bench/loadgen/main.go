// Command loadgen drives complete SMTP sessions against a mail port to
// benchmark an SMTP edge, its peers and the backend behind them.
//
//	loadgen run  [flags]  sessions at a concurrency for a duration:
//	                      sessions/s, messages/s, p50/p99 session latency, errors by kind
//	loadgen hold [flags]  open N sessions up to the EHLO after TLS and keep them
//	loadgen bulk [flags]  one large message (or -n of them in one session): MiB/s
//	loadgen rtt  [flags]  one session, then K NOOP round trips inside a transaction: p50/p99
//
// A session is: connect, greeting, EHLO, STARTTLS, handshake, EHLO (with
// -tls starttls; with -tls implicit the handshake comes first, then the
// greeting and one EHLO; -tls plain has no TLS), then MAIL, RCPT, DATA with the
// body, and QUIT. TLS sessions are never resumed unless -resume is given, so
// every session pays a full handshake; with -resume all sessions share one
// client session cache, and run reports how many of its handshakes the
// server let resume (handshakes, resumed, resumed_share). The certificate is
// verified against -ca for -servername. Go sets TCP_NODELAY on every
// connection.
//
// Sizes take a k or m suffix (binary: 4k is 4096 bytes, 25m is 25 MiB).
// With -json each mode prints one JSON object (for compare.sh); otherwise a
// short text report.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

const usage = `usage: loadgen run|hold|bulk|rtt [flags]   (loadgen <mode> -h lists the flags)`

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	mode := args[0]
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := commonFlags(fs)
	var report func() (any, error)
	switch mode {
	case "run":
		c := fs.Int("c", 8, "concurrent sessions")
		d := fs.Duration("d", 10*time.Second, "how long to start new sessions")
		size := sizeFlag(fs, "size", 4096, "message body size")
		msgs := fs.Int("msgs", 1, "messages per session")
		report = func() (any, error) {
			if *c < 1 || *msgs < 1 || *d <= 0 {
				return nil, errors.New("-c and -msgs must be at least 1, -d positive")
			}
			return runLoad(o.target, *c, *d, *msgs, makeBody(int(*size)), stderr), nil
		}
	case "hold":
		n := fs.Int("n", 5000, "sessions to open and hold")
		c := fs.Int("c", 64, "sessions being opened at once")
		ready := fs.String("ready-file", "", "write the count of held sessions to this file once all are open")
		wait := fs.Duration("hold", 10*time.Minute, "hold at most this long; SIGUSR1, SIGINT or SIGTERM end the hold sooner")
		check := fs.Bool("check", false, "before closing, check that every held session still answers NOOP")
		report = func() (any, error) {
			if *n < 1 || *c < 1 {
				return nil, errors.New("-n and -c must be at least 1")
			}
			return hold(o.target, *n, *c, *ready, *wait, *check, stderr)
		}
	case "bulk":
		size := sizeFlag(fs, "size", 25<<20, "message body size")
		n := fs.Int("n", 1, "messages to send one after the other in the session (reports the median and the best)")
		report = func() (any, error) {
			if *n < 1 {
				return nil, errors.New("-n must be at least 1")
			}
			return bulk(o.target, makeBody(int(*size)), *n)
		}
	case "rtt":
		n := fs.Int("n", 2000, "NOOP round trips to time (after 100 untimed ones)")
		report = func() (any, error) {
			if *n < 1 {
				return nil, errors.New("-n must be at least 1")
			}
			return rtt(o.target, *n)
		}
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		return fmt.Errorf("unknown mode %q\n%s", mode, usage)
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := o.finish(); err != nil {
		return err
	}
	res, err := report()
	if err != nil {
		return err
	}
	if o.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	_, err = fmt.Fprint(stdout, res)
	return err
}

// options are the flags every mode has.
type options struct {
	target
	ca, servername, curves string
	resume, json           bool
}

func commonFlags(fs *flag.FlagSet) *options {
	o := new(options)
	fs.StringVar(&o.addr, "addr", "127.0.0.1:587", "host:port of the mail port")
	fs.StringVar(&o.mode, "tls", modeSTARTTLS, "how to start TLS: starttls, implicit, or plain (no TLS)")
	fs.StringVar(&o.ca, "ca", "", "PEM file of the CA that signed the server's certificate (required with TLS)")
	fs.StringVar(&o.servername, "servername", "mail.test", "name to send as SNI and to verify the certificate for")
	fs.StringVar(&o.curves, "curves", "X25519,P256", "key exchanges to offer, in order (X25519MLKEM768, X25519, P256, P384)")
	fs.BoolVar(&o.resume, "resume", false, "offer to resume TLS sessions (one client session cache for all sessions: TLS 1.2 tickets, TLS 1.3 PSK) instead of a full handshake each time")
	fs.StringVar(&o.ehlo, "ehlo", "client.test", "name in EHLO")
	fs.StringVar(&o.from, "from", "bench@client.test", "MAIL FROM address")
	fs.StringVar(&o.to, "to", "sink@mail.test", "RCPT TO address")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "time limit for one session (hold: for opening one)")
	fs.BoolVar(&o.json, "json", false, "print the result as one JSON object")
	return o
}

// finish checks the flags and builds the TLS configuration.
func (o *options) finish() error {
	switch o.mode {
	case modePlain:
		return nil
	case modeSTARTTLS, modeImplicit:
	default:
		return fmt.Errorf("-tls %q: want starttls, implicit or plain", o.mode)
	}
	if o.ca == "" {
		return errors.New("-ca is required with TLS")
	}
	pem, err := os.ReadFile(o.ca)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%s: no PEM certificate", o.ca)
	}
	o.tls = &tls.Config{
		RootCAs:    roots,
		ServerName: o.servername,
		MinVersion: tls.VersionTLS12,
	}
	for _, name := range strings.Split(o.curves, ",") {
		id, ok := curveIDs[strings.TrimSpace(name)]
		if !ok {
			return fmt.Errorf("-curves: unknown %q", name)
		}
		o.tls.CurvePreferences = append(o.tls.CurvePreferences, id)
	}
	if o.resume {
		o.tls.ClientSessionCache = tls.NewLRUClientSessionCache(0)
	}
	return nil
}

var curveIDs = map[string]tls.CurveID{
	"X25519MLKEM768": tls.X25519MLKEM768,
	"X25519":         tls.X25519,
	"P256":           tls.CurveP256,
	"P384":           tls.CurveP384,
}

// sizeFlag defines a flag for a byte count with an optional k or m suffix.
func sizeFlag(fs *flag.FlagSet, name string, def int64, usage string) *int64 {
	v := def
	fs.Func(name, usage+" (bytes, or with a k or m suffix; default "+formatSize(def)+")", func(s string) error {
		n, err := parseSize(s)
		if err != nil {
			return err
		}
		v = n
		return nil
	})
	return &v
}

func parseSize(s string) (int64, error) {
	t, mult := strings.ToLower(s), int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"kib", 1 << 10}, {"kb", 1 << 10}, {"k", 1 << 10}, {"mib", 1 << 20}, {"mb", 1 << 20}, {"m", 1 << 20}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > 1<<40/mult {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

func formatSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "m"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + "k"
	}
	return strconv.FormatInt(n, 10)
}

// tlsInfo describes the TLS of a session for the report.
type tlsInfo struct {
	Version string `json:"version"`
	Cipher  string `json:"cipher"`
	Curve   string `json:"curve"`
	Resumed bool   `json:"resumed"`
}

func describeTLS(s *tls.ConnectionState) *tlsInfo {
	if s == nil {
		return nil
	}
	return &tlsInfo{
		Version: tls.VersionName(s.Version),
		Cipher:  tls.CipherSuiteName(s.CipherSuite),
		Curve:   s.CurveID.String(),
		Resumed: s.DidResume,
	}
}

func (t *tlsInfo) String() string {
	if t == nil {
		return "none"
	}
	s := t.Version + " " + t.Cipher + " " + t.Curve
	if t.Resumed {
		s += " (resumed)"
	}
	return s
}
