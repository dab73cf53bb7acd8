package mutators

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"
)

// TestDemoMutatorCreatesItsTable: the demo mutator upserts first and
// creates its table only when it is not there, through a statement cache
// as the server and the replica run it: on an empty database, and after
// the table went away under a statement the cache holds.
func TestDemoMutatorCreatesItsTable(t *testing.T) {
	ctx := context.Background()
	db, err := driver.Open("file:" + filepath.Join(t.TempDir(), "test.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	q := NewStmtCache(conn, 8)
	defer q.Close()
	r := NewRegistry()
	if err := RegisterDemo(r); err != nil {
		t.Fatal(err)
	}
	count := func() (n int64) {
		t.Helper()
		if err := conn.QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	run := func() {
		t.Helper()
		if err := r.Run(ctx, NewTx(ctx, q), CreateCategoryOrIncrementIfExists, CategoryArgs("Food", 2)); err != nil {
			t.Fatal(err)
		}
	}
	run()
	run()
	if n := count(); n != 4 {
		t.Fatalf("count %d, want 4", n)
	}
	if _, ok := q.stmts[upsertCategory]; !ok {
		t.Fatal("the upsert is not cached")
	}
	if _, err := conn.ExecContext(ctx, `DROP TABLE Categories`); err != nil {
		t.Fatal(err)
	}
	run()
	if n := count(); n != 2 {
		t.Fatalf("count %d after the table was dropped, want 2", n)
	}
	// In a transaction that rolls back, as a rejected batch does.
	if _, err := conn.ExecContext(ctx, `DROP TABLE Categories`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	run()
	if _, err := conn.ExecContext(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	var tables int
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_schema WHERE name = 'Categories'`).Scan(&tables); err != nil || tables != 0 {
		t.Fatalf("%d tables after the rollback, %v", tables, err)
	}
	run()
	if n := count(); n != 2 {
		t.Fatalf("count %d after the rollback, want 2", n)
	}
}
