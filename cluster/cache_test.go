package cluster

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

var _ server.LocalCache = (*Owner)(nil)

// serverAt is demoServer on a given data directory (a node's disk, kept
// across a restart). The caller closes it; Close is idempotent.
func serverAt(t *testing.T, dir string, vl server.VersionLog) *server.Server {
	t.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	srv, err := server.Open(context.Background(), server.Config{
		Dir: dir, Mutators: reg, Logger: quiet, VersionLog: vl,
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.AddDatabase(context.Background(), "demo.db", "s3cret"); err != nil {
		t.Fatal(err)
	}
	return srv
}

// tailChecksum is the checksum after the last version in db's subject.
func tailChecksum(t *testing.T, ctx context.Context, l *Log, db string) (version, checksum uint64) {
	t.Helper()
	e, err := l.Last(ctx, db)
	if err != nil || len(e.Rec) < 8 {
		t.Fatalf("the stream's tail: %+v, %v", e, err)
	}
	ev, err := protocol.DecodeEncodedVersion(e.Rec[8:], protocol.DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	return e.Version, ev.PostChecksum
}

// TestFencedOwnerReopensFromTheStream: node A's last local commit was
// fenced (node B, which also believed it owned the database, appended that
// version first), so A's file holds a version the stream does not. A
// reopens the database at once: the file is set aside and restored to the
// stream's tail, with the stream's checksum, and A serves the next push.
// Node B, a new node without a file, restored the database before its
// first push.
func TestFencedOwnerReopensFromTheStream(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	// Two lease buckets: the only way to make two nodes both believe they
	// own a database, as a paused or partitioned owner may.
	l, snaps, lsA, lsB := sh.log, sh.snaps, sh.leases, sh.rivalLeases(t, ctx, 5*time.Second)
	dirA := t.TempDir()
	oA := NewOwner(l, lsA, snaps, "a", quiet)
	defer oA.Close(ctx)
	srvA := serverAt(t, dirA, oA)
	aA := srvA.Authority("demo.db") // version 1, the schema, by A
	if aA == nil {
		t.Fatal("A did not open the database")
	}
	for id := uint64(1); id <= 2; id++ {
		if _, _, err := aA.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}

	oB := NewOwner(l, lsB, snaps, "b", quiet)
	defer oB.Close(ctx)
	srvB := serverAt(t, t.TempDir(), oB)
	aB := srvB.Authority("demo.db")
	if aB == nil {
		t.Fatal("B did not open the database")
	}
	// B restored A's version 3 and appended its takeover version before
	// serving: that alone fences A.
	if tv, tsum := tailChecksum(t, ctx, l, "demo.db"); aB.Version() != 4 || tv != 4 || tsum != aB.Checksum() || tailOwner(t, ctx, l) != oB.Token() {
		t.Fatalf("B opened at version %d, %016x; the stream ends at %d, %016x by %q; want B's takeover version 4", aB.Version(), aB.Checksum(), tv, tsum, tailOwner(t, ctx, l))
	}
	if _, _, err := aB.Push(ctx, inc("bob", 1)); err != nil {
		t.Fatal(err)
	}
	// A's push commits version 4 locally; its append is fenced.
	if _, _, err := aA.Push(ctx, inc("alice", 3)); !errors.Is(err, ErrFenced) {
		t.Fatalf("A's push after B's: %v, want ErrFenced", err)
	}
	// A reopened the database from the stream (its lease was free again):
	// B's 5, then its own takeover version 6.
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	if aA.Version() != 6 || tv != 6 || tsum != aA.Checksum() || tailOwner(t, ctx, l) != oA.Token() {
		t.Fatalf("A is at version %d, checksum %016x after the fence; the stream at %d, %016x by %q; want A's takeover version 6", aA.Version(), aA.Checksum(), tv, tsum, tailOwner(t, ctx, l))
	}
	if _, err := os.Stat(filepath.Join(dirA, "dbs", "demo.db", "db.sqlite.stale")); err != nil {
		t.Fatalf("the fenced file was not set aside: %v", err)
	}
	if _, _, err := aA.Push(ctx, inc("alice", 3)); err != nil {
		t.Fatalf("A's push after its reopen: %v", err)
	}
	if tv, tsum := tailChecksum(t, ctx, l, "demo.db"); tv != 7 || tsum != aA.Checksum() {
		t.Fatalf("the stream ends at version %d, %016x after A's push; want 7, A's %016x", tv, tsum, aA.Checksum())
	}
	// And B, deposed in turn, reopens too, at A's 7 and its takeover 8.
	if _, _, err := aB.Push(ctx, inc("bob", 2)); !errors.Is(err, ErrFenced) {
		t.Fatalf("B's push after A's: %v, want ErrFenced", err)
	}
	if tv, tsum := tailChecksum(t, ctx, l, "demo.db"); aB.Version() != 8 || tv != 8 || aB.Checksum() != tsum {
		t.Fatalf("B at version %d, %016x after its fence; the stream at %d, %016x; want B's takeover version 8", aB.Version(), aB.Checksum(), tv, tsum)
	}
}

// tailOwner is the token of the Appender that wrote demo.db's last entry.
func tailOwner(t *testing.T, ctx context.Context, l *Log) string {
	t.Helper()
	e, err := l.Last(ctx, "demo.db")
	if err != nil {
		t.Fatal(err)
	}
	return e.Owner
}

// TestStaleFileIsRestoredOnRestart: node A's lease is taken from it, so
// its next commit never reaches the stream and it cannot reopen the
// database (another holder has the lease): the database stays stopped.
// Once the lease is free and A restarts on the same disk, the file with
// the commit the stream lacks is set aside and restored to the stream's
// tail before anything is served.
func TestStaleFileIsRestoredOnRestart(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 60*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	oA := NewOwner(l, ls, nil, "a", quiet)
	defer oA.Close(ctx)
	srvA := serverAt(t, dir, oA)
	aA := srvA.Authority("demo.db")
	if aA == nil {
		t.Fatal("A did not open the database")
	}
	if _, _, err := aA.Push(ctx, inc("alice", 1)); err != nil {
		t.Fatal(err)
	}
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	// Another node takes the lease (as if A's had expired unseen).
	if err := ls.kv.Purge(ctx, token("demo.db")); err != nil {
		t.Fatal(err)
	}
	thief, err := ls.Acquire(ctx, "demo.db", "n3")
	if err != nil {
		t.Fatal(err)
	}
	for oA.Owns("demo.db") { // A's next renewal (TTL/3) finds it lost
		if ctx.Err() != nil {
			t.Fatal("A never noticed its lease was taken")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, _, err := aA.Push(ctx, inc("alice", 2)); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("A's push without the lease: %v, want ErrLeaseHeld", err)
	}
	if _, _, err := aA.Push(ctx, inc("alice", 2)); err == nil {
		t.Fatal("the stopped database took a push")
	}
	if v, _ := tailChecksum(t, ctx, l, "demo.db"); v != tv {
		t.Fatalf("the stream moved to version %d without the lease", v)
	}
	if err := thief.Release(ctx); err != nil {
		t.Fatal(err)
	}
	srvA.Close()
	if err := oA.Close(ctx); err != nil {
		t.Fatal(err)
	}
	oA2 := NewOwner(l, ls, nil, "a", quiet)
	defer oA2.Close(ctx)
	srvA2 := serverAt(t, dir, oA2)
	var version, sum uint64
	if err := srvA2.WithAuthority(ctx, "demo.db", func(a *server.Authority) error {
		version, sum = a.Version(), a.Checksum()
		_, _, err := a.Push(ctx, inc("alice", 2))
		return err
	}); err != nil {
		t.Fatalf("A's push after its restart: %v", err)
	}
	tookOverAt(t, ctx, l, version, sum, tv, tsum)
	if _, err := os.Stat(filepath.Join(dir, "dbs", "demo.db", "db.sqlite.stale")); err != nil {
		t.Fatalf("the stale file was not set aside: %v", err)
	}
}

// TestNewNodeRestoresAndServesAReplica: a node with no local file takes a
// database over (after its owner closed), restores it from a snapshot and
// the stream after it, and serves a replica that ends at the stream's
// checksum.
func TestNewNodeRestoresAndServesAReplica(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	l, snaps, ls := sh.log, sh.snaps, sh.leases
	oA := NewOwner(l, ls, snaps, "a", quiet)
	srvA := serverAt(t, t.TempDir(), oA)
	aA := srvA.Authority("demo.db")
	if aA == nil {
		t.Fatal("A did not open the database")
	}
	for id := uint64(1); id <= 3; id++ {
		if _, _, err := aA.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	putSnapshot(t, ctx, snaps, l, aA)
	for id := uint64(4); id <= 5; id++ {
		if _, _, err := aA.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	srvA.Close()
	if err := oA.Close(ctx); err != nil {
		t.Fatal(err)
	}

	oB := NewOwner(l, ls, snaps, "b", quiet)
	defer oB.Close(ctx)
	srvB := serverAt(t, t.TempDir(), oB)
	addr, err := srvB.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "replica.db"), replica.Options{
		Mutators: demoRegistry(t),
		Remote:   &replica.Remote{Addr: addr, Database: "demo.db", Credential: "s3cret", Fingerprint: srvB.Fingerprint()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	st := r.Status()
	if tv != 8 || st.Version != tv || st.Checksum != tsum {
		t.Fatalf("replica at version %d, %016x; the stream ends at %d, %016x (want 8: the schema, five pushes, B's takeover, the replica's)", st.Version, st.Checksum, tv, tsum)
	}
	var n int
	if err := r.DB().QueryRowContext(ctx, "SELECT count FROM categories WHERE name = 'Food'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 6 {
		t.Fatalf("Food count %d on the replica, want 6", n)
	}
}

func demoRegistry(t *testing.T) *mutators.Registry {
	t.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	return reg
}

// putSnapshot stores a's current version as db's snapshot and trims the
// stream behind it, so that a restore must start from the snapshot.
func putSnapshot(t *testing.T, ctx context.Context, snaps *Snapshots, l *Log, a *server.Authority) {
	t.Helper()
	sr, err := a.OpenSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sr.Close()
	img, err := sr.ReadPages(1, sr.DBSize)
	if err != nil {
		t.Fatal(err)
	}
	last, err := l.Last(ctx, "demo.db")
	if err != nil || last.Version != sr.Version {
		t.Fatalf("log tail %+v, %v; snapshot at %d", last, err, sr.Version)
	}
	if _, err := snaps.Put(ctx, SnapshotInfo{DB: "demo.db", Version: sr.Version, Seq: last.Seq, Checksum: sr.Checksum, PageSize: sr.PageSize, Pages: sr.DBSize}, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	if err := l.TrimBefore(ctx, "demo.db", last.Seq); err != nil {
		t.Fatal(err)
	}
}
