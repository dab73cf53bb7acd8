package mutators

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"
)

// openStmtCache opens a new database and a statement cache of size on one
// of its connections, all closed when the test ends.
func openStmtCache(t *testing.T, size int) (*StmtCache, *sql.Conn) {
	t.Helper()
	db, err := driver.Open("file:" + filepath.Join(t.TempDir(), "test.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	conn, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := NewStmtCache(conn, size)
	t.Cleanup(func() { c.Close() })
	return c, conn
}

func TestStmtCache(t *testing.T) {
	ctx := context.Background()
	c, _ := openStmtCache(t, 2)
	// A script of several statements is not cacheable: it runs directly.
	if _, err := c.ExecContext(ctx, "CREATE TABLE t(x); CREATE TABLE u(y)"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if _, err := c.ExecContext(ctx, "INSERT INTO t VALUES (?)", i); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.stmts) != 1 {
		t.Fatalf("%d cached statements, want 1", len(c.stmts))
	}
	// A cached statement follows a schema change.
	if _, err := c.ExecContext(ctx, "ALTER TABLE t ADD COLUMN z DEFAULT 7"); err != nil {
		t.Fatal(err)
	}
	var n, z int
	if err := c.QueryRowContext(ctx, "SELECT count(*), max(z) FROM t").Scan(&n, &z); err != nil || n != 5 || z != 7 {
		t.Fatalf("count %d, z %d, %v", n, z, err)
	}
	// The bound holds; errors surface as from the connection.
	if _, err := c.ExecContext(ctx, "INSERT INTO nosuch VALUES (1)"); err == nil {
		t.Fatal("no error for a missing table")
	}
	if len(c.stmts) > 2 {
		t.Fatalf("%d cached statements, bound 2", len(c.stmts))
	}
	rows, err := c.QueryContext(ctx, "SELECT x FROM t ORDER BY x")
	if err != nil {
		t.Fatal(err)
	}
	var got []int
	for rows.Next() {
		var x int
		rows.Scan(&x)
		got = append(got, x)
	}
	rows.Close()
	if len(got) != 5 || got[4] != 4 {
		t.Fatalf("rows %v", got)
	}
}
