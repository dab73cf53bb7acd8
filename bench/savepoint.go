package bench

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// SavepointEngine is the prototype's client engine: one SQLite connection in
// WAL mode on which every local mutation runs inside a SAVEPOINT that is
// never released.
//
// Pending mutations are therefore never committed. They persist nothing (a
// crash or Close loses them, since only the in-memory list remembers them),
// and no other connection to the same file ever sees them: they live inside
// the one write transaction that stays open on this connection for as long as
// anything is pending, which also keeps every other writer out. An app that
// runs BEGIN on the engine's connection while something is pending gets an
// error, because a transaction is already open.
//
// A SavepointEngine is not safe for concurrent use.
type SavepointEngine struct {
	reg     *mutators.Registry
	db      *sql.DB
	conn    *sql.Conn
	q       *mutators.StmtCache // the mutators' statements prepared once, as our replica does: the comparison is of designs, not of statement caching
	pending []spMutation
	nextSP  uint64
}

// spMutation is one pending mutation and the savepoint that undoes it.
type spMutation struct {
	name string
	args json.RawMessage
	sp   string
}

// OpenSavepoint opens (or creates) the database at path with a savepoint
// engine running the mutators of reg. The database is put in WAL mode with
// synchronous=NORMAL, the replica's default durability, so that the two
// engines pay the same commit costs.
func OpenSavepoint(path string, reg *mutators.Registry) (*SavepointEngine, error) {
	if reg == nil {
		return nil, errors.New("bench: OpenSavepoint needs a registry")
	}
	// _txlock is irrelevant here: transactions are opened by SQL text on the
	// one connection, never through database/sql's BeginTx.
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath()
	db, err := driver.Open(dsn, nil)
	if err != nil {
		return nil, fmt.Errorf("open savepoint engine %s: %w", path, err)
	}
	// One connection: the open savepoint transaction belongs to it, and any
	// second connection would not see the pending state.
	db.SetMaxOpenConns(1)
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open savepoint engine %s: %w", path, err)
	}
	for _, p := range []string{"PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"} {
		if _, err := conn.ExecContext(ctx, p); err != nil {
			conn.Close()
			db.Close()
			return nil, fmt.Errorf("open savepoint engine %s: %s: %w", path, p, err)
		}
	}
	return &SavepointEngine{reg: reg, db: db, conn: conn, q: mutators.NewStmtCache(conn, 512)}, nil
}

// Close rolls back whatever is pending (it was never committed) and closes
// the database.
func (e *SavepointEngine) Close() error {
	var errs []error
	if len(e.pending) > 0 {
		if _, err := e.conn.ExecContext(context.Background(), "ROLLBACK"); err != nil {
			errs = append(errs, fmt.Errorf("roll back pending: %w", err))
		}
		e.pending = nil
	}
	if e.q != nil {
		errs = append(errs, e.q.Close())
	}
	errs = append(errs, e.conn.Close(), e.db.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close savepoint engine: %w", err)
	}
	return nil
}

// Conn is the engine's one connection, which the app also reads (and, in the
// prototype, writes) through. Reads see the pending mutations.
func (e *SavepointEngine) Conn() *sql.Conn { return e.conn }

// Pending is the number of mutations not yet acknowledged by the server.
func (e *SavepointEngine) Pending() int { return len(e.pending) }

// Mutate runs the named mutator at once inside a new savepoint that is never
// released, and remembers the mutation in memory for replay. Nothing is
// committed: the effect is visible on this connection only, and lost on a
// crash. A mutator error rolls back the mutator's effects but keeps the
// mutation pending, as the replica does: the server decides.
func (e *SavepointEngine) Mutate(ctx context.Context, name string, args json.RawMessage) error {
	if err := e.reg.Check(name, args); err != nil {
		return err
	}
	m := spMutation{name: name, args: args}
	if err := e.run(ctx, &m); err != nil {
		return err
	}
	e.pending = append(e.pending, m)
	return nil
}

// run opens a fresh savepoint for m and runs its mutator there. Only SQL
// failures of the engine itself are returned.
func (e *SavepointEngine) run(ctx context.Context, m *spMutation) error {
	e.nextSP++
	m.sp = "sp_" + strconv.FormatUint(e.nextSP, 10)
	if _, err := e.conn.ExecContext(ctx, "SAVEPOINT "+m.sp); err != nil {
		return fmt.Errorf("mutate %s: open savepoint: %w", m.name, err)
	}
	if err := e.reg.Run(ctx, mutators.NewTx(ctx, e.q), m.name, m.args); err != nil {
		// The savepoint stays open (empty) so the nesting stays simple;
		// the rollback of the oldest one undoes it with the rest.
		if _, rerr := e.conn.ExecContext(ctx, "ROLLBACK TO "+m.sp); rerr != nil {
			return fmt.Errorf("mutate %s: undo failed mutator: %w", m.name, errors.Join(err, rerr))
		}
	}
	return nil
}

// Rebase is the prototype's rebase. It undoes every pending mutation
// (ROLLBACK TO the oldest savepoint, then RELEASE it, which ends the open
// transaction with nothing in it), executes the server's SQL statements and
// commits them, forgets the first acked pending mutations (the server has
// them in serverSQL), and runs each remaining one again in a new savepoint.
func (e *SavepointEngine) Rebase(ctx context.Context, serverSQL []string, acked int) error {
	_, err := e.RebasePhases(ctx, serverSQL, acked)
	return err
}

// Phases is how long each step of one savepoint rebase took, so that the
// benchmark suite can set the drop alone against sqlrebase's drop.
type Phases struct {
	// Drop is the ROLLBACK TO the oldest savepoint and its RELEASE.
	Drop time.Duration
	// Apply is the server's statements in one committed transaction.
	Apply time.Duration
	// Replay is running the still-pending mutators again.
	Replay time.Duration
}

// RebasePhases is [SavepointEngine.Rebase], and also reports how long each
// of its three steps took. The clock reads cost well under a microsecond,
// so Rebase simply calls it.
func (e *SavepointEngine) RebasePhases(ctx context.Context, serverSQL []string, acked int) (Phases, error) {
	var ph Phases
	if acked < 0 || acked > len(e.pending) {
		return ph, fmt.Errorf("rebase: %d acknowledged, but %d pending", acked, len(e.pending))
	}
	t0 := time.Now()
	if len(e.pending) > 0 {
		oldest := e.pending[0].sp
		if _, err := e.conn.ExecContext(ctx, "ROLLBACK TO "+oldest); err != nil {
			return ph, fmt.Errorf("rebase: undo pending: %w", err)
		}
		if _, err := e.conn.ExecContext(ctx, "RELEASE "+oldest); err != nil {
			return ph, fmt.Errorf("rebase: end pending transaction: %w", err)
		}
	}
	t1 := time.Now()
	ph.Drop = t1.Sub(t0)
	// The server's statements are confirmed state: commit them, in one
	// transaction so that they cost one commit, as applying a version does.
	if len(serverSQL) > 0 {
		if _, err := e.conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			return ph, fmt.Errorf("rebase: begin server changes: %w", err)
		}
		for _, q := range serverSQL {
			if _, err := e.conn.ExecContext(ctx, q); err != nil {
				e.conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
				return ph, fmt.Errorf("rebase: server statement %.60q: %w", q, err)
			}
		}
		if _, err := e.conn.ExecContext(ctx, "COMMIT"); err != nil {
			e.conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			return ph, fmt.Errorf("rebase: commit server changes: %w", err)
		}
	}
	t2 := time.Now()
	ph.Apply = t2.Sub(t1)
	e.pending = e.pending[acked:]
	for i := range e.pending {
		if err := e.run(ctx, &e.pending[i]); err != nil {
			return ph, fmt.Errorf("rebase: replay: %w", err)
		}
	}
	ph.Replay = time.Since(t2)
	return ph, nil
}

// DemoSQL is the SQL the demo mutator
// [mutators.CreateCategoryOrIncrementIfExists] runs for (name, delta), with
// the arguments inlined, as the prototype's server sends it to its clients.
func DemoSQL(name string, delta int64) []string {
	return []string{
		mutators.DemoSchema,
		"INSERT INTO Categories(name, count) VALUES (" + quote(name) + ", " + strconv.FormatInt(delta, 10) +
			") ON CONFLICT(name) DO UPDATE SET count = count + excluded.count",
	}
}

// quote is SQLite's string literal quoting.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}
