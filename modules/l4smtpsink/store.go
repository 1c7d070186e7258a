package l4smtpsink

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"
)

const (
	// tempPattern names the files being written; they never end in .eml.
	tempPattern = ".tmp-*"

	// messageExt ends the name of every stored message.
	messageExt = ".eml"
)

// store writes messages into a directory, one file each.
type store struct {
	dir string // absolute
}

// newStore creates dir (mode 0700) if needed and checks that files can be
// created in it.
func newStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating directory: %w", err)
	}
	f, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return nil, fmt.Errorf("directory %s is not writable: %w", dir, err)
	}
	name := f.Name()
	_ = f.Close()
	if err := os.Remove(name); err != nil {
		return nil, fmt.Errorf("directory %s: removing test file: %w", dir, err)
	}
	return &store{dir: dir}, nil
}

// storageError is a failure of our own (the disk), as opposed to one of
// the client (disconnect, message too large).
type storageError struct {
	op  string
	err error
}

func (e *storageError) Error() string { return e.op + ": " + e.err.Error() }
func (e *storageError) Unwrap() error { return e.err }

// deliver reads the message from r to its end and stores it. It returns the
// file name (in s.dir) only once the message is durably on disk: written,
// fsynced, renamed to its final name, and the directory fsynced. On any error
// no file is left: a failure to read from r is returned wrapping the reader's
// error; a failure to store is a *storageError.
func (s *store) deliver(r io.Reader) (name string, size int64, err error) {
	f, err := os.CreateTemp(s.dir, tempPattern)
	if err != nil {
		return "", 0, &storageError{"creating temporary file", err}
	}
	tmp := f.Name()
	stored := false
	defer func() {
		if !stored {
			_ = f.Close() // may be closed already
			_ = os.Remove(tmp)
		}
	}()

	src := &readErrRecorder{r: r}
	size, err = io.Copy(f, src)
	if err != nil {
		if src.err != nil {
			return "", size, fmt.Errorf("reading message: %w", src.err)
		}
		return "", size, &storageError{"writing " + tmp, err}
	}
	if err := f.Sync(); err != nil {
		return "", size, &storageError{"syncing " + tmp, err}
	}
	if err := f.Close(); err != nil {
		return "", size, &storageError{"closing " + tmp, err}
	}

	name = newMessageName(time.Now())
	final := filepath.Join(s.dir, name)
	if err := os.Rename(tmp, final); err != nil {
		return "", size, &storageError{"renaming " + tmp, err}
	}
	if err := syncDir(s.dir); err != nil {
		// The rename may not survive a crash, and the client will not get
		// 250 and will send again: take the file back.
		_ = os.Remove(final)
		return "", size, &storageError{"syncing directory " + s.dir, err}
	}
	stored = true
	return name, size, nil
}

// newMessageName returns <UTC time to the nanosecond>-<128 random bits>.eml:
// names sort by arrival and do not collide, also between concurrent sessions
// and several Caddy processes sharing the directory.
func newMessageName(now time.Time) string {
	return now.UTC().Format("20060102T150405.000000000Z") + "-" + rand.Text() + messageExt
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		// Directories cannot be fsynced on Windows; NTFS journals renames.
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// readErrRecorder remembers the error of its reader, other than io.EOF, so
// that a failed copy can be blamed on the right side.
type readErrRecorder struct {
	r   io.Reader
	err error
}

func (rr *readErrRecorder) Read(p []byte) (int, error) {
	n, err := rr.r.Read(p)
	if err != nil && err != io.EOF {
		rr.err = err
	}
	return n, err
}
