//go:build (linux || darwin) && !(sqlite3_flock || sqlite3_dotlk)

package vfs

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// errBusy means a lock is held by someone else right now.
var errBusy = errors.New("vfs: lock busy")

// ofdLock takes (or changes) an open-file-description lock on [start,
// start+n) of f without waiting. OFD locks belong to the file description, so
// they conflict with the locks of every other handle, including SQLite's own
// connections in this process: that is what lets us exclude them.
func ofdLock(f *os.File, typ int16, start, n int64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: start, Len: n}
	err := unix.FcntlFlock(f.Fd(), ofdSetLock, &lk)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EACCES):
		return errBusy
	default:
		return fmt.Errorf("lock %s [%d,+%d): %w", f.Name(), start, n, err)
	}
}

func readLock(f *os.File, start, n int64) error  { return ofdLock(f, unix.F_RDLCK, start, n) }
func writeLock(f *os.File, start, n int64) error { return ofdLock(f, unix.F_WRLCK, start, n) }
func unlock(f *os.File, start, n int64) error    { return ofdLock(f, unix.F_UNLCK, start, n) }

// mapShared maps the first n bytes of f read-only and shared: what other
// processes and handles write to the file shows in it.
func mapShared(f *os.File, n int) ([]byte, error) {
	b, err := unix.Mmap(int(f.Fd()), 0, n, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", f.Name(), err)
	}
	return b, nil
}

// unmap undoes mapShared.
func unmap(b []byte) error { return unix.Munmap(b) }
