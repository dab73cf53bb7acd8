// Package server is the authority: it runs mutators in one global order and
// turns each commit into a page set that replicas apply.
package server

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	sqlite3 "github.com/ncruces/go-sqlite3"
	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// Sentinel errors of the authority.
var (
	// ErrGap is the error of a mutation whose id skips ahead of the
	// client's last acknowledged id + 1. The client must push its
	// mutations in order.
	ErrGap = errors.New("server: mutation id is not the next one for this client")
	// ErrForbidden is wrapped in the rejection of a mutator that broke the
	// mutator contract (transaction control, reserved tables, ATTACH,
	// writes outside the replicated database, pragmas that change the
	// file): see mutators.Authorize, which replicas enforce too.
	ErrForbidden = errors.New("server: statement not allowed in a mutator")
	// ErrTimeLimit is wrapped in the rejection of a mutator that had not
	// returned within the mutator time limit.
	ErrTimeLimit = errors.New("time limit exceeded")
	// ErrDiskFull is wrapped in the error of a batch (or any write) that
	// failed because the disk is full (SQLITE_FULL, or an I/O error caused
	// by ENOSPC). Nothing of the batch is committed; once space returns
	// the authority goes on.
	ErrDiskFull = errors.New("server: no space left on device")
	// ErrSelfCheck is the error of Verify when the file does not match the
	// checksum the authority tracks (and ships to replicas).
	ErrSelfCheck = errors.New("server: self-check failed: the database file does not match the tracked checksum")
)

// Defaults and limits of the authority.
const (
	// DefaultMutatorTimeout is how long one mutator may run on the server
	// by default. Every other client of the database waits while it runs
	// (batches are the global order), so the limit is what one buggy or
	// hostile mutation can cost everybody.
	DefaultMutatorTimeout = 5 * time.Second
	// DefaultLogVersions and DefaultLogBytes bound the in-memory log an
	// in-process Authority keeps for Since (the network server keeps an
	// on-disk change log instead and no in-memory one).
	DefaultLogVersions = 1000
	DefaultLogBytes    = 64 << 20
	// versionLogTimeout bounds one append to Config.VersionLog. The writer
	// waits for it under the authority's lock, and a cluster's stream
	// elects a new leader in about 5 s (RESEARCH.md: a median 4.7 s after
	// a SIGKILL), so an append may ride out one election and no more.
	versionLogTimeout = 10 * time.Second
	// restoreTimeout bounds a LocalCache's Restore of one database on
	// open (the snapshot and the stream after it), so that an unreachable
	// log fails the open instead of holding it, and everyone waiting on
	// it, forever. Not measured: a ceiling far above the restores the
	// cluster tests run (well under a second for small databases).
	restoreTimeout = 10 * time.Minute
	// savepointName is the savepoint around each mutation. Its name has
	// the reserved prefix, so the authorizer refuses a mutator that
	// releases or rolls back to it.
	savepointName = mutators.ReservedPrefix + "mutation"
	// scanChunkPages is how many pages a scan of the main file reads at
	// once: the authority never holds the whole database in memory.
	scanChunkPages = 256
)

// AuthorityOptions tune an Authority. Zero values take the defaults named.
type AuthorityOptions struct {
	// MutatorTimeout bounds how long one mutator may run
	// (DefaultMutatorTimeout; negative: no limit). A mutator past it is
	// rejected with ErrTimeLimit, its effects rolled back, and the batch
	// goes on. SQLite statements are interrupted at the limit; a mutator
	// spinning in Go code without calling SQLite cannot be interrupted,
	// and is rejected only when it returns.
	MutatorTimeout time.Duration
	// SelfCheck runs Verify after every commit and stops the authority
	// (every later call fails with ErrSelfCheck) if the file does not
	// match. It reads the whole database each time: for tests and
	// debugging only.
	SelfCheck bool
	// LogVersions and LogBytes bound the in-memory log kept for Since
	// (DefaultLogVersions, DefaultLogBytes; negative: keep none).
	LogVersions int
	LogBytes    int64
	// ClientTTL is how long after a client's last push its records (last
	// mutation id, rejections) are kept (DefaultClientTTL; negative:
	// forever). A batch collects older ones, at most once per
	// CollectEvery; the client, coming back, stops with
	// replica.ErrClientCollected.
	ClientTTL time.Duration
	// Now is the clock of push times and collections (nil: time.Now).
	Now func() time.Time
}

func (o *AuthorityOptions) defaults() {
	if o.MutatorTimeout == 0 {
		o.MutatorTimeout = DefaultMutatorTimeout
	}
	if o.ClientTTL == 0 {
		o.ClientTTL = DefaultClientTTL
	}
	if o.LogVersions == 0 {
		o.LogVersions = DefaultLogVersions
	}
	if o.LogBytes == 0 {
		o.LogBytes = DefaultLogBytes
	}
}

// Mutation is one client mutation as the authority receives it.
type Mutation struct {
	ClientID string
	ID       uint64
	Name     string
	Args     json.RawMessage
	// UserID and Claims are the identity of the session that pushed the
	// mutation (Identity.UserID and Claims). The mutator sees them, with
	// ClientID, through mutators.CallerFrom; a batch mixes callers, and
	// each mutator sees its own.
	UserID string
	Claims map[string]any
}

// caller is the mutators.Caller a mutator of m runs as.
func (m *Mutation) caller() mutators.Caller {
	return mutators.Caller{ClientID: m.ClientID, UserID: m.UserID, Claims: m.Claims}
}

// Outcome is what the authority did with a mutation.
type Outcome int

const (
	// Applied means the mutator ran and its effects are in the new version.
	Applied Outcome = iota
	// Rejected means the mutator failed; the id still counts as processed,
	// and the error is recorded in the database for the client to read.
	Rejected
	// Duplicate means the id was processed before; nothing was done.
	Duplicate
	// Refused means the id leaves a gap; nothing was done (see ErrGap).
	Refused
)

// Result is the outcome of one mutation of a batch.
type Result struct {
	Mutation Mutation
	Outcome  Outcome
	Err      string // the mutator's error (Rejected) or the refusal (Refused)
}

// Authority runs the mutators of one database. Its methods are safe for
// concurrent use; batches run one at a time, which is the global order.
type Authority struct {
	mu          sync.Mutex
	limit       *mutatorLimit // the mutators' reusable deadline (guarded by mu)
	path        string
	reg         *mutators.Registry
	db          *sql.DB
	conn        *sql.Conn
	raw         *sqlite3.Conn       // a.conn's SQLite connection: its authorizer, its autocommit state
	q           *mutators.StmtCache // a.conn with the authority's own statements prepared once (role Engine)
	mq          *mutators.StmtCache // a.conn with the mutators' statements prepared once (role Mutator)
	role        atomic.Int32        // mutators.Role of statements being prepared on a.conn, for the authorizer
	denied      atomic.Pointer[string]
	opts        AuthorityOptions
	capture     *vfs.Capture
	sums        *wal.ChecksumTable
	pageSize    uint32
	version     uint64
	dbSize      uint32         // database size in pages at version
	log         []*wal.PageSet // the latest versions (bounded by opts), for in-process use; the network server keeps an on-disk change log instead
	logBytes    int64          // page bytes in log
	logBase     uint64         // version before log[0]
	noLog       bool           // keep no in-memory log (the network server's change log has the versions)
	pinned      int            // snapshots being read from the main file: no checkpoint may write it meanwhile
	ckptAt      int64          // WAL frames at the last checkpoint of this WAL generation
	checkpoints int            // checkpoints run, for tests
	pin         snapshotPin    // the version the main file holds while pinned
	broken      error          // set when a committed version could not be captured; the authority then refuses work (reopen it)
	gc          gcState        // when bookkeeping was last collected (guarded by mu)
	// guardNext is set when the last batch rejected a mutation: the next
	// one runs with a savepoint around each mutation from the start (see
	// Push), since one that fails is then likely. Guarded by mu.
	guardNext bool

	// onCommit, if set, runs under the authority's lock after each captured
	// commit, with each page's image before it (nil for a new page) and the
	// database size before it. The network server encodes, logs and
	// broadcasts the version there, so that subscribers see versions in
	// order and a new subscriber can register between two commits. An
	// error (the version log refused the version) stops the authority.
	onCommit func(ps *wal.PageSet, before [][]byte, baseDBSize uint32) error
	// onLost, if set, runs under the lock right after onCommit refused a
	// version (the authority is then stopped): the network server
	// reopens the database from the version log there (reopenLocked).
	onLost func(cause error)
	// openCheck, if set, runs once in open with the file's version and
	// checksum, before version 1 or an upgrade is committed; an error
	// ends the open (the network server's LocalCache check).
	openCheck func(ctx context.Context, version, checksum uint64) error
	// observeCommit and observeCheckpoint, if set, take the duration of
	// each COMMIT statement (with the WAL fsync) and checkpoint (metrics).
	observeCommit, observeCheckpoint observer
}

// errNotLogged marks an authority stopped because the version log refused
// a version it had committed: the network server reopens it (reopen).
var errNotLogged = errors.New("server: a version is committed locally but not in the version log")

// reset forgets the state of the closed file, so that open can run again
// on the same Authority (whose pointer Server.Authority may have handed
// out): the reopen of a database whose version the log refused. pinned and
// pin stay: the snapshot readers of the old file still release them. Called
// with mu held, after Close.
func (a *Authority) reset() {
	a.db, a.conn, a.raw, a.q, a.mq, a.capture = nil, nil, nil, nil, nil, nil
	a.sums, a.pageSize, a.version, a.dbSize = wal.NewChecksumTable(wal.DefaultPageSize), 0, 0, 0
	a.log, a.logBytes, a.logBase, a.ckptAt = nil, 0, 0, 0
	a.broken, a.gc = nil, gcState{}
}

// checkpointFrames is the WAL length after which the authority checkpoints.
// It checkpoints itself, right after capturing a commit, because the capture
// must see every commit's frames before a WAL restart can overwrite them.
const checkpointFrames = 1000

// OpenAuthority opens (or creates, at version 0 = the empty database) the
// server database at path. If setup is not nil and the database is at version
// 0, setup runs as version 1 together with the reserved tables: that is where
// an app creates its schema.
func OpenAuthority(ctx context.Context, path string, reg *mutators.Registry, setup func(ctx context.Context, tx mutators.Tx) error) (*Authority, error) {
	return OpenAuthorityWith(ctx, path, reg, setup, AuthorityOptions{})
}

// OpenAuthorityWith is OpenAuthority with options.
func OpenAuthorityWith(ctx context.Context, path string, reg *mutators.Registry, setup func(ctx context.Context, tx mutators.Tx) error, opts AuthorityOptions) (*Authority, error) {
	opts.defaults()
	a := &Authority{path: path, reg: reg, opts: opts}
	if err := a.open(ctx, setup); err != nil {
		a.Close()
		return nil, fmt.Errorf("open authority %s: %w", path, err)
	}
	return a, nil
}

func (a *Authority) open(ctx context.Context, setup func(ctx context.Context, tx mutators.Tx) error) (err error) {
	// Opening writes too (the WAL, the checkpoint, version 1): a full disk
	// says so, as a batch's does.
	defer func() { err = a.diskFull(err) }()
	if _, err := os.Stat(a.path); errors.Is(err, fs.ErrNotExist) {
		if err := os.WriteFile(a.path, wal.EmptyDatabase(wal.DefaultPageSize), 0o644); err != nil {
			return err
		}
	}
	db, err := driver.Open("file:"+a.path+"?_txlock=immediate", nil)
	if err != nil {
		return err
	}
	a.db = db
	a.conn, err = db.Conn(ctx)
	if err != nil {
		return err
	}
	if err := a.conn.Raw(func(dc any) error {
		c, ok := dc.(driver.Conn)
		if !ok {
			return fmt.Errorf("server: driver connection is %T, not a go-sqlite3 connection", dc)
		}
		a.raw = c.Raw()
		return a.raw.SetAuthorizer(a.authorize)
	}); err != nil {
		return err
	}
	// Two caches, because SQLite authorizes a statement when it prepares
	// it: a statement prepared for the authority must never run for a
	// mutator.
	a.q = mutators.NewStmtCache(a.conn, 256)
	a.mq = mutators.NewStmtCache(a.conn, 256)
	for _, p := range []string{
		"PRAGMA journal_mode=WAL",
		"PRAGMA synchronous=FULL",
		"PRAGMA wal_autocheckpoint=0",
		"PRAGMA wal_checkpoint(TRUNCATE)",
	} {
		if _, err := a.conn.ExecContext(ctx, p); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	if err := a.scan(); err != nil {
		return err
	}
	if err := presizeWAL(a.path+"-wal", a.pageSize); err != nil {
		return err
	}
	if a.capture, err = vfs.NewCapture(a.path); err != nil {
		return err
	}
	if a.version, err = mutators.Version(ctx, a.conn); err != nil {
		return err
	}
	a.logBase = a.version
	if a.openCheck != nil {
		if err := a.openCheck(ctx, a.version, a.sums.Sum()); err != nil {
			return err
		}
	}
	if a.version == 0 {
		if _, err := a.commit(ctx, func(tx mutators.Tx) error {
			if _, err := tx.Exec(mutators.ReservedSchema); err != nil {
				return err
			}
			if setup != nil {
				return setup(ctx, tx)
			}
			return nil
		}); err != nil {
			return fmt.Errorf("set up version 1: %w", err)
		}
		return nil
	}
	return a.upgradeReserved(ctx)
}

// presizeWALFrames is how many frames presizeWAL makes room for: a WAL
// generation (checkpointFrames) and a batch or two past it.
const presizeWALFrames = checkpointFrames + 64

// presizeWAL writes zeros over the WAL file at path up to presizeWALFrames
// frames of pageSize, and syncs them, if it is shorter. SQLite truncates
// the WAL at a TRUNCATE checkpoint (open, a snapshot) and then appends to
// it for a whole generation; an fdatasync of a file that grew must commit
// the file system's journal (its size changed), one of a file written over
// in place need not: on ext4 here, 0.34-0.39 ms appending against
// 0.19-0.21 ms overwriting, p50, measured side by side. Zeros, not
// fallocate: an allocated but unwritten extent turns written on its first
// write, which is a journal commit again. An all-zero header is no WAL to
// SQLite (nor to vfs.Capture and the self-check): the next commit writes a
// header and its frames over the zeros. If the zeros cannot be written
// (the disk is nearly full), the WAL is left empty, as SQLite left it.
func presizeWAL(path string, pageSize uint32) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // SQLite creates it (not in WAL mode yet)
	}
	if err != nil {
		return fmt.Errorf("presize the WAL: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("presize the WAL: %w", err)
	}
	want := int64(wal.HeaderSize) + presizeWALFrames*(int64(wal.FrameHeaderSize)+int64(pageSize))
	if st.Size() > 0 {
		// Only a truncated (empty) WAL: a longer one holds frames SQLite
		// may still read, and is overwritten in place already.
		return nil
	}
	zeros := make([]byte, 256<<10)
	for off := int64(0); off < want && err == nil; off += int64(len(zeros)) {
		_, err = f.WriteAt(zeros[:min(int64(len(zeros)), want-off)], off)
	}
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		// Only speed is lost (a disk that is nearly full, say): give
		// the space back and let SQLite append as before.
		return f.Truncate(0)
	}
	return nil
}

// scan builds the checksum table from the main file, which holds everything
// after the TRUNCATE checkpoint at open. It reads the file in chunks, so that
// opening a large database does not load it into memory.
func (a *Authority) scan() error {
	f, err := os.Open(a.path)
	if err != nil {
		return err
	}
	defer f.Close()
	sums, n, err := scanPages(context.Background(), f, nil)
	if err != nil {
		return err
	}
	a.pageSize = sums.PageSize()
	a.sums = sums
	a.dbSize = n
	return nil
}

// scanPages computes the checksum table of the database in f, reading
// scanChunkPages pages at a time; over, if not nil, supplies newer images
// of some pages (the WAL's). The database has the file's size in pages
// unless over says otherwise (dbSize > 0).
func scanPages(ctx context.Context, f *os.File, over *walOverlay) (*wal.ChecksumTable, uint32, error) {
	var hdr [100]byte
	pageSize := uint32(wal.DefaultPageSize)
	if _, err := f.ReadAt(hdr[:], 0); err == nil {
		if ps := uint32(hdr[16])<<8 | uint32(hdr[17]); ps == 1 {
			pageSize = 65536
		} else if ps >= 512 {
			pageSize = ps
		}
	}
	st, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	n := uint32(st.Size() / int64(pageSize))
	if over != nil && over.dbSize > 0 {
		if over.pageSize != pageSize {
			return nil, 0, fmt.Errorf("WAL page size %d, database %d", over.pageSize, pageSize)
		}
		n = over.dbSize
	}
	sums := wal.NewChecksumTable(pageSize)
	sums.Resize(n)
	buf := make([]byte, scanChunkPages*int(pageSize))
	fileN := uint32(st.Size() / int64(pageSize))
	for first := uint32(1); first <= n; {
		if err := ctx.Err(); err != nil {
			return nil, 0, err
		}
		k := min(n-first+1, scanChunkPages)
		chunk := buf[:int(k)*int(pageSize)]
		clear(chunk)
		if first <= fileN {
			m := min(k, fileN-first+1)
			if _, err := f.ReadAt(chunk[:int(m)*int(pageSize)], int64(first-1)*int64(pageSize)); err != nil {
				return nil, 0, fmt.Errorf("read main file: %w", err)
			}
		}
		for i := uint32(0); i < k; i++ {
			page := chunk[int(i)*int(pageSize) : int(i+1)*int(pageSize)]
			if over != nil {
				if p, err := over.page(first + i); err != nil {
					return nil, 0, err
				} else if p != nil {
					page = p
				}
			}
			sums.Set(first+i, wal.PageChecksum(first+i, page))
		}
		first += k
	}
	return sums, n, nil
}

// commit runs fn in one transaction that also bumps the version, then
// captures the commit's page set. fn returning an error rolls everything back.
func (a *Authority) commit(ctx context.Context, fn func(tx mutators.Tx) error) (*wal.PageSet, error) {
	if a.broken != nil {
		return nil, a.broken
	}
	if a.q == nil {
		// Closed: another node owns the database and this one follows it.
		return nil, fmt.Errorf("%w: the database is not open for writing on this node", ErrNotOwner)
	}
	if _, err := a.q.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return nil, a.diskFull(err)
	}
	tx := mutators.NewTx(ctx, a.q)
	err := fn(tx)
	if err == nil && a.raw.GetAutocommit() {
		// Something ended the transaction under fn (SQLite rolls back the
		// whole transaction on some errors): committing now would commit
		// nothing, or only what ran after it. Fail the batch instead.
		err = errors.New("server: the transaction ended before its commit")
	}
	if err == nil {
		err = mutators.SetVersion(ctx, a.q, a.version+1)
	}
	if err == nil {
		start := time.Now()
		_, err = a.q.ExecContext(ctx, "COMMIT")
		if err == nil && a.observeCommit != nil {
			a.observeCommit.Observe(time.Since(start).Seconds())
		}
	}
	if err != nil {
		if !a.raw.GetAutocommit() {
			if _, rerr := a.conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK"); rerr != nil {
				// The transaction is still open and cannot be rolled
				// back: the next batch would run inside it.
				a.broken = fmt.Errorf("server: roll back a failed batch: %w (after %w)", a.diskFull(rerr), err)
				return nil, a.broken
			}
		}
		return nil, a.diskFull(err)
	}
	a.version++
	pages, before, dbSize, err := a.capture.NextBefore()
	if err != nil {
		// The version is committed but cannot be shipped: stop, rather
		// than serve a change log with a hole in it.
		a.broken = fmt.Errorf("server: capture version %d: %w", a.version, err)
		return nil, a.broken
	}
	ps := &wal.PageSet{Version: a.version, PageSize: a.pageSize, DBSize: dbSize, PreChecksum: a.sums.Sum(), Pages: pages}
	// Each page is hashed once, for the preview and the apply both.
	crcs := wal.PageChecksums(ps)
	ps.PostChecksum = a.sums.PreviewWith(ps, crcs)
	a.sums.ApplyWith(ps, crcs)
	base := a.dbSize
	a.dbSize = dbSize
	a.remember(ps)
	if a.onCommit != nil {
		if err := a.onCommit(ps, before, base); err != nil {
			// Committed here, but not where it counts (the cluster's
			// version log): it must never be acknowledged or served, so
			// the authority stops (and onLost may reopen it from the
			// log: docs/CLUSTER.md says how the version is discarded).
			err = fmt.Errorf("%w: version %d: %w", errNotLogged, a.version, err)
			a.broken = err
			if a.onLost != nil {
				a.onLost(err)
			}
			return nil, err
		}
	}
	if err := a.maybeCheckpoint(ctx); err != nil {
		return nil, a.diskFull(err)
	}
	if a.opts.SelfCheck {
		if err := a.verify(); err != nil {
			a.broken = err
			return nil, err
		}
	}
	return ps, nil
}

// remember appends ps to the in-memory log and drops its oldest versions
// beyond the bounds.
func (a *Authority) remember(ps *wal.PageSet) {
	if a.noLog || a.opts.LogVersions < 0 || a.opts.LogBytes < 0 {
		a.logBase = a.version
		return
	}
	a.log = append(a.log, ps)
	a.logBytes += int64(len(ps.Pages)) * int64(ps.PageSize)
	drop := 0
	for drop < len(a.log)-1 && (len(a.log)-drop > a.opts.LogVersions || a.logBytes > a.opts.LogBytes) {
		a.logBytes -= int64(len(a.log[drop].Pages)) * int64(a.log[drop].PageSize)
		a.log[drop] = nil
		drop++
	}
	if drop > 0 {
		a.log = append(a.log[:0:0], a.log[drop:]...)
		a.logBase += uint64(drop)
	}
}

// diskFull wraps err in ErrDiskFull when its cause is a full disk, so that
// the log and the client say so instead of "disk I/O error".
func (a *Authority) diskFull(err error) error {
	if errors.Is(err, sqlite3.IOERR) && !errors.Is(err, ErrDiskFull) && !isDiskFull(err) && lowOnSpace(filepath.Dir(a.path), a.pageSize) {
		return fmt.Errorf("%w: %w", ErrDiskFull, err)
	}
	return wrapFull(err)
}

// wrapFull marks err with ErrDiskFull where err says itself that the disk
// is full (the authority's diskFull also reads a bare I/O error on a
// nearly full disk as one).
func wrapFull(err error) error {
	if err == nil || errors.Is(err, ErrDiskFull) || !isDiskFull(err) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrDiskFull, err)
}

// isDiskFull reports whether err says itself that the disk is full.
func isDiskFull(err error) bool {
	return errors.Is(err, sqlite3.FULL) || errors.Is(err, syscall.ENOSPC)
}

// lowOnSpace reports whether the file system of dir has less than a few
// pages free. go-sqlite3 reports a write that failed with ENOSPC as a bare
// SQLITE_IOERR_WRITE (it misses the errno inside *os.PathError), so an I/O
// error on a file system with no room left is taken for what it is.
func lowOnSpace(dir string, pageSize uint32) bool {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return false
	}
	return uint64(st.Bavail)*uint64(st.Bsize) < 16*uint64(max(pageSize, 4096))
}

func (a *Authority) maybeCheckpoint(ctx context.Context) error {
	if a.pinned > 0 {
		return nil // a snapshot is reading the main file; the WAL grows meanwhile
	}
	frames := a.capture.Frames()
	if frames < a.ckptAt {
		a.ckptAt = 0 // SQLite restarted the WAL after the last checkpoint
	}
	if frames < a.ckptAt+checkpointFrames {
		return nil
	}
	// Remember where: if a reader keeps SQLite from restarting the WAL, the
	// next checkpoint waits for another checkpointFrames frames instead of
	// running after every commit.
	a.ckptAt = frames
	a.checkpoints++
	start := time.Now()
	_, err := a.conn.ExecContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)")
	if err == nil && a.observeCheckpoint != nil {
		a.observeCheckpoint.Observe(time.Since(start).Seconds())
	}
	return err
}

// Push runs a batch of mutations in one transaction, a SAVEPOINT each, in
// the order given. It returns the new version's page set (nil if nothing was
// applied or rejected) and one result per mutation.
//
// A mutator's own failure (its error, a panic, a statement the contract
// forbids, the time limit) rejects that mutation only. If a mutator's
// failure ended the whole transaction (SQLite rolls it back when a write
// statement is interrupted), the batch runs again from the start with that
// mutation rejected up front. Any other failure fails the whole batch and
// commits nothing.
//
// A batch first runs without the savepoints (unless the batch before it
// rejected a mutation): SAVEPOINT and RELEASE around every mutation were a
// fifth of the writer's CPU at 10 clients pushing (pprof of
// BenchmarkServerThroughput), and a savepoint is needed only to undo a
// mutator that fails. If one fails, the attempt is rolled back like one
// whose transaction a mutator ended, and the batch runs again with that
// mutation rejected up front and a savepoint around each of the others: a
// batch with rejections costs at most one extra attempt, not one per
// rejection. The outcomes are the same either way: the mutators before
// the failed one run again on the same state, and the failed one is
// recorded with the error of its first run.
func (a *Authority) Push(ctx context.Context, batch []Mutation) (*wal.PageSet, []Result, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// rejected holds the mutations that lost an earlier attempt its
	// transaction, with their rejection.
	rejected := map[int]string{}
	guard := a.guardNext
	for {
		results, ps, lost, err := a.pushOnce(ctx, batch, rejected, guard)
		if lost != nil && len(rejected) < len(batch) {
			rejected[lost.index] = lost.msg
			guard = true
			continue
		}
		if errors.Is(err, errNothing) {
			a.guardNext = len(rejected) > 0
			return nil, results, nil
		}
		if err != nil {
			return nil, nil, fmt.Errorf("push batch of %d: %w", len(batch), err)
		}
		a.guardNext = len(rejected) > 0 || anyRejected(results)
		return ps, results, nil
	}
}

// anyRejected reports whether a batch rejected one of its mutations.
func anyRejected(results []Result) bool {
	for _, r := range results {
		if r.Outcome == Rejected {
			return true
		}
	}
	return false
}

// lostTx is the failure of a batch attempt whose transaction mutation index
// ended by failing.
type lostTx struct {
	index int
	msg   string
}

func (l *lostTx) Error() string {
	return fmt.Sprintf("mutation %d of the batch ended the transaction: %s", l.index, l.msg)
}

// pushOnce is one attempt at a batch. With guard, each mutation runs inside
// a savepoint, and one that fails is rolled back to it and rejected; without,
// the first failure ends the attempt (lost), as when a mutator's failure
// ended the transaction.
func (a *Authority) pushOnce(ctx context.Context, batch []Mutation, rejected map[int]string, guard bool) ([]Result, *wal.PageSet, *lostTx, error) {
	results := make([]Result, len(batch))
	var lost *lostTx
	ps, err := a.commit(ctx, func(tx mutators.Tx) error {
		processed := 0
		last := map[string]uint64{}
		moved := map[string]bool{} // clients with a mutation applied or rejected in this batch
		for i, m := range batch {
			results[i] = Result{Mutation: m}
			lmid, ok := last[m.ClientID]
			if !ok {
				var err error
				if lmid, err = mutators.LastMutationID(ctx, a.q, m.ClientID); err != nil {
					return err
				}
			}
			switch {
			case m.ID <= lmid:
				results[i].Outcome = Duplicate
				last[m.ClientID] = lmid
				continue
			case m.ID > lmid+1:
				results[i].Outcome = Refused
				results[i].Err = fmt.Sprintf("%v: got %d, want %d", ErrGap, m.ID, lmid+1)
				last[m.ClientID] = lmid
				continue
			}
			msg, pre := rejected[i]
			if !pre {
				if guard {
					if _, err := a.q.ExecContext(ctx, "SAVEPOINT "+savepointName); err != nil {
						return err
					}
				}
				merr := a.runMutator(ctx, m)
				if df := (*diskFullError)(nil); errors.As(merr, &df) {
					return df.err // the whole batch fails, and is retried later
				}
				if a.raw.GetAutocommit() || (merr != nil && !guard) {
					// The failure rolled back the whole transaction, or
					// there is no savepoint to roll back to.
					why := "the transaction ended"
					if merr != nil {
						why = merr.Error()
					}
					lost = &lostTx{index: i, msg: why}
					return lost
				}
				if guard {
					if merr != nil {
						if _, err := a.q.ExecContext(ctx, "ROLLBACK TO "+savepointName); err != nil {
							return err
						}
						msg = merr.Error()
					}
					if _, err := a.q.ExecContext(ctx, "RELEASE "+savepointName); err != nil {
						return err
					}
				}
				pre = merr != nil
			}
			if pre {
				results[i].Outcome = Rejected
				results[i].Err = msg
				if err := mutators.RecordRejection(ctx, a.q, m.ClientID, m.ID, m.Name, msg, a.version+1); err != nil {
					return err
				}
			} else {
				results[i].Outcome = Applied
			}
			last[m.ClientID] = m.ID
			moved[m.ClientID] = true
			processed++
		}
		if processed == 0 {
			return errNothing
		}
		// One upsert per client per batch, not per mutation: it was a
		// quarter of the writer's CPU at 10 clients pushing (pprof of
		// BenchmarkServerThroughput). Nothing between reads the row: the
		// loop keeps the ids in last, and the batch commits or fails whole.
		for c := range moved {
			if err := mutators.SetLastMutationID(ctx, a.q, c, last[c]); err != nil {
				return err
			}
		}
		return a.bookkeep(ctx, last)
	})
	if err == nil {
		a.collected()
	}
	if lost != nil && errors.Is(err, lost) && !errors.Is(err, ErrDiskFull) {
		return results, nil, lost, err
	}
	return results, ps, nil, err
}

// runMutator runs one mutator under the mutator role and the time limit.
// It returns the mutator's rejection: its own error, a statement the
// contract forbids (ErrForbidden, naming it), or ErrTimeLimit.
func (a *Authority) runMutator(ctx context.Context, m Mutation) error {
	mctx, timedOut := context.Context(ctx), func() bool { return false }
	switch {
	case a.opts.MutatorTimeout <= 0:
	case ctx.Done() == nil:
		// The writer's context is never done: one reusable deadline.
		if a.limit == nil || a.limit.Context != ctx {
			a.limit = newMutatorLimit(ctx)
		}
		a.limit = a.limit.arm(a.opts.MutatorTimeout)
		limit := a.limit
		mctx, timedOut = limit, limit.disarm
	default:
		tctx, cancel := context.WithTimeoutCause(ctx, a.opts.MutatorTimeout, ErrTimeLimit)
		defer cancel()
		mctx, timedOut = tctx, func() bool { return context.Cause(tctx) == ErrTimeLimit && ctx.Err() == nil }
	}
	// The caller goes on top of the limit: a value context delegates Done
	// and Err to it, so the statements still see the reusable deadline.
	mctx = mutators.WithCaller(mctx, m.caller())
	a.denied.Store(nil)
	a.role.Store(int32(mutators.RoleMutator))
	err := a.reg.Run(mctx, mutators.NewTx(mctx, a.mq), m.Name, m.Args)
	a.role.Store(int32(mutators.RoleEngine))
	late := timedOut()
	if why := a.denied.Swap(nil); why != nil {
		// Rejected even if the mutator swallowed the error: it broke the
		// contract, and its effects cannot be trusted.
		return fmt.Errorf("mutator %s: %w: %s", m.Name, ErrForbidden, *why)
	}
	if late {
		return fmt.Errorf("mutator %s: %w (%v)", m.Name, ErrTimeLimit, a.opts.MutatorTimeout)
	}
	if err != nil && (isDiskFull(err) || (errors.Is(err, sqlite3.IOERR) && lowOnSpace(filepath.Dir(a.path), a.pageSize))) {
		// Not the mutator's fault: fail the batch, so that the mutation
		// is retried once space returns instead of being rejected.
		return &diskFullError{err: a.diskFull(err)}
	}
	return err
}

// diskFullError is a mutator's failure caused by a full disk.
type diskFullError struct{ err error }

func (e *diskFullError) Error() string { return e.err.Error() }
func (e *diskFullError) Unwrap() error { return e.err }

// authorize is the authorizer of the writer connection: mutators.Authorize
// under the role of whoever is preparing the statement.
func (a *Authority) authorize(action sqlite3.AuthorizerActionCode, name3, name4, schema, _ string) sqlite3.AuthorizerReturnCode {
	who := mutators.Role(a.role.Load())
	why, ok := mutators.Authorize(who, action, name3, name4, schema)
	if ok {
		return sqlite3.AUTH_OK
	}
	a.denied.CompareAndSwap(nil, &why)
	return sqlite3.AUTH_DENY
}

var errNothing = errors.New("nothing to commit")

// Exec runs fn as a version of its own, outside any mutator: a migration or
// an administrative change. The change is shipped to replicas like any other.
func (a *Authority) Exec(ctx context.Context, fn func(tx mutators.Tx) error) (*wal.PageSet, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.commit(ctx, fn)
}

// Version is the latest version.
func (a *Authority) Version() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.version
}

// Checksum is the whole-database checksum at the latest version.
func (a *Authority) Checksum() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.sums.Sum()
}

// Since returns the page sets of the versions after v, in order. It fails if
// v is older than what the authority kept (a replica that far behind needs a
// snapshot).
func (a *Authority) Since(v uint64) ([]*wal.PageSet, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.noLog {
		return nil, errors.New("server: this authority keeps no in-memory log")
	}
	if v < a.logBase {
		return nil, fmt.Errorf("server: version %d is older than the change log (from %d); take a snapshot", v, a.logBase)
	}
	if v > a.version {
		return nil, fmt.Errorf("server: version %d is ahead of the server's %d", v, a.version)
	}
	return append([]*wal.PageSet(nil), a.log[v-a.logBase:]...), nil
}

// Snapshot returns the whole database at the latest version as one page set
// that replaces a replica's database whatever its state.
func (a *Authority) Snapshot(ctx context.Context) (*wal.PageSet, error) {
	r, err := a.OpenSnapshot(ctx)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	b, err := r.ReadPages(1, r.DBSize)
	if err != nil {
		return nil, err
	}
	ps := &wal.PageSet{Version: r.Version, Flags: wal.FlagSnapshot, PageSize: r.PageSize, DBSize: r.DBSize, PostChecksum: r.Checksum}
	for i := uint32(0); i < r.DBSize; i++ {
		ps.Pages = append(ps.Pages, wal.Page{Pgno: i + 1, Data: b[int(i)*int(r.PageSize) : int(i+1)*int(r.PageSize)]})
	}
	return ps, nil
}

// SnapshotReader reads a consistent image of the database at one version
// from the main file, page range by page range, without holding up the
// writer: commits meanwhile go to the WAL, and no checkpoint runs until Close.
type SnapshotReader struct {
	a        *Authority // nil for a follower's copy
	f        *os.File
	remove   string // a file to remove at Close (a follower's copy of its copy)
	Version  uint64
	PageSize uint32
	DBSize   uint32
	Checksum uint64
	closed   bool
}

type snapshotPin struct {
	version  uint64
	dbSize   uint32
	checksum uint64
}

// OpenSnapshot checkpoints everything into the main file and pins it there
// at the current version. The caller must Close the reader.
func (a *Authority) OpenSnapshot(ctx context.Context) (*SnapshotReader, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.broken; err != nil {
		return nil, err
	}
	if a.pinned == 0 {
		var busy, logFrames, done int
		// RESTART, not TRUNCATE: the WAL keeps its length (presizeWAL), so
		// that the commits after a snapshot write over it in place
		// instead of growing it again for a whole generation.
		if err := a.conn.QueryRowContext(ctx, "PRAGMA wal_checkpoint(RESTART)").Scan(&busy, &logFrames, &done); err != nil {
			return nil, fmt.Errorf("snapshot: checkpoint: %w", a.diskFull(err)) // TestSnapshotOnFullDiskSaysSo (chaos)
		}
		if busy != 0 {
			return nil, errors.New("server: snapshot: a reader kept the checkpoint from finishing; try again")
		}
		if err := a.capture.Resync(); err != nil {
			return nil, err
		}
		a.pin = snapshotPin{a.version, a.dbSize, a.sums.Sum()}
	}
	// A second snapshot while one is being read shares its pin: the main
	// file still holds that version, and the reader catches up from there.
	f, err := os.Open(a.path)
	if err != nil {
		return nil, err
	}
	a.pinned++
	return &SnapshotReader{a: a, f: f, Version: a.pin.version, PageSize: a.pageSize, DBSize: a.pin.dbSize, Checksum: a.pin.checksum}, nil
}

// ReadPages reads count pages from first (1-based) into a new buffer.
func (s *SnapshotReader) ReadPages(first, count uint32) ([]byte, error) {
	if first == 0 || uint64(first)+uint64(count)-1 > uint64(s.DBSize) {
		return nil, fmt.Errorf("snapshot: pages %d+%d outside 1..%d", first, count, s.DBSize)
	}
	buf := make([]byte, int(count)*int(s.PageSize))
	if _, err := s.f.ReadAt(buf, int64(first-1)*int64(s.PageSize)); err != nil {
		return nil, fmt.Errorf("snapshot: read pages %d+%d: %w", first, count, err)
	}
	return buf, nil
}

// Close unpins the main file.
func (s *SnapshotReader) Close() error {
	if s.closed {
		return nil
	}
	s.closed = true
	if s.a != nil {
		s.a.mu.Lock()
		s.a.pinned--
		s.a.mu.Unlock()
	}
	err := s.f.Close()
	if s.remove != "" {
		os.Remove(s.remove)
	}
	return err
}

// Query runs a read-only query on the authority's database (for tests, tools
// and the demo's transcript).
func (a *Authority) Query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	// The handle is read under the lock: a reopen (after the version log
	// refused a version) replaces it.
	a.mu.Lock()
	db, broken := a.db, a.broken
	a.mu.Unlock()
	if db == nil {
		return nil, fmt.Errorf("server: database not open: %w", broken)
	}
	return db.QueryContext(ctx, query, args...)
}

// Close closes the database.
func (a *Authority) Close() error {
	var errs []error
	if a.capture != nil {
		errs = append(errs, a.capture.Close())
	}
	if a.q != nil {
		errs = append(errs, a.q.Close())
	}
	if a.mq != nil {
		errs = append(errs, a.mq.Close())
	}
	if a.conn != nil {
		errs = append(errs, a.conn.Close())
	}
	if a.db != nil {
		errs = append(errs, a.db.Close())
	}
	return errors.Join(errs...)
}
