// Package vfs is the storage layer of sqlrebase.
//
// On a replica the main database file is always the server's database at the
// replica's version, and the WAL holds only pending local transactions. This
// package keeps it that way: a go-sqlite3 VFS (registered as [Name]) that
// refuses every write SQLite would make to a replica's main file (a checkpoint),
// and [Replica], which owns the files underneath SQLite: it drops the WAL in
// O(1), writes server pages into the main file through an apply journal, and
// repairs or refuses a main file on open. [Capture] is the server side: it
// reads the page set of each commit from an ordinary database's WAL.
package vfs

import (
	"errors"
	"log/slog"
	"sync/atomic"

	sqlite3 "github.com/ncruces/go-sqlite3"
	sqlite3vfs "github.com/ncruces/go-sqlite3/vfs"
)

// Name is the name under which the replica VFS is registered with go-sqlite3.
// Open a replica's connections with "file:PATH?vfs=sqlrebase".
const Name = "sqlrebase"

// ErrUnsupported is returned where a replica cannot be made safe: it needs
// OFD byte-range locks on a memory-mapped -shm, which go-sqlite3 provides on
// Linux and macOS in its default build only.
var ErrUnsupported = errors.New("vfs: replicas need OFD locks and a memory-mapped -shm (Linux or macOS, default go-sqlite3 build)")

// vetoedWrites counts writes SQLite attempted on a replica's main file, for
// tests and diagnostics; it is the VFS's only state and only ever grows.
var vetoedWrites atomic.Int64

// VetoedWrites reports how many writes SQLite attempted on replica main files
// in this process (each one a checkpoint or a journal-mode change that the
// VFS refused).
func VetoedWrites() int64 { return vetoedWrites.Load() }

func init() {
	if supported {
		sqlite3vfs.Register(Name, replicaVFS{inner: sqlite3vfs.Find("")})
	}
}

// replicaVFS wraps the OS VFS. Main database files are wrapped to refuse
// every write (mainFile), and WAL files to write each commit in one pwrite
// (walFile, walfile.go); the -shm and any attached local database pass
// through untouched.
type replicaVFS struct{ inner sqlite3vfs.VFS }

func (v replicaVFS) Open(name string, flags sqlite3vfs.OpenFlag) (sqlite3vfs.File, sqlite3vfs.OpenFlag, error) {
	f, out, err := v.inner.Open(name, flags)
	return wrap(f, flags), out, err
}

// OpenFilename opens through the inner VFS's OpenFilename when it has one
// (the OS VFS does: it reads URI parameters from it), else by name.
func (v replicaVFS) OpenFilename(name *sqlite3vfs.Filename, flags sqlite3vfs.OpenFlag) (sqlite3vfs.File, sqlite3vfs.OpenFlag, error) {
	inner, ok := v.inner.(sqlite3vfs.VFSFilename)
	if !ok {
		return v.Open(name.String(), flags)
	}
	f, out, err := inner.OpenFilename(name, flags)
	return wrap(f, flags), out, err
}

func (v replicaVFS) Delete(name string, syncDir bool) error { return v.inner.Delete(name, syncDir) }

func (v replicaVFS) Access(name string, flags sqlite3vfs.AccessFlag) (bool, error) {
	return v.inner.Access(name, flags)
}

func (v replicaVFS) FullPathname(name string) (string, error) { return v.inner.FullPathname(name) }

func wrap(f sqlite3vfs.File, flags sqlite3vfs.OpenFlag) sqlite3vfs.File {
	switch {
	case f == nil:
		return f
	case flags&sqlite3vfs.OPEN_MAIN_DB != 0:
		return &mainFile{forward: forward{File: f}}
	case flags&sqlite3vfs.OPEN_WAL != 0:
		return newWALFile(f)
	}
	return f
}

// mainFile is a replica's main database file as SQLite sees it: readable,
// never writable. In WAL mode SQLite writes the main file only to checkpoint,
// so refusing writes here is the last line that keeps pending frames out of
// the server's truth (invariant 4), whatever locks or pragmas a connection has.
// Everything else is forwarded (see [forward]).
type mainFile struct{ forward }

func (f *mainFile) WriteAt(p []byte, off int64) (int, error) {
	vetoedWrites.Add(1)
	slog.Warn("sqlrebase: refused a write to a replica's main file (checkpoint attempt)", "offset", off, "bytes", len(p))
	return 0, sqlite3.READONLY
}

func (f *mainFile) Truncate(size int64) error {
	vetoedWrites.Add(1)
	return sqlite3.READONLY
}

// SizeHint is refused too: SQLite only hints a size before a checkpoint grows
// the main file.
func (f *mainFile) SizeHint(int64) error { return sqlite3.READONLY }

// Overwrite is refused: SQLite announces with it that a transaction (VACUUM)
// is about to rewrite the whole main file.
func (f *mainFile) Overwrite() error { return sqlite3.READONLY }

// BeginAtomicWrite is refused, so SQLite never starts a batch-atomic write
// of the main file (it falls back to its journal, whose writes we refuse).
func (f *mainFile) BeginAtomicWrite() error { return sqlite3.READONLY }

// The interfaces every wrapping file of this package must forward: each
// optional interface go-sqlite3 v0.37.0's vfs package defines. A go-sqlite3
// bump that adds one fails TestForwardsEveryFileInterface until it is added
// here and to forward.
var (
	_ sqlite3vfs.FileUnwrap             = (*mainFile)(nil)
	_ sqlite3vfs.FileLockState          = (*mainFile)(nil)
	_ sqlite3vfs.FilePersistWAL         = (*mainFile)(nil)
	_ sqlite3vfs.FilePowersafeOverwrite = (*mainFile)(nil)
	_ sqlite3vfs.FileChunkSize          = (*mainFile)(nil)
	_ sqlite3vfs.FileSizeHint           = (*mainFile)(nil)
	_ sqlite3vfs.FileHasMoved           = (*mainFile)(nil)
	_ sqlite3vfs.FileOverwrite          = (*mainFile)(nil)
	_ sqlite3vfs.FileSync               = (*mainFile)(nil)
	_ sqlite3vfs.FileCommitPhaseTwo     = (*mainFile)(nil)
	_ sqlite3vfs.FileBatchAtomicWrite   = (*mainFile)(nil)
	_ sqlite3vfs.FileCheckpoint         = (*mainFile)(nil)
	_ sqlite3vfs.FilePragma             = (*mainFile)(nil)
	_ sqlite3vfs.FileBusyHandler        = (*mainFile)(nil)
	_ sqlite3vfs.FileSharedMemory       = (*mainFile)(nil)
	_ sqlite3vfs.FileMemoryMapper       = (*mainFile)(nil)
	_ interface{ SetDB(any) }           = (*mainFile)(nil) // go-sqlite3's unexported filePDB
	_ sqlite3vfs.FileMemoryMapper       = (*faultFile)(nil)
	_ sqlite3vfs.FileSharedMemory       = (*faultFile)(nil)
)

// forward wraps a go-sqlite3 file and forwards every optional interface
// go-sqlite3 looks for, so that a wrapper changes only what it overrides.
// Where the wrapped file lacks an interface, forward answers as go-sqlite3
// does for a file without it (NOTFOUND, false, nil, or nothing), so that
// wrapping never changes what SQLite sees. SharedMemory matters most:
// without it SQLite could not use WAL mode with several connections; and
// MemoryMapper is what makes PRAGMA mmap_size work.
type forward struct{ sqlite3vfs.File }

func (f *forward) Unwrap() sqlite3vfs.File { return f.File }

func (f *forward) SharedMemory() sqlite3vfs.SharedMemory {
	if s, ok := f.File.(sqlite3vfs.FileSharedMemory); ok {
		return s.SharedMemory()
	}
	return nil
}

func (f *forward) MemoryMapper() sqlite3vfs.MemoryMapper {
	if s, ok := f.File.(sqlite3vfs.FileMemoryMapper); ok {
		return s.MemoryMapper()
	}
	return nil
}

func (f *forward) LockState() sqlite3vfs.LockLevel {
	if s, ok := f.File.(sqlite3vfs.FileLockState); ok {
		return s.LockState()
	}
	return sqlite3vfs.LOCK_EXCLUSIVE + 1 // unknown, as SQLite documents
}

func (f *forward) PersistWAL() bool {
	if s, ok := f.File.(sqlite3vfs.FilePersistWAL); ok {
		return s.PersistWAL()
	}
	return false
}

func (f *forward) SetPersistWAL(keep bool) {
	if s, ok := f.File.(sqlite3vfs.FilePersistWAL); ok {
		s.SetPersistWAL(keep)
	}
}

func (f *forward) PowersafeOverwrite() bool {
	if s, ok := f.File.(sqlite3vfs.FilePowersafeOverwrite); ok {
		return s.PowersafeOverwrite()
	}
	return false
}

func (f *forward) SetPowersafeOverwrite(psow bool) {
	if s, ok := f.File.(sqlite3vfs.FilePowersafeOverwrite); ok {
		s.SetPowersafeOverwrite(psow)
	}
}

func (f *forward) ChunkSize(size int) {
	if s, ok := f.File.(sqlite3vfs.FileChunkSize); ok {
		s.ChunkSize(size)
	}
}

func (f *forward) SizeHint(size int64) error {
	if s, ok := f.File.(sqlite3vfs.FileSizeHint); ok {
		return s.SizeHint(size)
	}
	return sqlite3.NOTFOUND
}

func (f *forward) HasMoved() (bool, error) {
	if s, ok := f.File.(sqlite3vfs.FileHasMoved); ok {
		return s.HasMoved()
	}
	return false, nil
}

func (f *forward) Overwrite() error {
	if s, ok := f.File.(sqlite3vfs.FileOverwrite); ok {
		return s.Overwrite()
	}
	return sqlite3.NOTFOUND
}

func (f *forward) SyncSuper(super string) error {
	if s, ok := f.File.(sqlite3vfs.FileSync); ok {
		return s.SyncSuper(super)
	}
	return sqlite3.NOTFOUND
}

func (f *forward) CommitPhaseTwo() error {
	if s, ok := f.File.(sqlite3vfs.FileCommitPhaseTwo); ok {
		return s.CommitPhaseTwo()
	}
	return sqlite3.NOTFOUND
}

func (f *forward) BeginAtomicWrite() error {
	if s, ok := f.File.(sqlite3vfs.FileBatchAtomicWrite); ok {
		return s.BeginAtomicWrite()
	}
	return sqlite3.NOTFOUND
}

func (f *forward) CommitAtomicWrite() error {
	if s, ok := f.File.(sqlite3vfs.FileBatchAtomicWrite); ok {
		return s.CommitAtomicWrite()
	}
	return sqlite3.NOTFOUND
}

func (f *forward) RollbackAtomicWrite() error {
	if s, ok := f.File.(sqlite3vfs.FileBatchAtomicWrite); ok {
		return s.RollbackAtomicWrite()
	}
	return sqlite3.NOTFOUND
}

func (f *forward) CheckpointStart() {
	if s, ok := f.File.(sqlite3vfs.FileCheckpoint); ok {
		s.CheckpointStart()
	}
}

func (f *forward) CheckpointDone() {
	if s, ok := f.File.(sqlite3vfs.FileCheckpoint); ok {
		s.CheckpointDone()
	}
}

func (f *forward) Pragma(name, value string) (string, error) {
	if s, ok := f.File.(sqlite3vfs.FilePragma); ok {
		return s.Pragma(name, value)
	}
	return "", sqlite3.NOTFOUND
}

func (f *forward) BusyHandler(handler func() bool) {
	if s, ok := f.File.(sqlite3vfs.FileBusyHandler); ok {
		s.BusyHandler(handler)
	}
}

func (f *forward) SetDB(db any) {
	if s, ok := f.File.(interface{ SetDB(any) }); ok {
		s.SetDB(db)
	}
}
