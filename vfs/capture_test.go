package vfs_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// walDB is an ordinary WAL database, written by stock SQLite as the server's
// is, on one connection that never checkpoints by itself.
func walDB(t *testing.T) (*sql.Conn, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "server.db")
	db, err := driver.Open("file:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	c := conn(t, db)
	mustExec(t, c, "PRAGMA journal_mode=WAL", "PRAGMA wal_autocheckpoint=0",
		"CREATE TABLE t(x)", "CREATE TABLE u(y)")
	return c, path
}

// checkpointedCopy copies the database and its WAL elsewhere, checkpoints
// the copy, and returns its pages: the database as a reader sees it now.
func checkpointedCopy(t *testing.T, path string) [][]byte {
	t.Helper()
	dir := t.TempDir()
	cp := filepath.Join(dir, "copy.db")
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(path + suffix)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cp+suffix, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	db, err := driver.Open("file:"+cp, nil)
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, db, "PRAGMA wal_checkpoint(TRUNCATE)")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	var pages [][]byte
	for off := 0; off < len(b); off += wal.DefaultPageSize {
		pages = append(pages, b[off:off+wal.DefaultPageSize])
	}
	return pages
}

// checkCapture asserts that pages/dbSize are exactly the commit that took
// the database from before to after: every page that changed is captured
// with its new image, and no unchanged page is.
func checkCapture(t *testing.T, pages []wal.Page, dbSize uint32, before, after [][]byte) {
	t.Helper()
	if int(dbSize) != len(after) {
		t.Fatalf("captured db size %d, the database has %d pages", dbSize, len(after))
	}
	captured := map[uint32]bool{}
	for _, p := range pages {
		captured[p.Pgno] = true
		if p.Pgno > dbSize {
			t.Fatalf("captured page %d beyond the db size %d", p.Pgno, dbSize)
		}
		if !bytes.Equal(p.Data, after[p.Pgno-1]) {
			t.Fatalf("captured page %d differs from the committed page", p.Pgno)
		}
		if int(p.Pgno) <= len(before) && bytes.Equal(p.Data, before[p.Pgno-1]) {
			t.Fatalf("captured page %d, which the commit did not change", p.Pgno)
		}
	}
	for i := range after {
		pgno := uint32(i + 1)
		if (i >= len(before) || !bytes.Equal(before[i], after[i])) && !captured[pgno] {
			t.Fatalf("page %d changed but was not captured", pgno)
		}
	}
}

func newCapture(t *testing.T, path string) *vfs.Capture {
	t.Helper()
	c, err := vfs.NewCapture(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func next(t *testing.T, c *vfs.Capture) ([]wal.Page, uint32) {
	t.Helper()
	pages, dbSize, err := c.Next()
	if err != nil {
		t.Fatal(err)
	}
	return pages, dbSize
}

func TestCaptureCommit(t *testing.T) {
	db, path := walDB(t)
	c := newCapture(t, path)
	if pages, _ := next(t, c); len(pages) != 0 {
		t.Fatalf("nothing committed since NewCapture, got %d pages", len(pages))
	}
	before := checkpointedCopy(t, path)
	mustExec(t, db, "INSERT INTO t SELECT randomblob(1500) FROM generate_series(1, 20)")
	pages, dbSize := next(t, c)
	checkCapture(t, pages, dbSize, before, checkpointedCopy(t, path))
	if len(pages) == 0 {
		t.Fatal("a commit captured no pages")
	}
	if pages, _ := next(t, c); len(pages) != 0 {
		t.Fatalf("the same commit was captured twice: %d pages", len(pages))
	}
}

// A WAL file written with zeros ahead of SQLite (the server presizes the
// WAL after a TRUNCATE checkpoint, so that commits overwrite it in place) is
// empty to the capture until SQLite writes its header; then the commit is
// captured, and the next ones.
func TestCaptureZeroedWAL(t *testing.T) {
	db, path := walDB(t)
	mustExec(t, db, "INSERT INTO u VALUES (1)", "PRAGMA wal_checkpoint(TRUNCATE)")
	if err := os.WriteFile(path+"-wal", make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	c := newCapture(t, path)
	if pages, _ := next(t, c); len(pages) != 0 || c.Frames() != 0 {
		t.Fatalf("a zeroed WAL: %d pages, %d frames, want none", len(pages), c.Frames())
	}
	for i := 0; i < 3; i++ {
		before := checkpointedCopy(t, path)
		mustExec(t, db, "INSERT INTO t SELECT randomblob(1500) FROM generate_series(1, 5)")
		pages, dbSize := next(t, c)
		if len(pages) == 0 {
			t.Fatalf("commit %d over the zeros captured no pages", i)
		}
		checkCapture(t, pages, dbSize, before, checkpointedCopy(t, path))
	}
	if st, err := os.Stat(path + "-wal"); err != nil || st.Size() != 64<<10 {
		t.Fatalf("the WAL grew or shrank: %v, %v", st, err)
	}
}

// A rolled-back transaction that spilled frames into the WAL is not a
// commit: it yields nothing, and the next commit (which overwrites those
// frames) yields only its own pages.
func TestCaptureRollbackSpill(t *testing.T) {
	db, path := walDB(t)
	c := newCapture(t, path)
	mustExec(t, db, "INSERT INTO u VALUES (1)")
	next(t, c)
	before := checkpointedCopy(t, path)
	walBefore, err := os.Stat(path + "-wal")
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, db, "PRAGMA cache_size=2", "BEGIN",
		"INSERT INTO t SELECT randomblob(3000) FROM generate_series(1, 200)")
	if st, err := os.Stat(path + "-wal"); err != nil || st.Size() <= walBefore.Size() {
		t.Fatalf("the transaction did not spill into the WAL: %v, %v", st, err)
	}
	if pages, _ := next(t, c); len(pages) != 0 {
		t.Fatalf("an open transaction's spilled frames were captured: %d pages", len(pages))
	}
	mustExec(t, db, "ROLLBACK")
	if pages, _ := next(t, c); len(pages) != 0 {
		t.Fatalf("a rolled-back transaction was captured: %d pages", len(pages))
	}
	mustExec(t, db, "INSERT INTO u VALUES (2)")
	pages, dbSize := next(t, c)
	checkCapture(t, pages, dbSize, before, checkpointedCopy(t, path))
}

// After a checkpoint SQLite restarts the WAL with new salts; the next
// commit's frames are at the start of the file again.
func TestCaptureFollowsRestart(t *testing.T) {
	db, path := walDB(t)
	c := newCapture(t, path)
	mustExec(t, db, "INSERT INTO t SELECT randomblob(1500) FROM generate_series(1, 20)")
	next(t, c)
	var busy, logFrames, ckpt int
	if err := db.QueryRowContext(context.Background(), "PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &logFrames, &ckpt); err != nil || busy != 0 || logFrames != ckpt {
		t.Fatalf("checkpoint: busy=%d log=%d checkpointed=%d, %v", busy, logFrames, ckpt, err)
	}
	for i := 0; i < 3; i++ {
		before := checkpointedCopy(t, path)
		mustExec(t, db, "INSERT INTO u VALUES (1)")
		pages, dbSize := next(t, c)
		checkCapture(t, pages, dbSize, before, checkpointedCopy(t, path))
	}
	if err := db.QueryRowContext(context.Background(), "PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &logFrames, &ckpt); err != nil || busy != 0 {
		t.Fatalf("checkpoint: busy=%d, %v", busy, err)
	}
	before := checkpointedCopy(t, path)
	mustExec(t, db, "DELETE FROM t")
	pages, dbSize := next(t, c)
	checkCapture(t, pages, dbSize, before, checkpointedCopy(t, path))
}

// Two restarts between calls mean a whole generation of commits went by
// unseen: the capture must say so rather than return a partial set.
func TestCaptureLost(t *testing.T) {
	db, path := walDB(t)
	c := newCapture(t, path)
	mustExec(t, db, "INSERT INTO t VALUES (1)")
	next(t, c)
	for i := 0; i < 2; i++ {
		mustExec(t, db, "PRAGMA wal_checkpoint(PASSIVE)", "INSERT INTO t VALUES (2)")
	}
	if _, _, err := c.Next(); !errors.Is(err, vfs.ErrCaptureLost) {
		t.Fatalf("got %v, want ErrCaptureLost", err)
	}
}

// TestCaptureBefore: the images NextBefore returns are the pages as they
// were at the previous commit, across passive checkpoints and WAL restarts:
// what a replica one version behind holds, the base of the server's deltas.
func TestCaptureBefore(t *testing.T) {
	ctx := context.Background()
	c, path := walDB(t)
	capt, err := vfs.NewCapture(path)
	if err != nil {
		t.Fatal(err)
	}
	defer capt.Close()
	prev := checkpointedCopy(t, path)
	for i := 0; i < 60; i++ {
		switch {
		case i%7 == 3:
			mustExec(t, c, "PRAGMA wal_checkpoint(PASSIVE)")
		case i%11 == 5:
			mustExec(t, c, "PRAGMA wal_checkpoint(RESTART)")
		}
		if i == 40 {
			mustExec(t, c, "DELETE FROM t") // shrink-ish, then grow again
		} else {
			if _, err := c.ExecContext(ctx, "INSERT INTO t VALUES(randomblob(?))", 100+i*97%3000); err != nil {
				t.Fatal(err)
			}
		}
		if i%5 == 2 {
			// Next between: the images the next call starts from are
			// this call's (Capture.lastImages), as much as NextBefore's.
			if _, _, err := capt.Next(); err != nil {
				t.Fatalf("commit %d: %v", i, err)
			}
			prev = checkpointedCopy(t, path)
			continue
		}
		pages, before, _, err := capt.NextBefore()
		if err != nil {
			t.Fatalf("commit %d: %v", i, err)
		}
		if len(before) != len(pages) {
			t.Fatalf("commit %d: %d before images for %d pages", i, len(before), len(pages))
		}
		for j, p := range pages {
			var want []byte
			if int(p.Pgno) <= len(prev) {
				want = prev[p.Pgno-1]
			}
			if !bytes.Equal(before[j], want) && !(want == nil && before[j] == nil) {
				// A page beyond the previous database may still be in the
				// main file from before a shrink; only pages inside it count.
				if int(p.Pgno) <= len(prev) {
					t.Fatalf("commit %d: image of page %d before the commit differs", i, p.Pgno)
				}
			}
		}
		prev = checkpointedCopy(t, path)
	}
}

// Each capture's first read is sized by the commits the last one found
// (vfs.Capture.lastFrames): commits that grow, shrink, and come several to
// a call, in a WAL full of a previous generation's frames, are each
// captured whole, and nothing after them.
func TestCaptureCommitsOfChangingSizes(t *testing.T) {
	db, path := walDB(t)
	// A generation of frames that a restart leaves behind, for the
	// reads to run into.
	mustExec(t, db, "INSERT INTO u SELECT randomblob(1500) FROM generate_series(1, 60)", "PRAGMA wal_checkpoint(PASSIVE)")
	c := newCapture(t, path)
	mustExec(t, db, "INSERT INTO t VALUES (0)") // restarts the WAL
	next(t, c)
	for i, stmts := range [][]string{
		{"UPDATE t SET x = x + 1"},
		{"INSERT INTO t SELECT randomblob(1500) FROM generate_series(1, 40)"},
		{"UPDATE t SET x = x + 1 WHERE rowid = 1"},
		{"UPDATE t SET x = x + 1 WHERE rowid = 1", "INSERT INTO t SELECT randomblob(1500) FROM generate_series(1, 30)", "UPDATE t SET x = 7 WHERE rowid = 2"},
		{"UPDATE t SET x = x + 1 WHERE rowid = 1"},
		{"UPDATE t SET x = randomblob(1500) WHERE rowid > 20"},
	} {
		before := checkpointedCopy(t, path)
		mustExec(t, db, stmts...)
		pages, dbSize := next(t, c)
		if len(pages) == 0 {
			t.Fatalf("step %d: nothing captured", i)
		}
		checkCapture(t, pages, dbSize, before, checkpointedCopy(t, path))
		if pages, _ := next(t, c); len(pages) != 0 {
			t.Fatalf("step %d: captured again: %d pages", i, len(pages))
		}
	}
}
