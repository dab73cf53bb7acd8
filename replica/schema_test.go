package replica

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// TestServerSchemaChangesReachPreparedStatements: DDL shipped in page sets is
// seen by connections that prepared statements before it arrived.
func TestServerSchemaChangesReachPreparedStatements(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	conn, err := r.DB().Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// go-sqlite3's driver cannot serve a prepared statement whose column
	// count changed (SELECT * after ADD COLUMN fails there with "API
	// misuse", replica or not), so these statements keep their shape and
	// read the connection's schema at run time.
	cols, err := conn.PrepareContext(ctx, "SELECT group_concat(name) FROM pragma_table_info('Categories')")
	if err != nil {
		t.Fatal(err)
	}
	defer cols.Close()
	objects, err := conn.PrepareContext(ctx, "SELECT count(*) FROM sqlite_schema")
	if err != nil {
		t.Fatal(err)
	}
	defer objects.Close()
	var names string
	var before, after int
	if err := cols.QueryRowContext(ctx).Scan(&names); err != nil || names != "id,name,count" {
		t.Fatalf("columns %q, %v", names, err)
	}
	objects.QueryRowContext(ctx).Scan(&before)

	for _, ddl := range []string{
		"ALTER TABLE Categories ADD COLUMN color TEXT",
		"CREATE TABLE Todos(id INTEGER PRIMARY KEY, title TEXT, done INTEGER)",
		"CREATE INDEX todos_done ON Todos(done)",
	} {
		if _, err := a.Exec(ctx, func(tx mutators.Tx) error { _, err := tx.Exec(ddl); return err }); err != nil {
			t.Fatal(err)
		}
	}
	mustMutate(t, r, "exec", execArgs("INSERT INTO Todos(title, done) VALUES('x', 0)"))
	catchUp(t, a, r)

	if err := cols.QueryRowContext(ctx).Scan(&names); err != nil || names != "id,name,count,color" {
		t.Fatalf("after ADD COLUMN the prepared statement sees %q, %v", names, err)
	}
	objects.QueryRowContext(ctx).Scan(&after)
	if after != before+2 {
		t.Fatalf("schema objects %d -> %d, want +2 (table and index)", before, after)
	}
	var todos int
	if err := conn.QueryRowContext(ctx, "SELECT count(*) FROM Todos WHERE done = 0").Scan(&todos); err != nil || todos != 1 {
		t.Fatalf("todos %d, %v", todos, err)
	}
}

// TestSchemaCookieABA reproduces RESEARCH.md's ABA: a connection caches a
// pending schema at cookie c+1; the rebase drops it and the server's
// different DDL brings the cookie back to c+1. Without the reset the
// connection would read the new table through the old schema.
func TestSchemaCookieABA(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	o := openReplica(t, filepath.Join(t.TempDir(), "o.db"), reg)
	catchUp(t, a, r)
	catchUp(t, a, o)

	// Locally: t2 with one column, pending.
	h := mustMutate(t, r, "exec", execArgs("CREATE TABLE t2(a)", "INSERT INTO t2 VALUES('local')"))
	if h.LocalErr() != nil {
		t.Fatal(h.LocalErr())
	}
	conn, err := r.DB().Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stmt, err := conn.PrepareContext(ctx, "SELECT a FROM t2")
	if err != nil {
		t.Fatal(err)
	}
	defer stmt.Close()
	var a0 string
	if err := stmt.QueryRowContext(ctx).Scan(&a0); err != nil || a0 != "local" {
		t.Fatalf("local t2: %q %v", a0, err)
	}
	var cookieBefore int
	conn.QueryRowContext(ctx, "PRAGMA schema_version").Scan(&cookieBefore)

	// The server: another client creates t2 with three columns first, so
	// ours is rejected there ("table t2 already exists").
	mustMutate(t, o, "exec", execArgs("CREATE TABLE t2(x, y, z)", "INSERT INTO t2 VALUES(1, 2, 3)"))
	push(t, a, o)
	push(t, a, r)
	catchUp(t, a, r)
	if err := h.Wait(ctx); err == nil {
		t.Fatal("local CREATE TABLE t2 was not rejected by the server")
	}
	var cookieAfter int
	conn.QueryRowContext(ctx, "PRAGMA schema_version").Scan(&cookieAfter)
	if cookieAfter != cookieBefore {
		t.Fatalf("test premise: cookie %d before, %d after (want equal, the ABA case)", cookieBefore, cookieAfter)
	}
	// The server's t2 has no column a. A statement compiled against the
	// dropped schema would still run (reading x through a stale schema);
	// after the reset it is re-prepared and fails as it must.
	var stale any
	if err := stmt.QueryRowContext(ctx).Scan(&stale); err == nil {
		t.Fatalf("prepared statement read the server's t2 through the dropped schema: got %v", stale)
	}
	var sum int
	if err := conn.QueryRowContext(ctx, "SELECT x+y+z FROM t2").Scan(&sum); err != nil || sum != 6 {
		t.Fatalf("server row: %d, %v", sum, err)
	}
	var ok string
	if err := conn.QueryRowContext(ctx, "PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		t.Fatalf("integrity %q %v", ok, err)
	}
}
