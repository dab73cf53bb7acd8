package bench

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	sqlite3 "github.com/ncruces/go-sqlite3"
	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// The suite drives each engine through its public API only: our engine is a
// replica.Replica fed with page sets from a server.Authority, the baseline a
// SavepointEngine fed with the SQL its server would send. Both run the same
// mutators (NewRegistry) on the same starting state.

// otherClient is the client id under which the benchmarks' "other" client
// pushes the server's mutations.
const otherClient = "bench-other"

// ours is our engine under test: one replica and the authority it syncs
// with, in process.
type ours struct {
	reg      *mutators.Registry
	authPath string
	auth     *server.Authority
	logFrom  uint64 // the authority's version at its last (re)open
	r        *replica.Replica
	path     string
	otherID  uint64
}

// openOurs creates an authority (version 1: the demo schema), runs each
// element of setup as a version of its own, and opens a replica in dir that
// has caught up with all of it.
func openOurs(ctx context.Context, dir string, reg *mutators.Registry, d replica.Durability, setup [][]string) (*ours, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	o := &ours{reg: reg, authPath: filepath.Join(dir, "server.db"), path: filepath.Join(dir, "replica.db")}
	var err error
	o.auth, err = server.OpenAuthority(ctx, o.authPath, reg, func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec(mutators.DemoSchema)
		return err
	})
	if err != nil {
		return nil, err
	}
	o.r, err = replica.Open(ctx, o.path, replica.Options{Mutators: reg, Durability: d})
	if err != nil {
		o.auth.Close()
		return nil, err
	}
	if err := o.catchUp(ctx); err != nil {
		o.close()
		return nil, err
	}
	for _, stmts := range setup {
		// One version per element, and the replica follows at once, so
		// that a large set-up (the 1 GB database) never has more than one
		// element's pages in memory.
		if _, err := o.auth.Exec(ctx, execAll(stmts)); err != nil {
			o.close()
			return nil, fmt.Errorf("set up the authority: %w", err)
		}
		if err := o.catchUp(ctx); err != nil {
			o.close()
			return nil, err
		}
		if err := o.trim(ctx, 0); err != nil {
			o.close()
			return nil, err
		}
	}
	return o, nil
}

// execAll runs statements in a server transaction.
func execAll(stmts []string) func(tx mutators.Tx) error {
	return func(tx mutators.Tx) error {
		for _, q := range stmts {
			if _, err := tx.Exec(q); err != nil {
				return fmt.Errorf("%.60q: %w", q, err)
			}
		}
		return nil
	}
}

// catchUp rebases the replica onto every version the authority has.
func (o *ours) catchUp(ctx context.Context) error {
	sets, err := o.auth.Since(o.r.Status().Version)
	if err != nil {
		return err
	}
	return o.r.Rebase(ctx, sets...)
}

// trim reopens the authority once its in-memory change log holds more than
// keep versions, so that long runs do not grow the benchmark process. The
// replica must have caught up.
func (o *ours) trim(ctx context.Context, keep uint64) error {
	if o.auth.Version()-o.logFrom <= keep {
		return nil
	}
	if err := o.auth.Close(); err != nil {
		return fmt.Errorf("trim the authority's log: %w", err)
	}
	var err error
	if o.auth, err = server.OpenAuthority(ctx, o.authPath, o.reg, nil); err != nil {
		return fmt.Errorf("trim the authority's log: %w", err)
	}
	o.logFrom = o.auth.Version()
	return nil
}

// mutate runs one mutation on the replica. A mutator that fails locally is
// an error here: every workload mutation is meant to succeed.
func (o *ours) mutate(ctx context.Context, m Mutation) error {
	h, err := o.r.Mutate(ctx, m.Name, m.Args)
	if err != nil {
		return err
	}
	return h.LocalErr()
}

// serverBatch has the other client's mutations applied by the authority as
// one batch (one version), as its group commit would, and returns that
// version's page set.
func (o *ours) serverBatch(ctx context.Context, muts []Mutation) (*wal.PageSet, error) {
	batch := make([]server.Mutation, len(muts))
	for i, m := range muts {
		o.otherID++
		batch[i] = server.Mutation{ClientID: otherClient, ID: o.otherID, Name: m.Name, Args: m.Args}
	}
	ps, res, err := o.auth.Push(ctx, batch)
	if err != nil {
		return nil, fmt.Errorf("server batch: %w", err)
	}
	for _, r := range res {
		if r.Outcome != server.Applied {
			return nil, fmt.Errorf("server batch: mutation %d not applied: %s", r.Mutation.ID, r.Err)
		}
	}
	if ps == nil {
		return nil, errors.New("server batch: no version")
	}
	return ps, nil
}

// pushOwn has the authority apply every pending mutation of the replica
// and rebases onto the result, which leaves nothing pending.
func (o *ours) pushOwn(ctx context.Context) error {
	var batch []server.Mutation
	for _, m := range o.r.Pending() {
		batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
	}
	if len(batch) > 0 {
		if _, _, err := o.auth.Push(ctx, batch); err != nil {
			return fmt.Errorf("push own mutations: %w", err)
		}
	}
	if err := o.catchUp(ctx); err != nil {
		return err
	}
	if n := o.r.Status().Pending; n != 0 {
		return fmt.Errorf("push own mutations: %d still pending", n)
	}
	return o.trim(ctx, 2000)
}

// pendingCount is the replica's number of pending mutations; 0 for no
// replica at all, so that optional engines read simply.
func (o *ours) pendingCount() int {
	if o == nil {
		return 0
	}
	return o.r.Status().Pending
}

func (o *ours) walSize() int64 { return walBytes(o.path) }

func (o *ours) close() error {
	return errors.Join(o.r.Close(), o.auth.Close())
}

// baseline is the savepoint engine under test.
type baseline struct {
	e    *SavepointEngine
	path string
}

// openBaseline opens a savepoint engine at path and commits the demo schema
// and each element of setup, as its server would have sent them.
func openBaseline(ctx context.Context, path string, reg *mutators.Registry, setup [][]string) (*baseline, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	e, err := OpenSavepoint(path, reg)
	if err != nil {
		return nil, err
	}
	b := &baseline{e: e, path: path}
	for _, stmts := range append([][]string{{mutators.DemoSchema}}, setup...) {
		if err := e.Rebase(ctx, stmts, 0); err != nil {
			e.Close()
			return nil, fmt.Errorf("set up the savepoint engine: %w", err)
		}
	}
	return b, nil
}

func (b *baseline) mutate(ctx context.Context, m Mutation) error {
	return b.e.Mutate(ctx, m.Name, m.Args)
}

// serverSQL is what the prototype's server sends for muts.
func serverSQL(muts []Mutation) ([]string, error) {
	var out []string
	for _, m := range muts {
		s, err := Statements(m.Name, m.Args)
		if err != nil {
			return nil, err
		}
		out = append(out, s...)
	}
	return out, nil
}

// ackAll is the baseline's counterpart of pushOwn: its server ran every
// pending mutation, so the rebase applies their SQL and replays nothing.
func (b *baseline) ackAll(ctx context.Context, muts []Mutation) error {
	stmts, err := serverSQL(muts)
	if err != nil {
		return err
	}
	return b.e.Rebase(ctx, stmts, b.e.Pending())
}

func (b *baseline) walSize() int64 { return walBytes(b.path) }

func (b *baseline) close() error { return b.e.Close() }

// plain is the reference for local writes: go-sqlite3 with no sqlrebase at
// all, in WAL mode, running a mutation's statements as one autocommit
// statement (or one transaction when there are several).
type plain struct {
	db   *sql.DB
	conn *sql.Conn
}

func openPlain(ctx context.Context, path string, synchronous string, setup [][]string) (*plain, error) {
	db, err := driver.Open("file:"+(&url.URL{Path: path}).EscapedPath(), nil)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return nil, err
	}
	p := &plain{db: db, conn: conn}
	stmts := []string{"PRAGMA journal_mode=WAL", "PRAGMA synchronous=" + synchronous, mutators.DemoSchema}
	for _, s := range setup {
		stmts = append(stmts, s...)
	}
	for _, q := range stmts {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			p.close()
			return nil, fmt.Errorf("plain %s: %.60q: %w", path, q, err)
		}
	}
	return p, nil
}

func (p *plain) mutate(ctx context.Context, m Mutation) error {
	stmts, err := Statements(m.Name, m.Args)
	if err != nil {
		return err
	}
	if len(stmts) == 1 {
		_, err := p.conn.ExecContext(ctx, stmts[0])
		return err
	}
	if _, err := p.conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return err
	}
	for _, q := range stmts {
		if _, err := p.conn.ExecContext(ctx, q); err != nil {
			p.conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			return err
		}
	}
	_, err = p.conn.ExecContext(ctx, "COMMIT")
	return err
}

func (p *plain) close() error { return errors.Join(p.conn.Close(), p.db.Close()) }

// dropRig times our drop alone. The drop is vfs.Replica.Rebase with no page
// sets, the call replica.Rebase makes first; a Replica offers no way to
// time it apart from the replay that follows, so the rig owns the files
// through the vfs package's public API, as package replica does, and fills
// the WAL exactly as a replica's replay would: the pending mutators in one
// write transaction, a SAVEPOINT each.
type dropRig struct {
	reg   *mutators.Registry
	files *vfs.Replica
	db    *sql.DB
	conn  *sql.Conn
	muts  []Mutation
}

// openDropRig makes a replica at path at the authority's latest version with
// muts pending (not yet written: call fill).
func openDropRig(ctx context.Context, path string, reg *mutators.Registry, auth *server.Authority, muts []Mutation) (*dropRig, error) {
	files, err := vfs.OpenReplica(path, vfs.Normal)
	if err != nil {
		return nil, err
	}
	d := &dropRig{reg: reg, files: files, muts: muts}
	sets, err := auth.Since(0)
	if err != nil {
		d.close()
		return nil, err
	}
	if err := files.Rebase(ctx, sets...); err != nil {
		d.close()
		return nil, err
	}
	// The connection opens after the bootstrap, so it never caches a
	// schema the drop could make stale (replica.Rebase's cookie check).
	d.db, err = driver.Open("file:"+(&url.URL{Path: path}).EscapedPath()+"?vfs="+vfs.Name, func(c *sqlite3.Conn) error {
		if _, err := c.Config(sqlite3.DBCONFIG_NO_CKPT_ON_CLOSE, true); err != nil {
			return err
		}
		return c.Exec("PRAGMA wal_autocheckpoint=0; PRAGMA main.synchronous=OFF")
	})
	if err != nil {
		d.close()
		return nil, err
	}
	d.db.SetMaxOpenConns(1)
	if d.conn, err = d.db.Conn(ctx); err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

// fill writes the pending mutations into the WAL as a replica's replay does.
func (d *dropRig) fill(ctx context.Context) error {
	if len(d.muts) == 0 {
		return nil
	}
	if _, err := d.conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fmt.Errorf("drop rig: %w", err)
	}
	for i, m := range d.muts {
		sp := "m" + strconv.Itoa(i)
		if _, err := d.conn.ExecContext(ctx, "SAVEPOINT "+sp); err != nil {
			return fmt.Errorf("drop rig: %w", err)
		}
		if err := d.reg.Run(ctx, mutators.NewTx(ctx, d.conn), m.Name, m.Args); err != nil {
			d.conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			return fmt.Errorf("drop rig: %w", err)
		}
		if _, err := d.conn.ExecContext(ctx, "RELEASE "+sp); err != nil {
			return fmt.Errorf("drop rig: %w", err)
		}
	}
	if _, err := d.conn.ExecContext(ctx, "COMMIT"); err != nil {
		return fmt.Errorf("drop rig: %w", err)
	}
	return nil
}

// drop times one drop.
func (d *dropRig) drop(ctx context.Context) (time.Duration, error) {
	t0 := time.Now()
	err := d.files.Rebase(ctx)
	return time.Since(t0), err
}

func (d *dropRig) close() error {
	var errs []error
	if d.conn != nil {
		errs = append(errs, d.conn.Close())
	}
	if d.db != nil {
		errs = append(errs, d.db.Close())
	}
	errs = append(errs, d.files.Close())
	return errors.Join(errs...)
}

// walBytes is how much of the WAL of the database at path is live: the
// frames the wal-index counts (mxFrame), not the file's length, which a
// reused WAL file keeps from its longest past. 0 if there is no wal-index.
func walBytes(path string) int64 {
	f, err := os.Open(path + "-shm")
	if err != nil {
		return 0
	}
	defer f.Close()
	var b [wal.IndexHeaderSize]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		return 0
	}
	h, _, err := wal.DecodeIndex(b[:])
	if err != nil || h.MxFrame == 0 {
		return 0
	}
	return wal.HeaderSize + int64(h.MxFrame)*int64(wal.FrameHeaderSize+h.PageSize)
}
