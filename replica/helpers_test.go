package replica

import (
	"context"
	"database/sql"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// testRegistry is the demo's registry plus mutators the tests need.
// tb is what the helpers need of a test: *testing.T, *testing.B and
// *rapid.T all have it.
type tb interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

func testRegistry(t tb) *mutators.Registry {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	reg.MustRegister("fail", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var msg string
		json.Unmarshal(args, &msg)
		return &failure{msg}
	})
	reg.MustRegister("exec", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var stmts []string
		if err := json.Unmarshal(args, &stmts); err != nil {
			return err
		}
		for _, s := range stmts {
			if _, err := tx.Exec(s); err != nil {
				return err
			}
		}
		return nil
	})
	return reg
}

type failure struct{ msg string }

func (f *failure) Error() string { return f.msg }

func demoSetup(ctx context.Context, tx mutators.Tx) error {
	_, err := tx.Exec(mutators.DemoSchema)
	return err
}

func newAuthority(t testing.TB, reg *mutators.Registry) *server.Authority {
	t.Helper()
	a, err := server.OpenAuthority(context.Background(), filepath.Join(t.TempDir(), "server.db"), reg, demoSetup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func openReplica(t testing.TB, path string, reg *mutators.Registry) *Replica {
	t.Helper()
	r, err := Open(context.Background(), path, Options{Mutators: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// push sends the replica's pending mutations to the authority and returns
// the new version's page set (nil if none).
func push(t testing.TB, a *server.Authority, r *Replica) *wal.PageSet {
	t.Helper()
	var batch []server.Mutation
	for _, m := range r.Pending() {
		batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
	}
	ps, _, err := a.Push(context.Background(), batch)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// catchUp rebases r onto everything the authority has.
func catchUp(t testing.TB, a *server.Authority, r *Replica) {
	t.Helper()
	sets, err := a.Since(r.Status().Version)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Rebase(context.Background(), sets...); err != nil {
		t.Fatal(err)
	}
}

func categories(t testing.TB, db interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) map[string]int64 {
	t.Helper()
	rows, err := db.QueryContext(context.Background(), "SELECT name, count FROM Categories")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var n string
		var c int64
		if err := rows.Scan(&n, &c); err != nil {
			t.Fatal(err)
		}
		out[n] = c
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
