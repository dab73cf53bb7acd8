package bench

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/replica"
)

// Capability is one row of the capability table: a test that ran against
// both engines, and what happened.
type Capability struct {
	Name      string  `json:"name"`
	Ours      Outcome `json:"ours"`
	Savepoint Outcome `json:"savepoint"`
}

// Outcome is one engine's result in a capability row.
type Outcome struct {
	// Works is whether the engine did what the row asks.
	Works bool `json:"works"`
	// Detail says what was observed.
	Detail string `json:"detail"`
}

// String is "works" or "fails", and the detail.
func (o Outcome) String() string {
	if o.Works {
		return "works: " + o.Detail
	}
	return "fails: " + o.Detail
}

// capabilityTest runs one row on one engine. An error means the test
// itself could not run (an I/O error), not that the engine failed the row.
type capabilityTest func(ctx context.Context, env *Env, dir string) (Outcome, error)

// runCapabilities runs each capability test on both engines.
func runCapabilities(ctx context.Context, env *Env) ([]Result, error) {
	rows := []struct {
		name            string
		ours, savepoint capabilityTest
	}{
		{"an explicit transaction in the app (BEGIN…COMMIT while mutations are pending)", capTxOurs, capTxSavepoint},
		{"another connection sees the pending state", capOtherConnOurs, capOtherConnSavepoint},
		{"pending work survives kill -9", capKill("ours"), capKill("savepoint")},
		{"a concurrent reader during a rebase sees no torn state", capTornOurs, capTornSavepoint},
		{"a background writer makes progress while mutations are pending", capWriterOurs, capWriterSavepoint},
	}
	for i, row := range rows {
		env.Progress("capability: %s", row.name)
		c := Capability{Name: row.name}
		var err error
		if c.Ours, err = row.ours(ctx, env, filepath.Join(env.Dir, fmt.Sprintf("%d-ours", i))); err != nil {
			return nil, fmt.Errorf("%s (ours): %w", row.name, err)
		}
		if c.Savepoint, err = row.savepoint(ctx, env, filepath.Join(env.Dir, fmt.Sprintf("%d-savepoint", i))); err != nil {
			return nil, fmt.Errorf("%s (savepoint): %w", row.name, err)
		}
		env.AddCapability(c)
	}
	return nil, nil
}

// capPending is how many mutations the simple rows leave pending.
const capPending = 3

// oursWithPending opens our engine with n demo mutations pending on rows
// local-0… and Food, and the given local-only database.
func oursWithPending(ctx context.Context, env *Env, dir string, n int, local bool) (*ours, error) {
	o, err := openOurs(ctx, dir, env.Registry, replica.Normal, nil)
	if err != nil {
		return nil, err
	}
	if local {
		// Reopen the replica with a local-only database attached, the
		// place for the app's own writes.
		if err := o.r.Close(); err != nil {
			return nil, err
		}
		if o.r, err = replica.Open(ctx, o.path, replica.Options{Mutators: env.Registry,
			LocalName: "app", LocalPath: filepath.Join(dir, "app.db")}); err != nil {
			o.auth.Close()
			return nil, err
		}
	}
	for i := range n {
		if err := o.mutate(ctx, demoMutation(fmt.Sprintf("local-%d", i), 1)); err != nil {
			o.close()
			return nil, err
		}
	}
	return o, nil
}

func baselineWithPending(ctx context.Context, env *Env, dir string, n int) (*baseline, error) {
	b, err := openBaseline(ctx, filepath.Join(dir, "savepoint.db"), env.Registry, nil)
	if err != nil {
		return nil, err
	}
	for i := range n {
		if err := b.mutate(ctx, demoMutation(fmt.Sprintf("local-%d", i), 1)); err != nil {
			b.close()
			return nil, err
		}
	}
	return b, nil
}

type querier interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}

// localRows counts the pending rows local-… a connection sees.
func localRows(ctx context.Context, q querier) (int, error) {
	var n int
	err := q.QueryRowContext(ctx, "SELECT count(*) FROM Categories WHERE name LIKE 'local-%'").Scan(&n)
	return n, err
}

func capTxOurs(ctx context.Context, env *Env, dir string) (Outcome, error) {
	o, err := oursWithPending(ctx, env, dir, capPending, true)
	if err != nil {
		return Outcome{}, err
	}
	defer o.close()
	if _, err := o.r.DB().ExecContext(ctx, "CREATE TABLE IF NOT EXISTS app.notes (id INTEGER PRIMARY KEY, body TEXT)"); err != nil {
		return Outcome{}, err
	}
	tx, err := o.r.DB().BeginTx(ctx, nil)
	if err != nil {
		return Outcome{false, "BEGIN: " + err.Error()}, nil
	}
	n, err := localRows(ctx, tx)
	if err == nil {
		_, err = tx.ExecContext(ctx, "INSERT INTO app.notes(body) VALUES ('written in the app''s own transaction')")
	}
	if err != nil {
		tx.Rollback()
		return Outcome{false, "inside the transaction: " + err.Error()}, nil
	}
	if err := tx.Commit(); err != nil {
		return Outcome{false, "COMMIT: " + err.Error()}, nil
	}
	if err := o.pushOwn(ctx); err != nil {
		return Outcome{false, "the rebase after it: " + err.Error()}, nil
	}
	if n != capPending {
		return Outcome{false, fmt.Sprintf("the transaction saw %d of %d pending mutations", n, capPending)}, nil
	}
	return Outcome{true, fmt.Sprintf("BEGIN…COMMIT on DB() with %d pending: read them, wrote the local database; the next rebase was correct", n)}, nil
}

func capTxSavepoint(ctx context.Context, env *Env, dir string) (Outcome, error) {
	b, err := baselineWithPending(ctx, env, dir, capPending)
	if err != nil {
		return Outcome{}, err
	}
	defer b.close()
	if _, err := b.e.Conn().ExecContext(ctx, "BEGIN"); err != nil {
		return Outcome{false, "BEGIN: " + err.Error()}, nil
	}
	b.e.Conn().ExecContext(ctx, "COMMIT")
	return Outcome{true, "BEGIN…COMMIT ran"}, nil
}

func capOtherConnOurs(ctx context.Context, env *Env, dir string) (Outcome, error) {
	o, err := oursWithPending(ctx, env, dir, capPending, false)
	if err != nil {
		return Outcome{}, err
	}
	defer o.close()
	// Two connections of their own, besides the writer that ran the
	// mutations.
	var seen []int
	for range 2 {
		c, err := o.r.DB().Conn(ctx)
		if err != nil {
			return Outcome{}, err
		}
		defer c.Close()
		n, err := localRows(ctx, c)
		if err != nil {
			return Outcome{false, err.Error()}, nil
		}
		seen = append(seen, n)
	}
	if seen[0] != capPending || seen[1] != capPending {
		return Outcome{false, fmt.Sprintf("reader connections saw %v of %d pending", seen, capPending)}, nil
	}
	return Outcome{true, fmt.Sprintf("two other connections each saw all %d pending mutations", capPending)}, nil
}

func capOtherConnSavepoint(ctx context.Context, env *Env, dir string) (Outcome, error) {
	b, err := baselineWithPending(ctx, env, dir, capPending)
	if err != nil {
		return Outcome{}, err
	}
	defer b.close()
	db, err := driver.Open("file:"+(&url.URL{Path: b.path}).EscapedPath(), nil)
	if err != nil {
		return Outcome{}, err
	}
	defer db.Close()
	n, err := localRows(ctx, db)
	if err != nil {
		return Outcome{false, err.Error()}, nil
	}
	if n != capPending {
		return Outcome{false, fmt.Sprintf("a second connection saw %d of %d pending mutations (they live in the engine's open transaction)", n, capPending)}, nil
	}
	return Outcome{true, fmt.Sprintf("a second connection saw all %d", n)}, nil
}

// killPending is how many mutations the kill -9 child makes.
const killPending = 10

func capKill(engine string) capabilityTest {
	return func(ctx context.Context, env *Env, dir string) (Outcome, error) {
		if env.Config.Child == nil {
			return Outcome{false, "not run: no child process available"}, nil
		}
		// The database exists with the schema before the child opens it.
		var path string
		switch engine {
		case "ours":
			o, err := openOurs(ctx, dir, env.Registry, replica.Normal, nil)
			if err != nil {
				return Outcome{}, err
			}
			path = o.path
			if err := o.r.Close(); err != nil {
				return Outcome{}, err
			}
			defer o.auth.Close()
		default:
			b, err := openBaseline(ctx, filepath.Join(dir, "savepoint.db"), env.Registry, nil)
			if err != nil {
				return Outcome{}, err
			}
			path = b.path
			if err := b.close(); err != nil {
				return Outcome{}, err
			}
		}
		cmd, err := startKillChild(ctx, env, ChildSpec{Kind: "kill", Engine: engine, Path: path, Pending: killPending, Workload: "seed"})
		if err != nil {
			return Outcome{}, err
		}
		if err := cmd.Process.Kill(); err != nil {
			return Outcome{}, err
		}
		cmd.Wait()
		var pending int
		var food int64
		switch engine {
		case "ours":
			r, err := replica.Open(ctx, path, replica.Options{Mutators: env.Registry})
			if err != nil {
				return Outcome{false, "reopen after kill -9: " + err.Error()}, nil
			}
			defer r.Close()
			pending = r.Status().Pending
			err = r.DB().QueryRowContext(ctx, "SELECT coalesce((SELECT count FROM Categories WHERE name = 'Food'), 0)").Scan(&food)
			if err != nil {
				return Outcome{}, err
			}
		default:
			e, err := OpenSavepoint(path, env.Registry)
			if err != nil {
				return Outcome{false, "reopen after kill -9: " + err.Error()}, nil
			}
			defer e.Close()
			pending = e.Pending()
			err = e.Conn().QueryRowContext(ctx, "SELECT coalesce((SELECT count FROM Categories WHERE name = 'Food'), 0)").Scan(&food)
			if err != nil {
				return Outcome{}, err
			}
		}
		if pending != killPending || food != killPending {
			return Outcome{false, fmt.Sprintf("after kill -9: %d of %d mutations pending, Food = %d", pending, killPending, food)}, nil
		}
		return Outcome{true, fmt.Sprintf("after kill -9 and reopen: all %d pending again, Food = %d", pending, food)}, nil
	}
}

// tornRounds is how many rebases a torn-read test makes under readers.
const tornRounds = 20

func capTornOurs(ctx context.Context, env *Env, dir string) (Outcome, error) {
	n := env.Config.CapabilityPending
	o, err := oursWithPending(ctx, env, dir, n, false)
	if err != nil {
		return Outcome{}, err
	}
	defer o.close()
	reads, torn, readErr := readWhile(ctx, func(ctx context.Context) (int, error) { return localRows(ctx, o.r.DB()) }, n,
		func() error {
			for i := range tornRounds {
				ps, err := o.serverBatch(ctx, serverMuts(1, i))
				if err != nil {
					return err
				}
				if err := o.r.Rebase(ctx, ps); err != nil {
					return err
				}
			}
			return nil
		})
	return tornOutcome(reads, torn, n, readErr)
}

func capTornSavepoint(ctx context.Context, env *Env, dir string) (Outcome, error) {
	n := env.Config.CapabilityPending
	b, err := baselineWithPending(ctx, env, dir, n)
	if err != nil {
		return Outcome{}, err
	}
	defer b.close()
	// The prototype's app reads through the engine's one connection: no
	// other sees the pending state. database/sql serialises calls on a
	// Conn, so a read runs between two statements of the rebase.
	reads, torn, readErr := readWhile(ctx, func(ctx context.Context) (int, error) { return localRows(ctx, b.e.Conn()) }, n,
		func() error {
			for i := range tornRounds {
				stmts, err := serverSQL(serverMuts(1, i))
				if err != nil {
					return err
				}
				if err := b.e.Rebase(ctx, stmts, 0); err != nil {
					return err
				}
			}
			return nil
		})
	return tornOutcome(reads, torn, n, readErr)
}

// readWhile runs two readers in a loop while work runs, and counts reads
// and reads that did not see all want pending rows.
func readWhile(ctx context.Context, read func(context.Context) (int, error), want int, work func() error) (reads, torn int64, readErr error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var minSeen = want
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				n, err := read(ctx)
				if ctx.Err() != nil {
					return
				}
				atomic.AddInt64(&reads, 1)
				mu.Lock()
				if err != nil && readErr == nil {
					readErr = err
				}
				if err == nil && n != want {
					torn++
					minSeen = min(minSeen, n)
				}
				mu.Unlock()
			}
		}()
	}
	err := work()
	cancel()
	wg.Wait()
	if err != nil {
		readErr = errors.Join(err, readErr)
	}
	if torn > 0 && readErr == nil {
		readErr = fmt.Errorf("saw as few as %d", minSeen)
	}
	return reads, torn, readErr
}

func tornOutcome(reads, torn int64, want int, err error) (Outcome, error) {
	switch {
	case torn > 0:
		return Outcome{false, fmt.Sprintf("%d of %d reads during %d rebases saw a partial state (%v of %d pending rows)", torn, reads, tornRounds, err, want)}, nil
	case err != nil:
		return Outcome{false, fmt.Sprintf("reads during the rebases failed: %v", err)}, nil
	}
	return Outcome{true, fmt.Sprintf("%d reads during %d rebases all saw the %d pending rows", reads, tornRounds, want)}, nil
}

// writerWindow is how long the background writer tests run.
const writerWindow = 300 * time.Millisecond

func capWriterOurs(ctx context.Context, env *Env, dir string) (Outcome, error) {
	o, err := oursWithPending(ctx, env, dir, capPending, true)
	if err != nil {
		return Outcome{}, err
	}
	defer o.close()
	if _, err := o.r.DB().ExecContext(ctx, "CREATE TABLE IF NOT EXISTS app.log (id INTEGER PRIMARY KEY, at INTEGER)"); err != nil {
		return Outcome{}, err
	}
	// One goroutine keeps calling Mutate, another writes the app's local
	// database, while this one rebases.
	wctx, cancel := context.WithTimeout(ctx, writerWindow)
	defer cancel()
	var mutates, writes int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; wctx.Err() == nil; i++ {
			if err := o.mutate(ctx, demoMutation(fmt.Sprintf("bg-%d", i%10), 1)); err != nil {
				fail(err)
				return
			}
			atomic.AddInt64(&mutates, 1)
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; wctx.Err() == nil; i++ {
			if _, err := o.r.DB().ExecContext(ctx, "INSERT INTO app.log(at) VALUES (?)", i); err != nil {
				fail(err)
				return
			}
			atomic.AddInt64(&writes, 1)
		}
	}()
	rebases := 0
	for ; wctx.Err() == nil; rebases++ {
		ps, err := o.serverBatch(ctx, serverMuts(1, rebases))
		if err != nil {
			fail(err)
			break
		}
		if err := o.r.Rebase(ctx, ps); err != nil {
			fail(err)
			break
		}
	}
	wg.Wait()
	if firstErr != nil {
		return Outcome{false, firstErr.Error()}, nil
	}
	if mutates == 0 || writes == 0 {
		return Outcome{false, fmt.Sprintf("%d Mutate calls and %d local writes in %v", mutates, writes, writerWindow)}, nil
	}
	return Outcome{true, fmt.Sprintf("in %v with mutations pending: %d Mutate calls and %d local-database commits from other goroutines, during %d rebases",
		writerWindow, mutates, writes, rebases)}, nil
}

func capWriterSavepoint(ctx context.Context, env *Env, dir string) (Outcome, error) {
	b, err := baselineWithPending(ctx, env, dir, capPending)
	if err != nil {
		return Outcome{}, err
	}
	defer b.close()
	// The engine's connection is the pending transaction (writes there
	// would be rolled back by the next rebase); a writer needs a
	// connection of its own.
	db, err := driver.Open("file:"+(&url.URL{Path: b.path}).EscapedPath()+"?_pragma=busy_timeout(50)", nil)
	if err != nil {
		return Outcome{}, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, "PRAGMA busy_timeout=50"); err != nil {
		return Outcome{}, err
	}
	var commits, attempts int
	var lastErr error
	deadline := time.Now().Add(writerWindow)
	for time.Now().Before(deadline) {
		attempts++
		if _, err := db.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, at INTEGER); INSERT INTO log(at) VALUES (1)"); err != nil {
			lastErr = err
			continue
		}
		commits++
	}
	if commits == 0 {
		return Outcome{false, fmt.Sprintf("0 of %d writes from a second connection committed in %v: %v", attempts, writerWindow, lastErr)}, nil
	}
	return Outcome{true, fmt.Sprintf("%d writes committed in %v", commits, writerWindow)}, nil
}
