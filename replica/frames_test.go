package replica

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// bigVersion commits one admin change on the server that adds rows blobs
// of blobBytes random (incompressible) bytes: one version of about
// rows × blobBytes bytes of pages.
func bigVersion(t *testing.T, ts *testServer, rows, blobBytes int) {
	t.Helper()
	ps, err := ts.srv.Authority(testDB).Exec(context.Background(), func(tx mutators.Tx) error {
		if _, err := tx.Exec(`CREATE TABLE IF NOT EXISTS big (id INTEGER PRIMARY KEY, b BLOB)`); err != nil {
			return err
		}
		_, err := tx.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?) INSERT INTO big (b) SELECT randomblob(?) FROM n`, rows, blobBytes)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("version %d: %d pages", ps.Version, len(ps.Pages))
}

// largeVersionCase runs a version of rows × blobBytes to a replica that is
// behind (closed while the version commits) and to one that is connected
// (the live path), with the replica's message limit lowered to maxMessage.
func largeVersionCase(t *testing.T, rows, blobBytes int, maxMessage uint32) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	rm := ts.remote()
	rm.MaxMessage = maxMessage
	dir := t.TempDir()
	behindPath := filepath.Join(dir, "behind.db")
	behind := openSynced(t, behindPath, reg, rm)
	live := openSynced(t, filepath.Join(dir, "live.db"), reg, rm)
	mustMutate(t, behind, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, behind, live)
	behind.Close()

	bigVersion(t, ts, rows, blobBytes)
	mustMutate(t, live, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, live)

	behind = openSynced(t, behindPath, reg, rm)
	converged(t, ts, behind, live)
	for _, r := range []*Replica{behind, live} {
		if err := r.Status().LastError; err != nil {
			t.Fatalf("%s: %v", r.ClientID(), err)
		}
	}
}

// TestSyncVersionInParts: a version several times the replica's message
// limit reaches it in parts, behind and live.
func TestSyncVersionInParts(t *testing.T) {
	largeVersionCase(t, 100, 40<<10, protocol.MinMessage) // ~4 MiB against 1 MiB messages
}

// TestSyncSeventyThousandPages: an admin change of ~70,000 pages (~280 MB,
// incompressible), beyond the old 64 MiB message and 65,536-page limits,
// reaches a replica behind and one connected.
func TestSyncSeventyThousandPages(t *testing.T) {
	if testing.Short() {
		t.Skip("280 MB version; TestSyncVersionInParts covers parts in short mode")
	}
	largeVersionCase(t, 8750, 32000, 0)
}

// TestSyncVersionTooLarge: a version beyond what the replica said it holds
// stops its sync with a fatal, clear error instead of a reconnect loop.
func TestSyncVersionTooLarge(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	rm := ts.remote()
	rm.MaxVersionBytes = protocol.MinVersionBytes
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 30*time.Second)
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	bigVersion(t, ts, 40, 40<<10) // ~1.6 MiB
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	err := r.Sync(ctx)
	var re *protocol.RemoteError
	if !errors.As(err, &re) || re.Code != protocol.CodeVersionTooLarge {
		t.Fatalf("Sync: %v, want a fatal version too large", err)
	}
	t.Log(err)
}

// TestSyncServerBehind: a server restored from an older backup is behind
// the replica; the replica stops with ErrServerBehind instead of looping
// on a snapshot it refuses, and keeps its pending mutation queued.
func TestSyncServerBehind(t *testing.T) {
	reg := testRegistry(t)
	srvDir := t.TempDir()
	ts := startServer(t, reg, srvDir, "127.0.0.1:0", nil)
	backup := t.TempDir()
	path := filepath.Join(t.TempDir(), "r.db")
	r := openSynced(t, path, reg, ts.remote())
	ctx := waitCtx(t, 30*time.Second)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, r)
	// The backup: the server's files now, at the replica's version.
	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	copyDir(t, srvDir, backup)
	ts.restart()
	for i := range 3 {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr(fmt.Sprint("C", i), 1))
	}
	converged(t, ts, r)
	r.Close()
	// Restore the older backup.
	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	removeDir(t, srvDir)
	copyDir(t, backup, srvDir)
	ts.restart()
	r = openSynced(t, path, reg, ts.remote())
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Late", 1))
	err := r.WaitConnected(ctx)
	if !errors.Is(err, ErrServerBehind) {
		t.Fatalf("WaitConnected: %v, want ErrServerBehind", err)
	}
	t.Log(err)
	if st := r.Status(); st.Pending != 1 {
		t.Fatalf("pending %d, want the mutation still queued", st.Pending)
	}
}

// copyDir copies the tree src into dst.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
}

// removeDir empties dir.
func removeDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
}
