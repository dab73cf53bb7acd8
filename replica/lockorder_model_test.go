package replica

import (
	"context"
	"database/sql"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/wal"
)

// TestLockOrderModel drives random interleavings of readers (cursors,
// BeginTx, Exec("BEGIN") / Exec("SAVEPOINT") on a *sql.Conn), Mutate,
// Status and rebases on one goroutine. Whatever is open, Mutate and Status
// return at once; a rebase succeeds exactly when no reader is open, and
// otherwise gives up with ErrReadersBusy after ReaderWait, changing
// nothing; after each successful rebase DB() shows every local mutation and
// every applied server version. Every call is bounded: a deadlock fails
// with a goroutine dump.
func TestLockOrderModel(t *testing.T) {
	if testing.Short() {
		t.Skip("opens three databases per case: about 20 s")
	}
	reg := testRegistry(t)
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		a := newAuthority(t, reg)
		dir := t.TempDir()
		r, err := Open(ctx, filepath.Join(dir, "r.db"), Options{Mutators: reg, ReaderWait: 20 * time.Millisecond, Logger: quietLog})
		if err != nil {
			rt.Fatal(err)
		}
		defer r.Close()
		catchUp(t, a, r)
		other, err := Open(ctx, filepath.Join(dir, "other.db"), Options{Mutators: reg, Logger: quietLog})
		if err != nil {
			rt.Fatal(err)
		}
		defer other.Close()
		catchUp(t, a, other)

		var (
			rows    []*sql.Rows
			txs     []*sql.Tx
			conns   []*sql.Conn // each inside an Exec-begun transaction
			unsent  []*wal.PageSet
			mine    int64 // r's mutations
			theirs  int64 // the other client's, in versions r applied
			queued  int64 // the other client's, in versions not yet applied
			applied = func() {
				got := categories(t, r.DB())
				if got["Mine"] != mine || got["Theirs"] != theirs {
					rt.Fatalf("DB() shows Mine=%d Theirs=%d, want %d and %d", got["Mine"], got["Theirs"], mine, theirs)
				}
			}
		)
		open := func() int { return len(rows) + len(txs) + len(conns) }
		defer func() {
			for _, x := range rows {
				x.Close()
			}
			for _, x := range txs {
				x.Rollback()
			}
			for _, c := range conns {
				c.ExecContext(ctx, "ROLLBACK")
				c.Close()
			}
		}()
		call := func(what string, fn func()) { bounded(t, 15*time.Second, what, fn) }

		rt.Repeat(map[string]func(*rapid.T){
			"cursor": func(rt *rapid.T) {
				call("query", func() {
					x, err := r.DB().QueryContext(ctx, "SELECT name FROM Categories")
					if err != nil {
						rt.Fatal(err)
					}
					rows = append(rows, x)
				})
			},
			"beginTx": func(rt *rapid.T) {
				call("BeginTx", func() {
					tx, err := r.DB().BeginTx(ctx, nil)
					if err != nil {
						rt.Fatal(err)
					}
					var n int
					if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM Categories").Scan(&n); err != nil {
						rt.Fatal(err)
					}
					txs = append(txs, tx)
				})
			},
			"execBegin": func(rt *rapid.T) {
				begin := rapid.SampledFrom([]string{"BEGIN", "SAVEPOINT s", "BEGIN; SELECT 1"}).Draw(rt, "begin")
				call("Exec begin", func() {
					c, err := r.DB().Conn(ctx)
					if err != nil {
						rt.Fatal(err)
					}
					if _, err := c.ExecContext(ctx, begin); err != nil {
						rt.Fatal(err)
					}
					var n int
					if err := c.QueryRowContext(ctx, "SELECT count(*) FROM Categories").Scan(&n); err != nil {
						rt.Fatal(err)
					}
					conns = append(conns, c)
				})
			},
			"end": func(rt *rapid.T) {
				if open() == 0 {
					rt.Skip("nothing open")
				}
				call("end a reader", func() {
					switch {
					case len(rows) > 0:
						rows[0].Close()
						rows = rows[1:]
					case len(txs) > 0:
						txs[0].Commit()
						txs = txs[1:]
					default:
						if _, err := conns[0].ExecContext(ctx, "ROLLBACK"); err != nil {
							rt.Fatal(err)
						}
						conns[0].Close()
						conns = conns[1:]
					}
				})
			},
			"mutate": func(rt *rapid.T) {
				call("Mutate", func() {
					if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Mine", 1)); err != nil {
						rt.Fatal(err)
					}
					mine++
					_ = r.Status()
					_ = r.Pending()
				})
			},
			"serverVersion": func(rt *rapid.T) {
				catchUp(t, a, other)
				if _, err := other.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Theirs", 1)); err != nil {
					rt.Fatal(err)
				}
				ps := push(t, a, other)
				catchUp(t, a, other)
				unsent = append(unsent, ps)
				queued++
			},
			"rebase": func(rt *rapid.T) {
				// r's own pending go to the server too, so the rebase
				// confirms some.
				if len(r.Pending()) > 0 && rapid.Bool().Draw(rt, "push") {
					if ps := push(t, a, r); ps != nil { // nil: pushed before
						unsent = append(unsent, ps)
					}
				}
				call("Rebase", func() {
					err := r.Rebase(ctx, unsent...)
					switch {
					case open() > 0 && !errors.Is(err, ErrReadersBusy):
						rt.Fatalf("rebase with %d readers open: %v, want ErrReadersBusy", open(), err)
					case open() == 0 && err != nil:
						rt.Fatalf("rebase with no reader open: %v", err)
					case err == nil:
						unsent, theirs, queued = nil, theirs+queued, 0
					}
				})
				if open() == 0 {
					applied()
				}
			},
		})
	})
}
