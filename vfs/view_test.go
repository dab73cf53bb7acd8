package vfs_test

import (
	"context"
	"testing"
)

// TestViewMatchesSQLite checks that View's schema cookie, read from the
// files, is what PRAGMA schema_version says on a connection: with an empty
// WAL, with page 1 in the WAL's first wal-index region, with it in the
// second (past frame 4062), with thousands of frames after the newest copy
// of page 1 (the search crosses a region boundary backwards), and after a
// drop.
func TestViewMatchesSQLite(t *testing.T) {
	r, path := openReplica(t)
	c := conn(t, openDB(t, path))
	ctx := context.Background()
	check := func(step string) uint32 {
		t.Helper()
		v, err := r.View()
		if err != nil {
			t.Fatalf("%s: View: %v", step, err)
		}
		var want uint32
		if err := c.QueryRowContext(ctx, "PRAGMA schema_version").Scan(&want); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if v.Cookie != want {
			t.Fatalf("%s: View says cookie %d, SQLite %d (%d frames)", step, v.Cookie, want, v.Frames)
		}
		return v.Frames
	}
	if n := check("empty WAL"); n != 0 {
		t.Fatalf("empty WAL: %d frames", n)
	}
	mustExec(t, c, "PRAGMA wal_autocheckpoint=0", "CREATE TABLE t(x INTEGER, pad TEXT)")
	check("page 1 in region 0")
	mustExec(t, c, "BEGIN", "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 40000) INSERT INTO t SELECT i, printf('%0400d', i) FROM n", "COMMIT")
	if n := check("after a large insert"); n < 4062 {
		t.Fatalf("only %d frames: the test needs page 1 past the first region", n)
	}
	mustExec(t, c, "CREATE TABLE u(y)")
	check("page 1 in region 1")
	before := check("again")
	mustExec(t, c, "UPDATE t SET x = x + 1", "UPDATE t SET x = x + 1")
	if n := check("frames after page 1"); n-before < 4096 {
		t.Fatalf("only %d frames after page 1's", n-before)
	}
	if err := r.Rebase(ctx); err != nil {
		t.Fatal(err)
	}
	if n := check("after a drop"); n != 0 {
		t.Fatalf("after a drop: %d frames", n)
	}
}
