package vfs

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"

	sqlite3 "github.com/ncruces/go-sqlite3"
	sqlite3vfs "github.com/ncruces/go-sqlite3/vfs"
)

// Op is a kind of file operation a [Faults] may fail. Ops combine as a mask.
type Op uint8

// The operations a fault hook can fail.
const (
	OpWrite Op = 1 << iota
	OpSync
	OpTruncate
	OpAll = OpWrite | OpSync | OpTruncate
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpSync:
		return "sync"
	case OpTruncate:
		return "truncate"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// ErrInjected is the error a [Faults] returns for a plain (non-ENOSPC)
// failure: an I/O error that the tests made up.
var ErrInjected = errors.New("vfs: injected I/O error")

// Faults is a file-system fault hook for tests: it fails chosen or random
// WriteAt, Sync and Truncate calls of the files it is given to, and can
// make the disk full (a write writes a part of its bytes, then fails with
// syscall.ENOSPC). It is deterministic for a seed and a sequence of calls.
// A nil *Faults injects nothing, so the hot path pays one nil check.
//
// It is used by a [Replica] for its own I/O (main file, -shm, journal, WAL
// header: [ReplicaOptions].Faults) and, through [Faults.VFS], by SQLite's
// own I/O.
type Faults struct {
	mu      sync.Mutex
	rng     *rand.Rand
	ops     Op      // which operations count and may fail
	at      int     // fail the at-th counted operation from the arming (1-based); 0: no chosen point
	prob    float64 // else fail each counted operation with this probability
	sticky  bool    // once failed, fail every later counted operation until Clear
	full    bool    // failures are ENOSPC: a write writes a part first
	failing bool    // a sticky failure has begun
	seen    int     // counted operations since the arming
	fired   int     // failures injected since the arming
}

// NewFaults returns a hook that injects nothing until armed, with its
// random choices drawn from seed.
func NewFaults(seed uint64) *Faults {
	return &Faults{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// FailAt arms the hook to fail the n-th operation of the kinds in ops
// (counting from 1, from now), and only that one: an I/O error that passes.
// With diskFull the failure is ENOSPC, and every later write fails too, until
// [Faults.Clear] (the disk stays full until space is freed).
func (f *Faults) FailAt(n int, ops Op, diskFull bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reset(ops)
	f.at, f.full, f.sticky = n, diskFull, diskFull
}

// FailRandom arms the hook to fail each operation of the kinds in ops with
// probability p; with diskFull the first failure is ENOSPC and sticks until
// [Faults.Clear].
func (f *Faults) FailRandom(p float64, ops Op, diskFull bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reset(ops)
	f.prob, f.full, f.sticky = p, diskFull, diskFull
}

// DiskFull makes the disk full from now on: every write writes a part of
// its bytes and fails with ENOSPC, until [Faults.Clear].
func (f *Faults) DiskFull() { f.FailAt(1, OpWrite, true) }

// Clear disarms the hook (space returns, the device recovers).
func (f *Faults) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reset(0)
}

// Count arms nothing and starts counting the operations of the kinds in ops:
// a test runs a scenario once to learn how many points it can fail at.
func (f *Faults) Count(ops Op) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reset(ops)
}

// Seen is how many operations of the armed kinds ran since the last arming.
func (f *Faults) Seen() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen
}

// Fired is how many failures were injected since the last arming.
func (f *Faults) Fired() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fired
}

func (f *Faults) reset(ops Op) {
	f.ops, f.at, f.prob, f.sticky, f.full, f.failing, f.seen, f.fired = ops, 0, 0, false, false, false, 0, 0
}

// decide is the hook's whole policy: whether an operation of kind op on n
// bytes fails, and if it does, how many bytes it writes first and what it
// returns.
func (f *Faults) decide(op Op) (fail bool, part func(n int) int, err error) {
	if f == nil {
		return false, nil, nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ops&op == 0 {
		return false, nil, nil
	}
	f.seen++
	switch {
	case f.failing:
	case f.at > 0 && f.seen == f.at:
	case f.at == 0 && f.prob > 0 && f.rng.Float64() < f.prob:
	default:
		return false, nil, nil
	}
	f.fired++
	if f.sticky {
		f.failing = true
	}
	if !f.full {
		return true, nil, fmt.Errorf("%w (%s)", ErrInjected, op)
	}
	r := f.rng.Uint64()
	return true, func(n int) int { return int(r % uint64(n+1)) }, syscall.ENOSPC
}

// writeAt is f.WriteAt through the hook.
func (f *Faults) writeAt(file *os.File, p []byte, off int64) (int, error) {
	fail, part, err := f.decide(OpWrite)
	if !fail {
		return file.WriteAt(p, off)
	}
	if part != nil {
		if k := part(len(p)); k > 0 {
			n, werr := file.WriteAt(p[:k], off)
			if werr != nil {
				return n, werr
			}
			return n, &os.PathError{Op: "write", Path: file.Name(), Err: err}
		}
	}
	return 0, &os.PathError{Op: "write", Path: file.Name(), Err: err}
}

func (f *Faults) sync(file *os.File) error {
	if fail, _, err := f.decide(OpSync); fail {
		return &os.PathError{Op: "sync", Path: file.Name(), Err: err}
	}
	return file.Sync()
}

func (f *Faults) truncate(file *os.File, size int64) error {
	if fail, _, err := f.decide(OpTruncate); fail {
		return &os.PathError{Op: "truncate", Path: file.Name(), Err: err}
	}
	return file.Truncate(size)
}

// VFS wraps a go-sqlite3 VFS so that every file it opens (main, WAL,
// journal, -shm file handle) goes through the hook: SQLite's own I/O then
// fails as the hook says, with SQLITE_FULL for ENOSPC and SQLITE_IOERR
// otherwise. Register the result under a name of your own with
// sqlite3vfs.Register, or use [RegisterFaultVFS].
func (f *Faults) VFS(inner sqlite3vfs.VFS) sqlite3vfs.VFS { return faultVFS{inner: inner, f: f} }

// RegisterFaultVFS registers, under name, the VFS registered as base (""
// for the OS VFS, [Name] for the replica VFS) with every file going through
// f. Open connections with "file:PATH?vfs=NAME". Registering replaces an
// earlier registration of the same name.
func RegisterFaultVFS(name, base string, f *Faults) error {
	inner := sqlite3vfs.Find(base)
	if inner == nil {
		return fmt.Errorf("vfs: no VFS registered as %q", base)
	}
	sqlite3vfs.Register(name, f.VFS(inner))
	return nil
}

type faultVFS struct {
	inner sqlite3vfs.VFS
	f     *Faults
}

func (v faultVFS) Open(name string, flags sqlite3vfs.OpenFlag) (sqlite3vfs.File, sqlite3vfs.OpenFlag, error) {
	file, out, err := v.inner.Open(name, flags)
	if err != nil || file == nil {
		return file, out, err
	}
	return &faultFile{forward: forward{File: file}, f: v.f}, out, nil
}

func (v faultVFS) OpenFilename(name *sqlite3vfs.Filename, flags sqlite3vfs.OpenFlag) (sqlite3vfs.File, sqlite3vfs.OpenFlag, error) {
	inner, ok := v.inner.(sqlite3vfs.VFSFilename)
	if !ok {
		return v.Open(name.String(), flags)
	}
	file, out, err := inner.OpenFilename(name, flags)
	if err != nil || file == nil {
		return file, out, err
	}
	return &faultFile{forward: forward{File: file}, f: v.f}, out, nil
}

func (v faultVFS) Delete(name string, syncDir bool) error { return v.inner.Delete(name, syncDir) }

func (v faultVFS) Access(name string, flags sqlite3vfs.AccessFlag) (bool, error) {
	return v.inner.Access(name, flags)
}

func (v faultVFS) FullPathname(name string) (string, error) { return v.inner.FullPathname(name) }

// faultFile is a file of SQLite's with the hook in front of its writes,
// forwarding everything else; its writes go on to the wrapped file (which
// may itself be a replica's mainFile, and refuse them).
type faultFile struct {
	forward
	f *Faults
}

// sqliteErr says an injected failure the way SQLite expects it.
func sqliteErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return sqlite3vfs.SystemError(err, sqlite3.FULL)
	}
	return sqlite3vfs.SystemError(err, sqlite3.IOERR)
}

func (ff *faultFile) WriteAt(p []byte, off int64) (int, error) {
	fail, part, err := ff.f.decide(OpWrite)
	if !fail {
		return ff.File.WriteAt(p, off)
	}
	n := 0
	if part != nil {
		if k := part(len(p)); k > 0 {
			var werr error
			if n, werr = ff.File.WriteAt(p[:k], off); werr != nil {
				return n, werr
			}
		}
	}
	return n, sqliteErr(err)
}

func (ff *faultFile) Truncate(size int64) error {
	if fail, _, err := ff.f.decide(OpTruncate); fail {
		return sqliteErr(err)
	}
	return ff.File.Truncate(size)
}

func (ff *faultFile) Sync(flags sqlite3vfs.SyncFlag) error {
	if fail, _, err := ff.f.decide(OpSync); fail {
		return sqliteErr(err)
	}
	return ff.File.Sync(flags)
}
