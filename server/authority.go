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
	"sync"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// ErrGap is the error of a mutation whose id skips ahead of the client's last
// acknowledged id + 1. The client must push its mutations in order.
var ErrGap = errors.New("server: mutation id is not the next one for this client")

// Mutation is one client mutation as the authority receives it.
type Mutation struct {
	ClientID string
	ID       uint64
	Name     string
	Args     json.RawMessage
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
	path        string
	reg         *mutators.Registry
	db          *sql.DB
	conn        *sql.Conn
	q           *mutators.StmtCache // a.conn with its statements prepared once: the writer's path
	capture     *vfs.Capture
	sums        *wal.ChecksumTable
	pageSize    uint32
	version     uint64
	dbSize      uint32         // database size in pages at version
	log         []*wal.PageSet // every version since open, for in-process use; the network server keeps an on-disk change log instead
	logBase     uint64         // version before log[0]
	noLog       bool           // keep no in-memory log (the network server's change log has the versions)
	pinned      int            // snapshots being read from the main file: no checkpoint may write it meanwhile
	ckptAt      int64          // WAL frames at the last checkpoint of this WAL generation
	checkpoints int            // checkpoints run, for tests
	pin         snapshotPin    // the version the main file holds while pinned
	broken      error          // set when a committed version could not be captured; the authority then refuses work (reopen it)

	// onCommit, if set, runs under the authority's lock after each captured
	// commit, with each page's image before it (nil for a new page) and the
	// database size before it. The network server encodes, logs and
	// broadcasts the version there, so that subscribers see versions in
	// order and a new subscriber can register between two commits.
	onCommit func(ps *wal.PageSet, before [][]byte, baseDBSize uint32)
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
	a := &Authority{path: path, reg: reg}
	if err := a.open(ctx, setup); err != nil {
		a.Close()
		return nil, fmt.Errorf("open authority %s: %w", path, err)
	}
	return a, nil
}

func (a *Authority) open(ctx context.Context, setup func(ctx context.Context, tx mutators.Tx) error) error {
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
	a.q = mutators.NewStmtCache(a.conn, 256)
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
	if a.capture, err = vfs.NewCapture(a.path); err != nil {
		return err
	}
	if a.version, err = mutators.Version(ctx, a.conn); err != nil {
		return err
	}
	a.logBase = a.version
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
	}
	return nil
}

// scan builds the checksum table from the main file, which holds everything
// after the TRUNCATE checkpoint at open.
func (a *Authority) scan() error {
	b, err := os.ReadFile(a.path)
	if err != nil {
		return err
	}
	a.pageSize = wal.DefaultPageSize
	if len(b) >= 100 {
		if ps := uint32(b[16])<<8 | uint32(b[17]); ps == 1 {
			a.pageSize = 65536
		} else if ps >= 512 {
			a.pageSize = ps
		}
	}
	a.sums = wal.NewChecksumTable(a.pageSize)
	n := uint32(len(b) / int(a.pageSize))
	a.dbSize = n
	a.sums.Resize(n)
	for i := uint32(0); i < n; i++ {
		a.sums.Set(i+1, wal.PageChecksum(i+1, b[int(i)*int(a.pageSize):int(i+1)*int(a.pageSize)]))
	}
	return nil
}

// commit runs fn in one transaction that also bumps the version, then
// captures the commit's page set. fn returning an error rolls everything back.
func (a *Authority) commit(ctx context.Context, fn func(tx mutators.Tx) error) (*wal.PageSet, error) {
	if a.broken != nil {
		return nil, a.broken
	}
	if _, err := a.q.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return nil, err
	}
	tx := mutators.NewTx(ctx, a.q)
	err := fn(tx)
	if err == nil {
		err = mutators.SetVersion(ctx, a.q, a.version+1)
	}
	if err == nil {
		_, err = a.q.ExecContext(ctx, "COMMIT")
	}
	if err != nil {
		a.conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
		return nil, err
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
	ps.PostChecksum = a.sums.Preview(ps)
	a.sums.Apply(ps)
	base := a.dbSize
	a.dbSize = dbSize
	if !a.noLog {
		a.log = append(a.log, ps)
	}
	if a.onCommit != nil {
		a.onCommit(ps, before, base)
	}
	if err := a.maybeCheckpoint(ctx); err != nil {
		return nil, err
	}
	return ps, nil
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
	_, err := a.conn.ExecContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)")
	return err
}

// Push runs a batch of mutations in one transaction, a SAVEPOINT each, in
// the order given. It returns the new version's page set (nil if nothing was
// applied or rejected) and one result per mutation.
func (a *Authority) Push(ctx context.Context, batch []Mutation) (*wal.PageSet, []Result, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	results := make([]Result, len(batch))
	var processed int
	ps, err := a.commit(ctx, func(tx mutators.Tx) error {
		processed = 0
		last := map[string]uint64{}
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
			if _, err := tx.Exec("SAVEPOINT mutation"); err != nil {
				return err
			}
			if err := a.reg.Run(ctx, tx, m.Name, m.Args); err != nil {
				if _, rerr := tx.Exec("ROLLBACK TO mutation"); rerr != nil {
					return rerr
				}
				results[i].Outcome = Rejected
				results[i].Err = err.Error()
				if err := mutators.RecordRejection(ctx, a.q, m.ClientID, m.ID, m.Name, err.Error(), a.version+1); err != nil {
					return err
				}
			} else {
				results[i].Outcome = Applied
			}
			if _, err := tx.Exec("RELEASE mutation"); err != nil {
				return err
			}
			if err := mutators.SetLastMutationID(ctx, a.q, m.ClientID, m.ID); err != nil {
				return err
			}
			last[m.ClientID] = m.ID
			processed++
		}
		if processed == 0 {
			return errNothing
		}
		return nil
	})
	if errors.Is(err, errNothing) {
		return nil, results, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("push batch of %d: %w", len(batch), err)
	}
	return ps, results, nil
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
	a        *Authority
	f        *os.File
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
		if err := a.conn.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &logFrames, &done); err != nil {
			return nil, fmt.Errorf("snapshot: checkpoint: %w", err)
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
	s.a.mu.Lock()
	s.a.pinned--
	s.a.mu.Unlock()
	return s.f.Close()
}

// Query runs a read-only query on the authority's database (for tests, tools
// and the demo's transcript).
func (a *Authority) Query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	return a.db.QueryContext(ctx, query, args...)
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
	if a.conn != nil {
		errs = append(errs, a.conn.Close())
	}
	if a.db != nil {
		errs = append(errs, a.db.Close())
	}
	return errors.Join(errs...)
}
