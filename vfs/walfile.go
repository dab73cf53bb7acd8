package vfs

import (
	"encoding/binary"
	"errors"

	sqlite3vfs "github.com/ncruces/go-sqlite3/vfs"
)

// A replica's connections write their WAL through walFile, which holds the
// writes of one commit and hands them to the file in one pwrite: SQLite
// writes each frame as two calls (its 24-byte header, then its page), and
// the first frame after a drop comes after a 32-byte WAL header, so the
// replay of one mutation on one leaf page cost five pwrites, each a system
// call (strace of a rebase with one mutation pending; a system call is
// about a microsecond on the 2-vCPU machine the bench runs on).
//
// Holding is safe because of when SQLite makes WAL bytes visible. Another
// connection reads a frame only once the wal-index header counts it, and a
// writer updates that header (in shared memory, with no VFS call) right
// after it wrote the commit frame; so the held bytes go out on the write of
// the commit frame's page, before SQLite returns to update the header.
// The same connection may read back frames it wrote before a commit (a
// cache spill, a checksum rewrite); every call but a held write writes the
// held bytes first, so the file is up to date whenever SQLite could look.

// walHoldMax bounds the bytes a walFile holds before it writes them even
// without a commit (a transaction larger than its page cache writes many
// frames before its commit frame): 32 frames of 4 KiB.
const walHoldMax = 128 << 10

// walWrite is what a walFile does with one write (see walHold.plan).
type walWrite uint8

const (
	// writeThrough: write what is held, then this write, to the file.
	writeThrough walWrite = iota
	// holdWrite: add the write to what is held.
	holdWrite
	// holdAndWrite: add the write to what is held and write it all.
	holdAndWrite
)

// walHold is the decision of which WAL writes to hold: a pure state
// machine over the sequence of calls, with no I/O. It holds what SQLite
// appends: a WAL header (32 bytes at offset 0), or a frame header (24
// bytes) where this file's last frame ended, and from there on each frame
// header and page contiguous with what it holds. It says to write it all on
// a commit frame's page (a frame header whose database size is not 0) and
// at walHoldMax; any other write is written through, after what is held.
//
// A frame header is held only where this file's last frame ended, never
// elsewhere: SQLite also rewrites frame headers in place (walRewriteChecksums,
// after the commit frame, right before it publishes the wal-index header),
// and such a header, held with no page to follow it, would reach the file
// only at this file's next call, after the commit was visible. Rewritten
// headers all lie before the end of the last frame, so they go through.
type walHold struct {
	start  int64 // the file offset of the held bytes
	n      int64 // how many bytes are held
	header bool  // the last held write was a frame header
	// commitPending: ... of a commit frame (its database size is not 0),
	// so its page is the commit's last write.
	commitPending bool
	// next is where this file's last frame (or WAL header) ended: where
	// SQLite appends the next frame header if no other file wrote frames
	// since; -1 if unknown.
	next int64
	// headerEnd is where the last write ended if it was 24 bytes (a frame
	// header, held or not), else -1: a page written there completes a
	// frame, which moves next.
	headerEnd int64
}

// newWALHold is the state of a file that has written nothing.
func newWALHold() walHold { return walHold{next: -1, headerEnd: -1} }

// plan decides what to do with a write of p at off, and updates the state
// as if the write was done that way.
func (h *walHold) plan(p []byte, off int64) walWrite {
	size := int64(len(p))
	walHeader := off == 0 && size == 32
	frameHeader := size == 24 && off >= 32
	page := isPageSize(len(p)) && off == h.headerEnd && (off-32-24)%(size+24) == 0
	appendsAt := h.next
	h.headerEnd = -1
	switch {
	case walHeader:
		h.next = 32
	case frameHeader:
		h.headerEnd = off + 24
	case page:
		h.next = off + size
	}
	contiguous := h.n > 0 && off == h.start+h.n
	switch {
	case h.n == 0 && (walHeader || frameHeader && off == appendsAt):
		h.start, h.n = off, size
	case contiguous && frameHeader && !h.header:
		h.n += size
	case contiguous && page && h.header:
		h.n += size
		h.header = false
		if h.commitPending || h.n >= walHoldMax {
			h.commitPending = false
			h.n = 0
			return holdAndWrite
		}
		return holdWrite
	default:
		h.release()
		return writeThrough
	}
	h.header = frameHeader
	h.commitPending = frameHeader && binary.BigEndian.Uint32(p[4:]) != 0
	return holdWrite
}

// release forgets what is held: it was written, or its write failed.
func (h *walHold) release() { h.n, h.header, h.commitPending = 0, false, false }

// truncated is the state after the file was truncated: where frames end
// is unknown.
func (h *walHold) truncated() {
	h.release()
	h.next, h.headerEnd = -1, -1
}

// isPageSize reports whether n is a valid SQLite page size.
func isPageSize(n int) bool { return n >= 512 && n <= 65536 && n&(n-1) == 0 }

// walFile is a WAL file of a replica's connection that holds the writes of
// a commit and writes them at once (see the comment at the top of this
// file). Everything but WriteAt writes what is held first, then forwards.
type walFile struct {
	forward
	hold walHold
	buf  []byte // the held bytes, at hold.start
}

func newWALFile(f sqlite3vfs.File) *walFile {
	return &walFile{forward: forward{File: f}, hold: newWALHold()}
}

func (f *walFile) WriteAt(p []byte, off int64) (int, error) {
	switch f.hold.plan(p, off) {
	case holdWrite:
		f.buf = append(f.buf, p...)
		return len(p), nil
	case holdAndWrite:
		f.buf = append(f.buf, p...)
		if err := f.flushHeld(f.hold.start); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if err := f.flush(); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

// flush writes the held bytes, if any.
func (f *walFile) flush() error {
	if len(f.buf) == 0 {
		return nil
	}
	start := f.hold.start
	f.hold.release()
	return f.flushHeld(start)
}

// flushHeld writes buf at start and empties it, whether or not the write
// succeeds: SQLite fails the transaction the bytes belonged to, and bytes
// left held would later be written out of order.
func (f *walFile) flushHeld(start int64) error {
	b := f.buf
	f.buf = f.buf[:0]
	if cap(f.buf) > walHoldMax+65536+24 {
		f.buf = nil
	}
	_, err := f.File.WriteAt(b, start)
	return err
}

func (f *walFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.flush(); err != nil {
		return 0, err
	}
	return f.File.ReadAt(p, off)
}

func (f *walFile) Truncate(size int64) error {
	err := f.flush()
	f.hold.truncated()
	if err != nil {
		return err
	}
	return f.File.Truncate(size)
}

func (f *walFile) Sync(flags sqlite3vfs.SyncFlag) error {
	if err := f.flush(); err != nil {
		return err
	}
	return f.File.Sync(flags)
}

func (f *walFile) Size() (int64, error) {
	if err := f.flush(); err != nil {
		return 0, err
	}
	return f.File.Size()
}

func (f *walFile) SizeHint(size int64) error {
	if err := f.flush(); err != nil {
		return err
	}
	return f.forward.SizeHint(size)
}

func (f *walFile) Lock(l sqlite3vfs.LockLevel) error {
	if err := f.flush(); err != nil {
		return err
	}
	return f.File.Lock(l)
}

func (f *walFile) Unlock(l sqlite3vfs.LockLevel) error {
	if err := f.flush(); err != nil {
		return err
	}
	return f.File.Unlock(l)
}

func (f *walFile) Close() error {
	return errors.Join(f.flush(), f.File.Close())
}
