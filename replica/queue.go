package replica

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// The pending queue holds the mutations a replica has run optimistically but
// the server has not yet settled. It lives in a file of its own next to the
// database (`<db>-pending`), not in SQLite: the replica rolls its database
// back to server states, and the queue must survive that; and an append-only
// file makes "durable once Append returns" cost a single write(2).
//
// File format (all integers little-endian):
//
//	header, queueHeaderSize (48) bytes:
//	   0  magic "SRQ1"
//	   4  format version u16 (1)
//	   6  reserved u16, zero
//	   8  client id [16]byte
//	  24  base id u64: every id <= base is settled and must never be reused
//	  32  reserved [12]byte, zero
//	  44  CRC-32C (Castagnoli) of bytes 0..44, u32
//	records, back to back:
//	   0  bodyLen u32 (<= queueMaxBody)
//	   4  CRC-32C of body, u32
//	   8  body: id u64 | nameLen u16 | name | args (the rest of the body)
//
// Record ids are consecutive (each is the previous + 1). Records with
// id <= base are valid but settled, and are skipped: Settle raises the base
// without rewriting the file unless that frees a lot, and a crash during
// compaction can leave them too. Decoding stops at the first record that is
// short, fails its CRC, has an impossible length or breaks the id sequence:
// that is the torn tail a crash mid-append leaves, and opening truncates it.
//
// The file is also the replica's ownership lock: an exclusive flock is held
// on it while the queue is open.

const (
	queueMagic         = "SRQ1"
	queueFormatVersion = 1
	queueHeaderSize    = 48
	queueRecordHead    = 8       // bodyLen + crc
	queueBodyFixed     = 8 + 2   // id + nameLen
	queueMaxBody       = 2 << 20 // generous next to mutators.MaxArgsSize + MaxNameLen
	// queueCompactMin is the settled prefix above which Settle rewrites the
	// file while mutations are still pending (when it is also more than half
	// the file): rewriting costs a copy of the pending records, so it is
	// only worth it when it frees a lot.
	queueCompactMin = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrLocked is returned when the replica's database is already open, by
// this process or another: two owners would issue the same mutation ids.
var ErrLocked = errors.New("replica: database is already open (by this or another process)")

// errQueueCorrupt is returned when the queue file's header is unreadable.
// The queue is never silently reinitialized: that would lose pending
// mutations and reuse ids.
var errQueueCorrupt = errors.New("replica: pending queue is corrupt")

// errQueueClosed is returned by operations on a closed queue.
var errQueueClosed = errors.New("replica: pending queue is closed")

// queuedMutation is one pending mutation.
type queuedMutation struct {
	ID   uint64
	Name string
	Args json.RawMessage
}

// queue is the durable pending-mutation queue. Its methods are safe for
// concurrent use.
type queue struct {
	mu   sync.Mutex
	path string
	sync bool
	f    *os.File // nil once closed
	// broken is set when the file may no longer match memory (a failed
	// truncate after a failed write); every later write fails with it.
	broken error

	clientID [16]byte
	base     uint64
	lastID   uint64 // highest id ever in the file (0 if none); ids <= max(base, lastID) are used
	pending  []queuedMutation
	// starts[i] is the file offset of pending[i]'s record.
	starts []int64
	size   int64 // file size: where the next record goes

	compactMin int64 // queueCompactMin; a field so tests can exercise the rewrite
	// failWrite, if set, is asked after each header write and rewrite; a
	// non-nil error is taken as that write's failure (tests inject I/O
	// errors with it).
	failWrite func(op string) error
}

// openQueue opens the queue at path, creating it (with a fresh random client
// id and base 0) if it does not exist or is empty. It takes an exclusive
// flock on the file and fails with ErrLocked if another open file holds it.
// With sync, every append and compaction is fdatasync'ed so it survives
// power loss; without it, writes survive a crash of the process only.
func openQueue(path string, sync bool) (*queue, error) {
	for try := 0; ; try++ {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("replica: open pending queue: %w", err)
		}
		if err := lockFile(f, path); err != nil {
			f.Close()
			return nil, err
		}
		// The owner's Settle may have replaced the file (rename) and
		// released its lock on the old one between our open and our
		// flock: then we hold the lock of a file that is no longer the
		// queue. Try again on the current one.
		if same, err := isCurrent(f, path); err != nil {
			f.Close()
			return nil, err
		} else if !same {
			f.Close()
			if try >= 10 {
				return nil, fmt.Errorf("%w: %s keeps being replaced", ErrLocked, path)
			}
			continue
		}
		q, err := initQueue(f, path, sync)
		if err != nil {
			f.Close()
			return nil, err
		}
		return q, nil
	}
}

// isCurrent reports whether f is still the file at path.
func isCurrent(f *os.File, path string) (bool, error) {
	fi, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("replica: stat pending queue: %w", err)
	}
	pi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("replica: stat pending queue: %w", err)
	}
	return os.SameFile(fi, pi), nil
}

// initQueue reads (or initializes) the locked file f.
func initQueue(f *os.File, path string, sync bool) (*queue, error) {
	// A rewrite that crashed before its rename leaves a temporary file;
	// it holds nothing the queue does not, and we own the lock now.
	if err := os.Remove(path + ".tmp"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("replica: remove stale %s.tmp: %w", path, err)
	}
	q := &queue{path: path, sync: sync, f: f, compactMin: queueCompactMin}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("replica: read pending queue %s: %w", path, err)
	}
	if len(data) == 0 {
		if _, err := rand.Read(q.clientID[:]); err != nil {
			return nil, fmt.Errorf("replica: generate client id: %w", err)
		}
		if _, err := f.WriteAt(encodeQueueHeader(q.clientID, 0), 0); err != nil {
			return nil, fmt.Errorf("replica: initialize pending queue %s: %w", path, err)
		}
		if sync {
			if err := f.Sync(); err != nil {
				return nil, fmt.Errorf("replica: sync pending queue %s: %w", path, err)
			}
			if err := syncDir(filepath.Dir(path)); err != nil {
				return nil, err
			}
		}
		q.size = queueHeaderSize
		return q, nil
	}
	q.clientID, q.base, err = decodeQueueHeader(data)
	if err != nil {
		return nil, fmt.Errorf("replica: pending queue %s: %w", path, err)
	}
	body := data[queueHeaderSize:]
	recs, offs, valid, last := decodeQueueRecordsAt(body, q.base)
	q.lastID = last
	keep := int64(queueHeaderSize + valid)
	if len(recs) == 0 {
		// Everything in the file is settled (the base covers it): drop it.
		keep = queueHeaderSize
	}
	if keep < int64(len(data)) {
		if torn := len(body) - valid; torn > 0 {
			slog.Warn("replica: dropping torn tail of pending queue", "path", path, "bytes", torn)
		}
		if err := f.Truncate(keep); err != nil {
			return nil, fmt.Errorf("replica: truncate pending queue %s: %w", path, err)
		}
		if sync {
			if err := unix.Fdatasync(int(f.Fd())); err != nil {
				return nil, fmt.Errorf("replica: sync pending queue %s: %w", path, err)
			}
		}
	}
	q.size = keep
	// Memory keeps only ids and names (interned): the args are read from
	// the file when needed (replay, push), so a long offline queue costs
	// little RAM.
	names := map[string]string{}
	for i := range recs {
		n, ok := names[recs[i].Name]
		if !ok {
			n = recs[i].Name
			names[n] = n
		}
		recs[i].Name, recs[i].Args = n, nil
	}
	q.pending = recs
	q.starts = make([]int64, len(offs))
	for i, o := range offs {
		q.starts[i] = queueHeaderSize + int64(o)
	}
	return q, nil
}

// lockFile takes the exclusive, non-blocking flock that makes the queue the
// replica's ownership lock. flock belongs to the open file description, so
// a second open in the same process conflicts too.
func lockFile(f *os.File, path string) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EWOULDBLOCK):
			return fmt.Errorf("%w: %s", ErrLocked, path)
		default:
			return fmt.Errorf("replica: lock %s: %w", path, err)
		}
	}
}

// ClientID returns the replica's client id: 32 lowercase hex characters.
func (q *queue) ClientID() string {
	return hex.EncodeToString(q.clientID[:])
}

// NextID returns the id the next appended mutation must have.
func (q *queue) NextID() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.nextID()
}

func (q *queue) nextID() uint64 {
	return max(q.base, q.lastID) + 1
}

// settled returns the settled base: every id up to it is settled, and the
// pending ones follow it without a gap.
func (q *queue) settled() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.base
}

// Append durably appends m, whose ID must be NextID(). The record goes out in
// one write(2), so a crash leaves it whole or torn (and dropped on the next
// open), never half-visible. If the write fails, memory is unchanged and the
// file is truncated back.
func (q *queue) Append(m queuedMutation) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.writable(); err != nil {
		return err
	}
	if want := q.nextID(); m.ID != want || m.ID == 0 {
		return fmt.Errorf("replica: append mutation %d to pending queue: want id %d", m.ID, want)
	}
	if len(m.Name) > 0xffff || queueBodyFixed+len(m.Name)+len(m.Args) > queueMaxBody {
		return fmt.Errorf("replica: append mutation %d to pending queue: record of %d bytes exceeds the limit of %d",
			m.ID, queueBodyFixed+len(m.Name)+len(m.Args), queueMaxBody)
	}
	rec := appendQueueRecord(nil, m)
	_, err := q.f.WriteAt(rec, q.size)
	if err == nil && q.sync {
		err = unix.Fdatasync(int(q.f.Fd()))
	}
	if err != nil {
		if terr := q.f.Truncate(q.size); terr != nil {
			q.broken = fmt.Errorf("replica: pending queue %s: truncate after failed append: %w", q.path, terr)
		}
		return fmt.Errorf("replica: append mutation %d to pending queue: %w", m.ID, err)
	}
	// The args stay in the file only (read back by withArgs).
	m.Args = nil
	q.pending = append(q.pending, m)
	q.starts = append(q.starts, q.size)
	q.size += int64(len(rec))
	q.lastID = m.ID
	return nil
}

func (q *queue) writable() error {
	if q.f == nil {
		return errQueueClosed
	}
	return q.broken
}

// Pending returns the unsettled mutations in id order, with their args read
// from the file. Nil, with the error, if the file cannot be read.
func (q *queue) Pending() ([]queuedMutation, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.withArgs(0, len(q.pending))
}

// withArgs returns pending[i:j] with their args, read from the file in one
// read. Call with q.mu held.
func (q *queue) withArgs(i, j int) ([]queuedMutation, error) {
	if i >= j {
		return nil, nil
	}
	if q.f == nil {
		return nil, errQueueClosed
	}
	end := q.size
	if j < len(q.starts) {
		end = q.starts[j]
	}
	buf := make([]byte, end-q.starts[i])
	if _, err := q.f.ReadAt(buf, q.starts[i]); err != nil {
		return nil, fmt.Errorf("replica: read pending queue %s: %w", q.path, err)
	}
	recs, _, _, _ := decodeQueueRecordsAt(buf, 0)
	if len(recs) != j-i || recs[0].ID != q.pending[i].ID {
		return nil, fmt.Errorf("replica: pending queue %s: %d records at offset %d, want %d from id %d", q.path, len(recs), q.starts[i], j-i, q.pending[i].ID)
	}
	for k := range recs {
		recs[k].Name = q.pending[i+k].Name
	}
	return recs, nil
}

// name returns the mutator name of pending mutation id.
func (q *queue) name(id uint64) (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if id <= q.base || id > q.base+uint64(len(q.pending)) {
		return "", false
	}
	m := q.pending[id-q.base-1]
	return m.Name, m.ID == id
}

// Len returns the number of unsettled mutations.
func (q *queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.pending)
}

// Settle marks every id <= lmid settled (the server applied or rejected
// it): they leave memory at once, and the base is raised (never lowered)
// and written to the header, so they stay settled after a reopen. The file
// is compacted when that is cheap (nothing left pending: truncate) or
// worthwhile (a large settled prefix: rewrite); otherwise settled records
// stay on disk and the base filters them out.
//
// The header is rewritten in place; it lies within the first sector, whose
// writes storage devices do not tear.
func (q *queue) Settle(lmid uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.writable(); err != nil {
		return err
	}
	if lmid <= q.base {
		return nil
	}
	n := 0
	for n < len(q.pending) && q.pending[n].ID <= lmid {
		n++
	}
	// Memory changes with the file or not at all: a write that fails
	// before the new base is on disk puts everything back.
	oldBase, oldPending, oldStarts := q.base, q.pending, q.starts
	q.base = lmid
	q.pending = append([]queuedMutation(nil), q.pending[n:]...)
	q.starts = append([]int64(nil), q.starts[n:]...)
	var recorded bool
	var err error
	if len(q.pending) == 0 && (q.size-queueHeaderSize > q.compactMin || lmid != q.lastID) {
		recorded, err = q.compactEmpty()
	} else if len(q.pending) == 0 {
		// Settled records the base filters out stay until they pass
		// compactMin: a truncate per settle was a tenth of settling one
		// mutation (the rebase that confirms it). The next append goes
		// after them with the next id (lmid is the last one in the file;
		// otherwise the ids in the file would have a gap, which ends a
		// valid queue, and compactEmpty truncates).
		err = q.writeHeader()
		recorded = err == nil
	} else if settledBytes := q.starts[0] - queueHeaderSize; settledBytes > q.compactMin && settledBytes > q.size/2 {
		recorded, err = q.rewrite()
	} else {
		err = q.writeHeader()
		recorded = err == nil
	}
	if !recorded {
		q.base, q.pending, q.starts = oldBase, oldPending, oldStarts
	}
	return err
}

// compactEmpty empties the file in place once nothing is pending. The new
// header (with the raised base) is made durable before the truncate: if the
// truncate won but the header was lost, the old base would let settled ids
// be issued again. A crash between the two leaves settled records that the
// base filters out on the next open.
//
// recorded says whether the new base is in the file (then memory keeps it,
// whatever the error).
func (q *queue) compactEmpty() (recorded bool, err error) {
	if err := q.writeHeader(); err != nil {
		return false, err
	}
	if q.size == queueHeaderSize {
		// No records: only the base had to be persisted for NextID.
		return true, nil
	}
	if err := q.f.Truncate(queueHeaderSize); err != nil {
		// The header already covers the records; the file is merely big.
		return true, fmt.Errorf("replica: compact pending queue %s: %w", q.path, err)
	}
	q.size = queueHeaderSize
	if q.sync {
		if err := unix.Fdatasync(int(q.f.Fd())); err != nil {
			return true, fmt.Errorf("replica: sync pending queue %s: %w", q.path, err)
		}
	}
	return true, nil
}

func (q *queue) writeHeader() error {
	_, err := q.f.WriteAt(encodeQueueHeader(q.clientID, q.base), 0)
	if err == nil && q.failWrite != nil {
		err = q.failWrite("header")
	}
	if err != nil {
		// The header may be torn; refuse further writes rather than
		// build on it.
		q.broken = fmt.Errorf("replica: write pending queue header %s: %w", q.path, err)
		return q.broken
	}
	if q.sync {
		if err := unix.Fdatasync(int(q.f.Fd())); err != nil {
			return fmt.Errorf("replica: sync pending queue %s: %w", q.path, err)
		}
	}
	return nil
}

// rewrite replaces the file by one holding only the pending records. The
// lock is taken on the new file before the rename makes it visible, so no
// other opener can slip in between; the old file's lock goes with it.
//
// recorded says whether the new file is the queue (then memory keeps the new
// state, whatever the error).
func (q *queue) rewrite() (recorded bool, err error) {
	tmpPath := q.path + ".tmp"
	tmp, err := os.OpenFile(tmpPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return false, fmt.Errorf("replica: compact pending queue: %w", err)
	}
	renamed := false
	defer func() {
		if err != nil && !renamed {
			tmp.Close()
			os.Remove(tmpPath)
		}
	}()
	if err := lockFile(tmp, tmpPath); err != nil {
		return false, err
	}
	full, err := q.withArgs(0, len(q.pending))
	if err != nil {
		return false, fmt.Errorf("replica: compact pending queue: %w", err)
	}
	buf := encodeQueueHeader(q.clientID, q.base)
	starts := make([]int64, len(full))
	for i, m := range full {
		starts[i] = int64(len(buf))
		buf = appendQueueRecord(buf, m)
	}
	_, err = tmp.Write(buf)
	if err == nil && q.failWrite != nil {
		err = q.failWrite("rewrite")
	}
	if err != nil {
		return false, fmt.Errorf("replica: compact pending queue: %w", err)
	}
	if q.sync {
		if err := tmp.Sync(); err != nil {
			return false, fmt.Errorf("replica: compact pending queue: %w", err)
		}
	}
	if err := os.Rename(tmpPath, q.path); err != nil {
		return false, fmt.Errorf("replica: compact pending queue: %w", err)
	}
	// From here on the new file is the queue, whatever happens.
	renamed = true
	old := q.f
	q.f = tmp
	q.starts = starts
	q.size = int64(len(buf))
	old.Close()
	if q.sync {
		if err := syncDir(filepath.Dir(q.path)); err != nil {
			return true, err
		}
	}
	return true, nil
}

// Close releases the file and its lock. Closing twice is harmless.
func (q *queue) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.f == nil {
		return nil
	}
	err := q.f.Close()
	q.f = nil
	if err != nil {
		return fmt.Errorf("replica: close pending queue %s: %w", q.path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("replica: sync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("replica: sync directory %s: %w", dir, err)
	}
	return nil
}

// encodeQueueHeader returns the 48-byte header.
func encodeQueueHeader(clientID [16]byte, base uint64) []byte {
	b := make([]byte, queueHeaderSize)
	copy(b[0:4], queueMagic)
	binary.LittleEndian.PutUint16(b[4:6], queueFormatVersion)
	copy(b[8:24], clientID[:])
	binary.LittleEndian.PutUint64(b[24:32], base)
	binary.LittleEndian.PutUint32(b[44:48], crc32.Checksum(b[:44], castagnoli))
	return b
}

// decodeQueueHeader decodes the header at the start of b. Bytes after it
// are ignored. Every failure wraps errQueueCorrupt.
func decodeQueueHeader(b []byte) (clientID [16]byte, base uint64, err error) {
	if len(b) < queueHeaderSize {
		return clientID, 0, fmt.Errorf("%w: header is %d bytes, want %d", errQueueCorrupt, len(b), queueHeaderSize)
	}
	if string(b[0:4]) != queueMagic {
		return clientID, 0, fmt.Errorf("%w: bad magic %q", errQueueCorrupt, b[0:4])
	}
	if got, want := binary.LittleEndian.Uint32(b[44:48]), crc32.Checksum(b[:44], castagnoli); got != want {
		return clientID, 0, fmt.Errorf("%w: header checksum %08x, want %08x", errQueueCorrupt, got, want)
	}
	if v := binary.LittleEndian.Uint16(b[4:6]); v != queueFormatVersion {
		return clientID, 0, fmt.Errorf("%w: unsupported format version %d", errQueueCorrupt, v)
	}
	for _, c := range b[6:8] {
		if c != 0 {
			return clientID, 0, fmt.Errorf("%w: reserved header bytes are not zero", errQueueCorrupt)
		}
	}
	for _, c := range b[32:44] {
		if c != 0 {
			return clientID, 0, fmt.Errorf("%w: reserved header bytes are not zero", errQueueCorrupt)
		}
	}
	copy(clientID[:], b[8:24])
	return clientID, binary.LittleEndian.Uint64(b[24:32]), nil
}

// appendQueueRecord appends m's record to dst. The caller keeps the body
// within queueMaxBody and the name within 65535 bytes.
func appendQueueRecord(dst []byte, m queuedMutation) []byte {
	bodyLen := queueBodyFixed + len(m.Name) + len(m.Args)
	start := len(dst)
	dst = append(dst, make([]byte, queueRecordHead+queueBodyFixed)...)
	binary.LittleEndian.PutUint32(dst[start:], uint32(bodyLen))
	binary.LittleEndian.PutUint64(dst[start+8:], m.ID)
	binary.LittleEndian.PutUint16(dst[start+16:], uint16(len(m.Name)))
	dst = append(dst, m.Name...)
	dst = append(dst, m.Args...)
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(dst[start+queueRecordHead:], castagnoli))
	return dst
}

// decodeQueueRecords returns the valid records after base in b (the file
// without its header) and the byte length of the valid prefix of b.
func decodeQueueRecords(b []byte, base uint64) (recs []queuedMutation, valid int) {
	recs, _, valid, _ = decodeQueueRecordsAt(b, base)
	return recs, valid
}

// decodeQueueRecordsAt is decodeQueueRecords that also returns each
// returned record's offset in b and the last id in the valid prefix (0 if
// none).
func decodeQueueRecordsAt(b []byte, base uint64) (recs []queuedMutation, offs []int, valid int, last uint64) {
	for off := 0; ; {
		rest := b[off:]
		if len(rest) < queueRecordHead {
			return recs, offs, off, last
		}
		bodyLen := binary.LittleEndian.Uint32(rest[0:4])
		if bodyLen < queueBodyFixed || bodyLen > queueMaxBody || uint64(len(rest)-queueRecordHead) < uint64(bodyLen) {
			return recs, offs, off, last
		}
		body := rest[queueRecordHead : queueRecordHead+int(bodyLen)]
		if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(rest[4:8]) {
			return recs, offs, off, last
		}
		id := binary.LittleEndian.Uint64(body[0:8])
		nameLen := int(binary.LittleEndian.Uint16(body[8:10]))
		if nameLen > len(body)-queueBodyFixed {
			return recs, offs, off, last
		}
		// Ids are gap-free; the first may start anywhere above 0 because
		// compaction can leave settled records below the base.
		if id == 0 || (last != 0 && id != last+1) {
			return recs, offs, off, last
		}
		last = id
		if id > base {
			recs = append(recs, queuedMutation{
				ID:   id,
				Name: string(body[queueBodyFixed : queueBodyFixed+nameLen]),
				// A copy, so that memory does not pin the whole file.
				Args: append(json.RawMessage(nil), body[queueBodyFixed+nameLen:]...),
			})
			offs = append(offs, off)
		}
		off += queueRecordHead + int(bodyLen)
	}
}
