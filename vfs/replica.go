package vfs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	mrand "math/rand/v2"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	sqlite3 "github.com/ncruces/go-sqlite3"

	"github.com/sqlrebase/sqlrebase/wal"
)

// Durability says what survives what, in the spirit of SQLite's synchronous.
type Durability int

const (
	// Normal survives a crash of the process (kill -9) with no fsync on the
	// rebase path. A power failure can lose the last versions or tear the main
	// file; Open detects that by checksum and refuses the file, so it is
	// never served, and the server can send it again.
	Normal Durability = iota
	// Full also survives power loss: the apply journal and the main file are
	// fsynced on every rebase.
	Full
)

func (d Durability) String() string {
	if d == Full {
		return "full"
	}
	return "normal"
}

// Errors a caller may branch on. Each is wrapped with the details.
var (
	// ErrDiverged means the main file is not the server's database at any
	// version this replica can vouch for (a torn write after power loss, or
	// a file changed behind our back). It must be restored from the server.
	ErrDiverged = errors.New("vfs: main file does not match its last applied version")
	// ErrVersion means a page set does not follow the replica's version.
	ErrVersion = errors.New("vfs: page set does not follow the replica's version")
	// ErrChecksum means a page set's checksums do not match the replica's
	// state or its own pages.
	ErrChecksum = errors.New("vfs: checksum mismatch")
	// ErrPageSize means a page set's page size differs from the database's.
	ErrPageSize = errors.New("vfs: page size mismatch")
	// ErrPoisoned means a write to the main file, the WAL or the wal-index
	// failed part-way, so the files may be torn. The Replica keeps every
	// reader and writer out and refuses all work until [Replica.Repair]
	// succeeds. It wraps the failure that caused it.
	ErrPoisoned = errors.New("vfs: replica is poisoned by a failed write (repair it)")
	// ErrDiskFull is wrapped into every error whose cause is a full disk
	// (ENOSPC, SQLITE_FULL), so that it says so; see [IsDiskFull].
	ErrDiskFull = errors.New("no space left on device")
)

// Offsets of the wal-index locks in -shm (SQLite's WAL_WRITE_LOCK and
// friends, at byte 120) and of the main file's lock bytes.
const (
	shmLockWrite   = 120
	shmLockCkpt    = 121
	shmLocksAll    = 8 // WRITE, CKPT, RECOVER, READ0..READ4
	shmLockDMS     = 128
	shmRegionSize  = 32 << 10
	pendingByte    = 0x40000000
	sharedFirst    = pendingByte + 2
	sharedSize     = 510
	walTruncateMin = 64 << 20 // a smaller WAL file is reused, not truncated: freeing its blocks costs time on every drop, and fresh salts already make old frames invalid
)

// Replica owns the files of one replica database underneath SQLite.
//
// Locks it holds for its whole life: a SHARED lock on the main file (so that
// no connection can ever get the EXCLUSIVE lock that a close-time checkpoint
// needs), the CKPT wal-index lock (so no checkpoint or recovery can start),
// and a shared DMS lock (so SQLite never reinitialises -shm under us). During
// a rebase it also holds WRITE, RECOVER and READ0..READ4: no connection can
// then read or write, whatever it does.
//
// A Replica is not safe for concurrent use; the replica package serialises
// rebases. The caller must own the database exclusively (the replica
// package's ownership lock) before calling [OpenReplica].
type Replica struct {
	path       string
	durability Durability
	main       *os.File
	shm        *os.File
	walPath    string
	pageSize   uint32
	version    uint64
	sums       *wal.ChecksumTable
	change     uint32 // last wal-index change counter written
	journal    [journalSlots]*os.File
	nextSlot   int
	// walf is a handle on the WAL file, opened at its first use and kept:
	// opening and closing it on every drop was a tenth of a small rebase.
	// It is reopened if the file was unlinked (see walFile).
	walf *os.File
	// walMagic and walSeq are the magic and checkpoint sequence of the
	// next WAL header a drop writes (walSeqKnown once read from the file):
	// reading the old header on every drop only to count on from it was a
	// pread per rebase. Neither is checked against anything; SQLite writes
	// its own header before its next first frame.
	walMagic, walSeq uint32
	walSeqKnown      bool
	// salts draws the WAL salts of each drop: they need only differ from
	// the last ones, not be secret, and a getrandom call per drop was a
	// tenth of the drop's syscalls. Seeded from crypto/rand at first use.
	salts *mrand.ChaCha8
	// jbuf is the journal record's buffer, reused across rebases while it
	// is small (see writeJournal).
	jbuf   []byte
	faults *Faults // nil outside tests
	// poisoned is the failure that left the files torn, nil when they are
	// sound. While set, the wal-index locks that exclude every connection
	// stay held. It is atomic so that [Replica.Poisoned] may be asked from
	// any goroutine (the replica package's readers) while a rebase runs.
	poisoned atomic.Pointer[poisonError]
	// image is the snapshot an install was copying when it failed: the
	// journal names its version, not its pages, so Repair copies it again.
	image *SnapshotImage
	// cookie is the main file's schema cookie, while cookieKnown. Only
	// this Replica writes the main file: the SHARED and CKPT locks it
	// holds for life keep every checkpoint (ours or another process's)
	// out. So writePages and scan keep it, and every other write (a
	// snapshot's copy, the empty database) forgets it. Reading it from
	// the file before and after each rebase was two preads, a tenth of
	// a small rebase's system calls.
	cookie      uint32
	cookieKnown bool
	// applied holds the pages the last rebases wrote into the main file
	// (at most appliedKeep), for BasePage: a server version's delta is
	// against the pages the last one changed, as a rule the same few hot
	// pages, and reading each from the file was a pread and a page
	// allocated per base page, a tenth of a small rebase's CPU. As with
	// the cookie, only this Replica writes the main file; every write but
	// a rebase's apply forgets them.
	applied map[uint32][]byte
	// shmMap maps -shm's first region read-only, shared with every
	// connection's mapping: the wal-index header a rebase reads three
	// times (and the page array a View searches) come from memory, not a
	// pread each. nil where mapping is unsupported or failed: then reads
	// are preads. Writes stay pwrites, through the fault hook.
	shmMap []byte
}

// appliedKeep bounds the pages Replica keeps of its last applies: 64 kB at
// the default page size.
const appliedKeep = 16

// ReplicaOptions configure [OpenReplicaWith].
type ReplicaOptions struct {
	// Durability says what survives what.
	Durability Durability
	// Faults, if set, is the fault hook the Replica's own file I/O goes
	// through (tests only).
	Faults *Faults
}

// OpenReplica opens the replica database at path, creating it at version 0
// (the empty database) if it does not exist. It repairs an interrupted apply
// from the journal, verifies the main file against the last applied version,
// drops the whole WAL (on open every frame is pending by definition: the
// pending queue replays it), and takes the locks that forbid checkpoints.
// Open it before any SQLite connection to it.
func OpenReplica(path string, d Durability) (*Replica, error) {
	return OpenReplicaWith(path, ReplicaOptions{Durability: d})
}

// OpenReplicaWith is [OpenReplica] with options.
func OpenReplicaWith(path string, o ReplicaOptions) (*Replica, error) {
	if !supported {
		return nil, ErrUnsupported
	}
	r := &Replica{path: path, durability: o.Durability, walPath: path + "-wal", faults: o.Faults}
	if err := r.open(); err != nil {
		r.Close()
		return nil, fmt.Errorf("open replica %s: %w", path, WrapDiskFull(err))
	}
	return r, nil
}

func (r *Replica) open() error {
	var err error
	r.main, err = os.OpenFile(r.path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if err := readLock(r.main, sharedFirst, sharedSize); err != nil {
		return fmt.Errorf("shared lock on main file: %w", err)
	}
	st, err := r.main.Stat()
	if err != nil {
		return err
	}
	if st.Size() == 0 {
		if err := r.writeEmpty(); err != nil {
			return fmt.Errorf("create version 0: %w", err)
		}
	}
	expVersion, expSum, held, err := r.journalHeld()
	if err != nil {
		return err
	}
	if !held {
		if expVersion, expSum, err = r.recoverJournal(); err != nil {
			return err
		}
		if err := r.scan(); err != nil {
			return err
		}
	}
	if r.sums.Sum() != expSum {
		return fmt.Errorf("%w: version %d should have checksum %016x, the file has %016x",
			ErrDiverged, expVersion, expSum, r.sums.Sum())
	}
	r.version = expVersion
	if err := r.openShm(); err != nil {
		return fmt.Errorf("wal-index: %w", err)
	}
	// Every frame in the WAL is pending by definition: drop them all.
	if err := r.lockAll(context.Background()); err != nil {
		return err
	}
	defer r.unlockAll()
	return r.resetWAL(true)
}

// writeEmpty makes the main file the empty database of version 0.
func (r *Replica) writeEmpty() error {
	r.cookieKnown, r.applied = false, nil
	if _, err := r.faults.writeAt(r.main, wal.EmptyDatabase(wal.DefaultPageSize), 0); err != nil {
		return err
	}
	return r.faults.sync(r.main)
}

// The apply journal is two slot files, written in turn: each holds one page
// set, length-prefixed. A slot is rewritten in place through a handle kept
// open (creating and renaming a file per rebase costs a third of a
// millisecond on ext4). A write torn by a crash spoils only the slot being
// written, and then no page of the main file was touched yet, so the other
// slot still describes the main file.
const journalSlots = 2

// journalBufKeep is the largest journal record buffer kept for the next
// rebase: enough for the few pages of a small version, so that a replica
// does not hold on to a large version's memory.
const journalBufKeep = 256 << 10

// writeRunMax bounds the pages one write into the main file carries, so that
// applying a large version copies it a bounded buffer at a time.
const writeRunMax = 64

func (r *Replica) journalPath(slot int) string { return fmt.Sprintf("%s-apply%d", r.path, slot) }

// journalFile returns the handle on a journal slot, opening (or creating)
// it at first use.
func (r *Replica) journalFile(slot int) (*os.File, error) {
	if f := r.journal[slot]; f != nil {
		return f, nil
	}
	f, err := os.OpenFile(r.journalPath(slot), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open apply journal: %w", err)
	}
	r.journal[slot] = f
	return f, nil
}

// journalHeld is Open's fast path: if the newest journal record is whole
// (its CRC, streamed through a small buffer) and the main file, scanned,
// has its post checksum, the last apply finished and the file holds that
// version. held false: recoverJournal must re-apply it. Without the fast
// path every Open read the newest record into memory and wrote its pages
// again; after a snapshot that is the whole database, and it made a
// replica's peak RSS twice the database size.
func (r *Replica) journalHeld() (version, sum uint64, held bool, err error) {
	var newest wal.PageSet
	var length int64
	slot := -1
	for s := 0; s < journalSlots; s++ {
		f, err := r.journalFile(s)
		if err != nil {
			return 0, 0, false, err
		}
		var b [8 + wal.PageSetHeaderSize]byte
		if _, err := f.ReadAt(b[:], 0); err != nil {
			continue // short or unreadable: recoverJournal says what it is
		}
		n := int64(binary.LittleEndian.Uint64(b[:]))
		h, err := wal.PeekPageSet(b[8:])
		if err != nil || n < wal.PageSetHeaderSize+8 || n > 1<<40 {
			continue
		}
		if slot < 0 || h.Version > newest.Version {
			newest, length, slot = h, n, s
		}
	}
	if slot < 0 {
		return 0, 0, false, nil
	}
	if ok, err := recordWhole(r.journal[slot], length); err != nil || !ok {
		return 0, 0, false, err
	}
	if err := r.scan(); err != nil {
		return 0, 0, false, err
	}
	if r.sums.Sum() != newest.PostChecksum || r.pageSize != newest.PageSize {
		return 0, 0, false, nil
	}
	r.nextSlot = 1 - slot
	return newest.Version, newest.PostChecksum, true, nil
}

// recordWhole reports whether the journal record of length bytes in f (after
// its 8-byte length) is whole by its CRC, reading it a page at a time.
func recordWhole(f *os.File, length int64) (bool, error) {
	st, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("read apply journal: %w", err)
	}
	if st.Size() < 8+length {
		return false, nil
	}
	err = wal.CheckPageSetRecord(bufio.NewReaderSize(io.NewSectionReader(f, 8, length), 64<<10), length)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, wal.ErrCorrupt) || errors.Is(err, wal.ErrTruncated):
		return false, nil
	default:
		return false, fmt.Errorf("read apply journal: %w", err)
	}
}

// recoverJournal opens the journal slots, re-applies the newest complete
// page set, which repairs an apply that a crash interrupted (writing the same
// pages again is idempotent), and returns the version and checksum the main
// file must now have. Without a journal the file must be the empty database.
func (r *Replica) recoverJournal() (uint64, uint64, error) {
	var newest *wal.PageSet
	var bad []string
	for slot := 0; slot < journalSlots; slot++ {
		f, err := r.journalFile(slot)
		if err != nil {
			return 0, 0, err
		}
		st, err := f.Stat()
		if err != nil {
			return 0, 0, fmt.Errorf("read apply journal: %w", err)
		}
		b := make([]byte, st.Size())
		if _, err := io.ReadFull(io.NewSectionReader(f, 0, st.Size()), b); err != nil {
			return 0, 0, fmt.Errorf("read apply journal: %w", err)
		}
		if len(b) == 0 {
			continue
		}
		ps, err := decodeJournal(b)
		if err != nil {
			bad = append(bad, fmt.Sprintf("slot %d: %v", slot, err))
			continue
		}
		if newest == nil || ps.Version > newest.Version {
			newest = ps
			r.nextSlot = 1 - slot
		}
	}
	if newest == nil {
		if len(bad) > 0 {
			// Something was journaled, but nothing survived whole: the disk
			// lost writes, and nothing about the main file can be vouched for.
			return 0, 0, fmt.Errorf("%w: apply journal: %s", ErrDiverged, strings.Join(bad, "; "))
		}
		empty := wal.EmptyDatabase(wal.DefaultPageSize)
		return 0, wal.PageChecksum(1, empty), nil
	}
	if err := r.writePages(newest); err != nil {
		return 0, 0, fmt.Errorf("re-apply journaled version %d: %w", newest.Version, err)
	}
	return newest.Version, newest.PostChecksum, nil
}

func decodeJournal(b []byte) (*wal.PageSet, error) {
	if len(b) < 8 {
		return nil, wal.ErrTruncated
	}
	n := binary.LittleEndian.Uint64(b)
	if n > uint64(len(b)-8) {
		return nil, fmt.Errorf("%w: record of %d bytes in %d", wal.ErrTruncated, n, len(b)-8)
	}
	return wal.DecodePageSet(b[8:8+n], wal.Limits{MaxBytes: int(n), MaxPages: 1 << 31})
}

// scan reads the whole main file and builds its checksum table.
func (r *Replica) scan() error {
	var hdr [100]byte
	if _, err := r.main.ReadAt(hdr[:], 0); err != nil {
		return fmt.Errorf("%w: read header: %v", ErrDiverged, err)
	}
	if !bytes.HasPrefix(hdr[:], []byte("SQLite format 3\x00")) {
		return fmt.Errorf("%w: not a SQLite database", ErrDiverged)
	}
	ps := uint32(binary.BigEndian.Uint16(hdr[16:]))
	if ps == 1 {
		ps = 65536
	}
	if ps < 512 || ps&(ps-1) != 0 {
		return fmt.Errorf("%w: bad page size %d", ErrDiverged, ps)
	}
	st, err := r.main.Stat()
	if err != nil {
		return err
	}
	if st.Size()%int64(ps) != 0 {
		return fmt.Errorf("%w: file size %d is not a multiple of the page size %d", ErrDiverged, st.Size(), ps)
	}
	r.pageSize = ps
	r.cookie, r.cookieKnown = binary.BigEndian.Uint32(hdr[40:]), true
	r.sums = wal.NewChecksumTable(ps)
	n := uint32(st.Size() / int64(ps))
	r.sums.Resize(n)
	buf := make([]byte, 256*int(ps))
	for first := uint32(1); first <= n; {
		k := min(n-first+1, 256)
		chunk := buf[:int(k)*int(ps)]
		if _, err := r.main.ReadAt(chunk, int64(first-1)*int64(ps)); err != nil {
			return fmt.Errorf("read main file: %w", err)
		}
		for i := uint32(0); i < k; i++ {
			r.sums.Set(first+i, wal.PageChecksum(first+i, chunk[int(i)*int(ps):int(i+1)*int(ps)]))
		}
		first += k
	}
	return nil
}

// openShm opens our own handle on -shm and takes the locks we hold for life.
// No other process can be using the database (the caller owns it), and no
// connection of ours is open yet, so we initialise -shm as the first
// connection would.
func (r *Replica) openShm() error {
	var err error
	r.shm, err = os.OpenFile(r.path+"-shm", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if err := writeLock(r.shm, shmLockDMS, 1); err != nil {
		return fmt.Errorf("-shm is in use by another connection: %w", err)
	}
	if err := r.faults.truncate(r.shm, 0); err != nil {
		return err
	}
	if err := r.faults.truncate(r.shm, shmRegionSize); err != nil {
		return err
	}
	// The region stays this long: nobody truncates -shm while we hold
	// DMS, and SQLite only grows it.
	r.shmMap, _ = mapShared(r.shm, shmRegionSize)
	var seed [4]byte
	rand.Read(seed[:])
	r.change = binary.LittleEndian.Uint32(seed[:])
	if err := readLock(r.shm, shmLockDMS, 1); err != nil { // downgrade: SQLite joins instead of reinitialising
		return err
	}
	if err := writeLock(r.shm, shmLockCkpt, 1); err != nil {
		return err
	}
	return nil
}

// lockAll takes every wal-index lock, waiting while a connection still holds
// one. With all of them held no connection can begin a read or a write.
func (r *Replica) lockAll(ctx context.Context) error {
	delay := 50 * time.Microsecond
	for {
		err := writeLock(r.shm, shmLockWrite, shmLocksAll)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errBusy) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for wal-index locks: %w", ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 5*time.Millisecond)
	}
}

// unlockAll releases the locks a rebase took and keeps CKPT.
func (r *Replica) unlockAll() error {
	if err := unlock(r.shm, shmLockWrite, 1); err != nil {
		return err
	}
	return unlock(r.shm, shmLockCkpt+1, shmLocksAll-2)
}

// resetWAL makes the WAL empty: it writes a wal-index header for an empty
// WAL with a fresh change counter (so every connection drops its page cache)
// and fresh salts, and makes the WAL file agree. A WAL file over
// walTruncateMin is truncated; a smaller one is reused (freeing its blocks
// on every drop costs time) and gets a new header carrying the fresh salts,
// so that its old frames are invalid to anyone who reads the file without
// our wal-index: the stock sqlite3 CLI, a backup tool, or SQLite recovering
// after we are gone would otherwise replay stale pending frames over the
// server's pages. The caller holds every lock.
func (r *Replica) resetWAL(truncate bool) error {
	if r.salts == nil {
		var seed [32]byte
		rand.Read(seed[:])
		r.salts = mrand.NewChaCha8(seed)
	}
	salt1, salt2 := uint32(r.salts.Uint64()), uint32(r.salts.Uint64())
	if truncate || r.WALWritten() {
		if err := r.invalidateWAL(truncate, salt1, salt2); err != nil {
			return err
		}
	}
	r.change++
	h, ci := wal.EmptyIndex(wal.IndexHeader{Change: r.change - 1}, r.pageSize, r.sums.Pages(), salt1, salt2)
	if _, err := r.faults.writeAt(r.shm, wal.EncodeIndex(h, ci), 0); err != nil {
		return fmt.Errorf("write wal-index header: %w", err)
	}
	return nil
}

// readShm reads len(b) bytes of -shm at off: from the mapping where it
// covers them, else with a pread. A copy torn by a connection writing
// meanwhile is what a pread could return too; the header's two copies and
// checksum tell.
func (r *Replica) readShm(b []byte, off int64) error {
	if off >= 0 && off+int64(len(b)) <= int64(len(r.shmMap)) {
		copy(b, r.shmMap[off:])
		return nil
	}
	_, err := r.shm.ReadAt(b, off)
	return err
}

// indexHeader reads and decodes the wal-index header.
func (r *Replica) indexHeader() (wal.IndexHeader, error) {
	var b [wal.IndexHeaderSize]byte
	if err := r.readShm(b[:], 0); err != nil {
		return wal.IndexHeader{}, fmt.Errorf("read wal-index header: %w", err)
	}
	h, _, err := wal.DecodeIndex(b[:])
	if err != nil {
		return wal.IndexHeader{}, fmt.Errorf("wal-index header: %w", err)
	}
	return h, nil
}

// WALWritten reports whether the WAL holds frames that SQLite appended since
// the last drop (the wal-index counts them; true when it cannot tell).
// Without any, a connection sees exactly the main file, and a drop need not
// touch the WAL file: its header still carries the salts of the last reset,
// which no frame in the file has, and SQLite writes a fresh header, with the
// wal-index's salts, before its next first frame. Skipping the file saves a
// third of a rebase with nothing pending.
func (r *Replica) WALWritten() bool {
	h, err := r.indexHeader()
	return err != nil || h.MxFrame != 0
}

// WALFrames is the number of frames the wal-index says the WAL holds: every
// frame appended since the last drop, by whoever appended it. The replica
// package compares it with what its own writer committed to find frames
// that another process wrote.
func (r *Replica) WALFrames() (uint32, error) {
	h, err := r.indexHeader()
	return h.MxFrame, err
}

// WALView is what SQLite's connections see of the WAL, from one read of the
// wal-index header.
type WALView struct {
	// Frames is the number of committed frames since the last drop.
	Frames uint32
	// Cookie is the schema cookie the connections see: that of the newest
	// committed copy of page 1 in the WAL, else the main file's.
	Cookie uint32
}

// View reads the wal-index header once and, if the WAL holds frames, the
// schema cookie of the newest committed copy of page 1 straight from the
// WAL file (found through the wal-index's page array). It is what PRAGMA
// schema_version on a connection would say, without a read transaction:
// that query was a quarter of a rebase with one mutation pending. Call it
// while no connection can commit (the replica package holds its writer).
func (r *Replica) View() (WALView, error) {
	if r.poisoned.Load() != nil {
		return WALView{}, r.poisonedErr()
	}
	h, err := r.indexHeader()
	if err != nil {
		return WALView{}, err
	}
	v := WALView{Frames: h.MxFrame}
	frame := uint32(0)
	if h.MxFrame > 0 {
		if frame, err = r.lastFrameOf(1, h.MxFrame); err != nil {
			return WALView{}, err
		}
	}
	if frame == 0 {
		v.Cookie, err = r.SchemaCookie()
		return v, err
	}
	f, _, err := r.walFile()
	if err != nil {
		return WALView{}, err
	}
	if f == nil {
		return WALView{}, fmt.Errorf("the wal-index counts %d frames, but there is no WAL file", h.MxFrame)
	}
	var b [4]byte
	if _, err := f.ReadAt(b[:], wal.FrameOffset(r.pageSize, frame)+40); err != nil {
		return WALView{}, fmt.Errorf("read schema cookie of WAL frame %d: %w", frame, err)
	}
	v.Cookie = binary.BigEndian.Uint32(b[:])
	return v, nil
}

// lastFrameOf returns the newest frame at or below mx that holds page pgno,
// 0 if none does, reading the wal-index's page array backwards a chunk at a
// time.
func (r *Replica) lastFrameOf(pgno, mx uint32) (uint32, error) {
	var buf [4 << 10]byte
	for hi := mx; hi >= 1; {
		end, first := wal.IndexPgnoOffset(hi)
		lo := max(first, hi-min(hi, uint32(len(buf)/4))+1)
		n := int(hi-lo+1) * 4
		if err := r.readShm(buf[:n], end+4-int64(n)); err != nil {
			return 0, fmt.Errorf("read wal-index page array: %w", err)
		}
		for i := n - 4; i >= 0; i -= 4 {
			if binary.NativeEndian.Uint32(buf[i:]) == pgno {
				return lo + uint32(i/4), nil
			}
		}
		hi = lo - 1
	}
	return 0, nil
}

// walFile returns the handle on the WAL file, opening it if need be, and
// its fstat; nil if there is no WAL file yet. A handle on a file that was
// unlinked (SQLite deletes the WAL only at a checkpoint on close, which the
// locks forbid, but a tool might) is let go and the file opened again.
func (r *Replica) walFile() (*os.File, fs.FileInfo, error) {
	if r.walf != nil {
		st, err := r.walf.Stat()
		if err == nil && linked(st) {
			return r.walf, st, nil
		}
		r.walf.Close()
		r.walf = nil
	}
	f, err := os.OpenFile(r.walPath, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open WAL: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("open WAL: %w", err)
	}
	r.walf = f
	return f, st, nil
}

// linked reports whether a file still has a name (fstat's link count).
func linked(st fs.FileInfo) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	return !ok || sys.Nlink > 0
}

func (r *Replica) invalidateWAL(truncate bool, salt1, salt2 uint32) error {
	f, st, err := r.walFile()
	if f == nil || err != nil {
		return err
	}
	if st.Size() == 0 {
		return nil
	}
	if truncate || st.Size() > walTruncateMin {
		if err := r.faults.truncate(f, 0); err != nil {
			return fmt.Errorf("truncate WAL: %w", err)
		}
		return nil
	}
	if !r.walSeqKnown {
		r.walMagic, r.walSeq = wal.MagicLE, 0
		var hb [wal.HeaderSize]byte
		if _, err := f.ReadAt(hb[:], 0); err == nil {
			if old, err := wal.DecodeHeader(hb[:]); err == nil {
				r.walMagic, r.walSeq = old.Magic, old.CheckpointSeq
			}
		}
		r.walSeqKnown = true
	}
	r.walSeq++
	hdr := wal.Header{Magic: r.walMagic, Version: wal.FormatVersion, PageSize: r.pageSize, CheckpointSeq: r.walSeq}
	hdr.Salt1, hdr.Salt2 = salt1, salt2
	enc := hdr.Encode()
	if _, err := r.faults.writeAt(f, enc[:], 0); err != nil {
		return fmt.Errorf("write WAL header: %w", err)
	}
	return nil
}

// Version is the server version the main file holds.
func (r *Replica) Version() uint64 { return r.version }

// Checksum is the whole-database checksum of the main file.
func (r *Replica) Checksum() uint64 { return r.sums.Sum() }

// PageSize is the database's page size.
func (r *Replica) PageSize() uint32 { return r.pageSize }

// Pages is the database size in pages.
func (r *Replica) Pages() uint32 { return r.sums.Pages() }

// SchemaCookie reads the schema cookie of the main file (the server's).
func (r *Replica) SchemaCookie() (uint32, error) {
	if r.poisoned.Load() != nil {
		return 0, r.poisonedErr()
	}
	if r.cookieKnown {
		return r.cookie, nil
	}
	var b [4]byte
	if _, err := r.main.ReadAt(b[:], 40); err != nil {
		return 0, fmt.Errorf("read schema cookie: %w", err)
	}
	r.cookie, r.cookieKnown = binary.BigEndian.Uint32(b[:]), true
	return r.cookie, nil
}

// Check validates page sets against the replica without changing anything:
// versions follow on from the replica's, page sizes match, each set's pre
// checksum is the previous state's, and the pages yield the post checksum the
// server claims. It returns the sets merged into one.
func (r *Replica) Check(sets ...*wal.PageSet) (*wal.PageSet, error) {
	merged, _, err := r.check(sets)
	return merged, err
}

// check is Check that also returns the merged set's page checksums, which
// the apply then reuses instead of hashing every page again.
func (r *Replica) check(sets []*wal.PageSet) (*wal.PageSet, []uint64, error) {
	if len(sets) == 0 {
		return nil, nil, nil
	}
	// A snapshot replaces everything before it.
	start := 0
	for i, ps := range sets {
		if ps == nil {
			return nil, nil, fmt.Errorf("%w: nil page set", ErrVersion)
		}
		if ps.Flags&wal.FlagSnapshot != 0 {
			start = i
		}
	}
	sets = sets[start:]
	prevVersion, prevSum := r.version, r.sums.Sum()
	for i, ps := range sets {
		if err := ps.Validate(); err != nil {
			return nil, nil, fmt.Errorf("version %d: %w", ps.Version, err)
		}
		snapshot := i == 0 && ps.Flags&wal.FlagSnapshot != 0
		switch {
		case snapshot && ps.Version < r.version:
			return nil, nil, fmt.Errorf("%w: snapshot of version %d would take the replica back from %d", ErrVersion, ps.Version, r.version)
		case !snapshot && ps.Version != prevVersion+1:
			return nil, nil, fmt.Errorf("%w: got version %d, want %d", ErrVersion, ps.Version, prevVersion+1)
		case !snapshot && ps.PageSize != r.pageSize:
			return nil, nil, fmt.Errorf("%w: version %d has pages of %d bytes, the database %d", ErrPageSize, ps.Version, ps.PageSize, r.pageSize)
		case !snapshot && ps.PreChecksum != prevSum:
			return nil, nil, fmt.Errorf("%w: version %d applies to checksum %016x, the replica has %016x", ErrChecksum, ps.Version, ps.PreChecksum, prevSum)
		}
		prevVersion, prevSum = ps.Version, ps.PostChecksum
	}
	merged, err := wal.Merge(sets...)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrVersion, err)
	}
	crcs := wal.PageChecksums(merged)
	var got uint64
	if merged.Flags&wal.FlagSnapshot != 0 {
		t := wal.NewChecksumTable(merged.PageSize)
		t.ApplyWith(merged, crcs)
		got = t.Sum()
	} else {
		got = r.sums.PreviewWith(merged, crcs)
	}
	if got != merged.PostChecksum {
		return nil, nil, fmt.Errorf("%w: the pages of versions %d..%d give %016x, the server says %016x",
			ErrChecksum, sets[0].Version, merged.Version, got, merged.PostChecksum)
	}
	return merged, crcs, nil
}

// Rebase drops every pending frame and applies the page sets, in order, to
// the main file. Nothing is changed if the sets do not check out (see
// [Replica.Check]). With no sets it only drops. It waits (until ctx ends) for
// every connection to finish its transaction; the caller should stop new
// ones first, or they will delay it.
func (r *Replica) Rebase(ctx context.Context, sets ...*wal.PageSet) error {
	if r.poisoned.Load() != nil {
		return r.poisonedErr()
	}
	merged, crcs, err := r.check(sets)
	if err != nil {
		return err
	}
	if merged != nil {
		// A failed journal write touched nothing SQLite reads: the other
		// slot still describes the main file, so this is an error, not a
		// poison.
		if err := r.writeJournal(merged, crcs); err != nil {
			return WrapDiskFull(err)
		}
	}
	if err := r.lockAll(ctx); err != nil {
		return err
	}
	applied := r.applied // writePages forgets them while it writes
	if merged != nil {
		if err := r.writePages(merged); err != nil {
			// The journal is in place: Repair (or the next open) brings the
			// file to merged.Version.
			return r.poison(fmt.Errorf("apply version %d: %w", merged.Version, err))
		}
		if merged.Flags&wal.FlagSnapshot != 0 {
			r.sums = wal.NewChecksumTable(merged.PageSize)
			r.pageSize = merged.PageSize
		}
		r.sums.ApplyWith(merged, crcs)
		r.version = merged.Version
		r.keepApplied(merged, applied)
	}
	if err := r.resetWAL(false); err != nil {
		return r.poison(fmt.Errorf("drop the WAL: %w", err))
	}
	return r.unlockAll()
}

// poison records that the files may be torn by err and keeps the locks
// that exclude every connection (the caller holds them), so that nothing
// reads what the failed write left behind until Repair.
func (r *Replica) poison(err error) error {
	r.poisoned.Store(&poisonError{cause: WrapDiskFull(err)})
	// Spoil the wal-index header (isInit of its first copy): a connection
	// that finds it bad runs recovery, which needs the WRITE and RECOVER
	// locks we hold, and so gets SQLITE_BUSY_RECOVERY at once, instead of
	// retrying for the read locks for seconds before SQLITE_PROTOCOL. If
	// this write fails too, the locks still keep everyone out.
	r.shm.WriteAt([]byte{0}, 12)
	return r.poisonedErr()
}

func (r *Replica) poisonedErr() error {
	if p := r.poisoned.Load(); p != nil {
		return p
	}
	return nil
}

// poisonError is ErrPoisoned with its cause: errors.Is finds both, and
// its text says what failed (and so "no space left on device" if it did).
type poisonError struct{ cause error }

func (e *poisonError) Error() string        { return ErrPoisoned.Error() + ": " + e.cause.Error() }
func (e *poisonError) Unwrap() []error      { return []error{ErrPoisoned, e.cause} }
func (e *poisonError) Is(target error) bool { return target == ErrPoisoned }

// Poisoned returns the error that poisoned the Replica (wrapping
// [ErrPoisoned]), or nil if its files are sound. Unlike the rest of
// Replica it is safe to call from any goroutine.
func (r *Replica) Poisoned() error { return r.poisonedErr() }

// Repair brings a poisoned Replica back, as Open does: it re-applies the
// newest journal record (or copies again the snapshot image whose install
// failed, so its Src must stay readable until Repair succeeds), rescans the
// main file, verifies its checksum against the journal, drops the WAL and
// lets connections back in. The version and checksum then describe the
// repaired file: the journaled version, which may be newer than the one
// before the failed call. On failure it stays poisoned (try again later:
// a full disk may have space again); if the file cannot be brought to the
// journaled version the error also wraps ErrDiverged. Repair of a sound
// Replica does nothing.
func (r *Replica) Repair(ctx context.Context) error {
	if r.poisoned.Load() == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := r.repair(ctx); err != nil {
		return fmt.Errorf("%w: repair: %w", ErrPoisoned, WrapDiskFull(err))
	}
	r.poisoned.Store(nil)
	r.image = nil
	return r.unlockAll()
}

// repair is Repair's work; the caller holds every lock (a poisoned Replica
// never let go of them).
func (r *Replica) repair(ctx context.Context) error {
	var version, sum uint64
	if img := r.image; img != nil {
		if err := r.copyImage(*img); err != nil {
			return fmt.Errorf("install snapshot of version %d: %w", img.Version, err)
		}
		version, sum = img.Version, img.Checksum
	} else {
		var err error
		if version, sum, err = r.recoverJournal(); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := r.scan(); err != nil {
		return err
	}
	if r.sums.Sum() != sum {
		return fmt.Errorf("%w: version %d should have checksum %016x, the file has %016x",
			ErrDiverged, version, sum, r.sums.Sum())
	}
	r.version = version
	return r.resetWAL(true)
}

// WrapDiskFull returns err so that, if its cause is a full disk (see
// [IsDiskFull]), errors.Is(err, ErrDiskFull) holds and its text says "no
// space left on device". Other errors (and nil) are returned as they are.
func WrapDiskFull(err error) error {
	if err == nil || errors.Is(err, ErrDiskFull) || !IsDiskFull(err) {
		return err
	}
	return &diskFullError{err}
}

// IsDiskFull reports whether err's cause is a full disk: ENOSPC from the
// OS, SQLITE_FULL from SQLite, or an error already marked with ErrDiskFull.
func IsDiskFull(err error) bool {
	return err != nil && (errors.Is(err, ErrDiskFull) || errors.Is(err, syscall.ENOSPC) || errors.Is(err, sqlite3.FULL))
}

type diskFullError struct{ err error }

func (e *diskFullError) Error() string {
	if msg := e.err.Error(); strings.Contains(msg, ErrDiskFull.Error()) {
		return msg
	} else {
		return ErrDiskFull.Error() + ": " + msg
	}
}
func (e *diskFullError) Unwrap() []error { return []error{ErrDiskFull, e.err} }

// writeJournal writes the page set into the next journal slot, durably if
// the durability setting asks, before any page of the main file is touched.
// sums are its pages' checksums (check computed them), which the record's
// CRC covers instead of the pages' bytes; nil: computed here.
func (r *Replica) writeJournal(ps *wal.PageSet, sums []uint64) error {
	size := 8 + wal.EncodedSize(ps.PageSize, len(ps.Pages))
	buf := r.jbuf[:0]
	if cap(buf) < size {
		buf = make([]byte, 0, size)
	}
	buf = append(buf, make([]byte, 8)...)
	buf, err := ps.AppendBinaryWith(buf, sums)
	if cap(buf) <= journalBufKeep {
		r.jbuf = buf // a small rebase allocates no record; a large one keeps no memory
	} else {
		r.jbuf = nil
	}
	if err != nil {
		return fmt.Errorf("encode journal: %w", err)
	}
	binary.LittleEndian.PutUint64(buf, uint64(len(buf)-8))
	f := r.journal[r.nextSlot]
	if _, err := r.faults.writeAt(f, buf, 0); err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	if r.durability == Full {
		if err := r.faults.sync(f); err != nil {
			return fmt.Errorf("sync journal: %w", err)
		}
	}
	r.nextSlot = 1 - r.nextSlot
	return nil
}

// writePages writes a page set into the main file and sets its size.
func (r *Replica) writePages(ps *wal.PageSet) error {
	// Until every page is written the cookie and the pages are the file's
	// business; a failed write poisons the Replica, and Repair rescans.
	cookieWasKnown := r.cookieKnown
	r.cookieKnown, r.applied = false, nil
	size := int64(ps.DBSize) * int64(ps.PageSize)
	sizeChanges := r.sums == nil || r.pageSize != ps.PageSize || r.sums.Pages() != ps.DBSize
	var buf []byte
	for i := 0; i < len(ps.Pages); {
		// Coalesce runs of consecutive pages into one write, at most
		// writeRunMax pages at a time (a snapshot is one run).
		j := i + 1
		for j < len(ps.Pages) && j-i < writeRunMax && ps.Pages[j].Pgno == ps.Pages[j-1].Pgno+1 {
			j++
		}
		off := int64(ps.Pages[i].Pgno-1) * int64(ps.PageSize)
		if j == i+1 {
			if _, err := r.faults.writeAt(r.main, ps.Pages[i].Data, off); err != nil {
				return err
			}
		} else {
			if cap(buf) < (j-i)*int(ps.PageSize) {
				buf = make([]byte, 0, (j-i)*int(ps.PageSize))
			}
			buf = buf[:0]
			for _, p := range ps.Pages[i:j] {
				buf = append(buf, p.Data...)
			}
			if _, err := r.faults.writeAt(r.main, buf, off); err != nil {
				return err
			}
		}
		i = j
	}
	if sizeChanges {
		if err := r.faults.truncate(r.main, size); err != nil {
			return err
		}
	}
	if len(ps.Pages) > 0 && ps.Pages[0].Pgno == 1 {
		r.cookie, r.cookieKnown = binary.BigEndian.Uint32(ps.Pages[0].Data[40:]), true
	} else {
		// Page 1 was not written: the cookie is what it was (reading it
		// again after every such apply was a pread per rebase).
		r.cookieKnown = cookieWasKnown
	}
	if r.durability == Full {
		return r.faults.sync(r.main)
	}
	return nil
}

// keepApplied keeps a copy of the pages ps wrote (the caller of Rebase owns
// ps's buffers), with those of the applies before it (before) that ps left
// alone and that are still in the file, unless that is more than
// appliedKeep pages: then only ps's, if they are few enough. A page kept
// before is copied over in place.
func (r *Replica) keepApplied(ps *wal.PageSet, before map[uint32][]byte) {
	if len(ps.Pages) > appliedKeep || ps.Flags&wal.FlagSnapshot != 0 {
		return
	}
	keep := before
	if keep == nil {
		keep = make(map[uint32][]byte, appliedKeep)
	}
	for pgno, p := range keep {
		if pgno > ps.DBSize || len(p) != int(ps.PageSize) {
			delete(keep, pgno)
		}
	}
	fresh := 0
	for _, p := range ps.Pages {
		if _, ok := keep[p.Pgno]; !ok {
			fresh++
		}
	}
	if len(keep)+fresh > appliedKeep {
		clear(keep)
	}
	for _, p := range ps.Pages {
		buf, ok := keep[p.Pgno]
		if !ok {
			buf = make([]byte, len(p.Data))
		}
		copy(buf, p.Data)
		keep[p.Pgno] = buf
	}
	r.applied = keep
}

// BasePage returns page pgno of the main file for decoding a delta
// against it: a page the last rebases wrote, as they wrote it, else read
// from the file. The caller must not modify it, and may call it only
// where it could call Rebase (the replica package's rebase, under its
// writer lock); it refuses while the Replica is poisoned.
func (r *Replica) BasePage(pgno uint32) ([]byte, error) {
	if r.poisoned.Load() != nil {
		return nil, r.poisonedErr()
	}
	if p, ok := r.applied[pgno]; ok {
		return p, nil
	}
	return r.ReadPage(pgno)
}

// ReadPage reads one page of the main file (for tests and tools). It
// refuses while the Replica is poisoned: the page may be torn.
func (r *Replica) ReadPage(pgno uint32) ([]byte, error) {
	if r.poisoned.Load() != nil {
		return nil, r.poisonedErr()
	}
	p := make([]byte, r.pageSize)
	if _, err := r.main.ReadAt(p, int64(pgno-1)*int64(r.pageSize)); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return p, nil
}

// Close releases the files and their locks. Close every SQLite connection
// to the database first.
func (r *Replica) Close() error {
	var errs []error
	if r.walf != nil {
		errs = append(errs, r.walf.Close())
		r.walf = nil
	}
	if r.shmMap != nil {
		errs = append(errs, unmap(r.shmMap))
		r.shmMap = nil
	}
	if r.shm != nil {
		errs = append(errs, r.shm.Close())
		r.shm = nil
	}
	if r.main != nil {
		errs = append(errs, r.main.Close())
		r.main = nil
	}
	for i, f := range r.journal {
		if f != nil {
			errs = append(errs, f.Close())
			r.journal[i] = nil
		}
	}
	return errors.Join(errs...)
}
