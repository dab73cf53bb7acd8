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

// TestReopenRestoresAFencedCommit: node A's last local commit was fenced
// (node B, which also believed it owned the database, appended that
// version first), so A's file holds a version the stream does not. When A
// opens the database again, the file is set aside and restored to the
// stream's tail, with the stream's checksum, and A then serves from it.
// Node B, a new node without a file, restores the database before its
// first push.
func TestReopenRestoresAFencedCommit(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 60*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := OpenSnapshots(ctx, js, SnapshotConfig{})
	if err != nil {
		t.Fatal(err)
	}
	// Two lease buckets: the only way to make two nodes both believe they
	// own a database, as a paused or partitioned owner may.
	lsA, err := OpenLeases(ctx, js, LeaseConfig{TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	lsB, err := OpenLeases(ctx, js, LeaseConfig{Bucket: "sqlrebase-leases-b", TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
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
	if aB.Version() != 3 || aB.Checksum() != aA.Checksum() {
		t.Fatalf("B opened at version %d, checksum %016x; want A's 3, %016x", aB.Version(), aB.Checksum(), aA.Checksum())
	}
	if _, _, err := aB.Push(ctx, inc("bob", 1)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := aA.Push(ctx, inc("alice", 3)); !errors.Is(err, ErrFenced) {
		t.Fatalf("A's push after B's: %v, want ErrFenced", err)
	}
	if aA.Version() != 4 {
		t.Fatalf("A's file is at version %d; the fenced commit should have made 4", aA.Version())
	}
	fenced := aA.Checksum()
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	if tv != 4 || tsum != aB.Checksum() || tsum == fenced {
		t.Fatalf("the stream ends at version %d, %016x; want B's 4, %016x (A's fenced one is %016x)", tv, tsum, aB.Checksum(), fenced)
	}

	// A restarts on the same disk.
	srvA.Close()
	if err := oA.Close(ctx); err != nil {
		t.Fatal(err)
	}
	oA2 := NewOwner(l, lsA, snaps, "a", quiet)
	defer oA2.Close(ctx)
	srvA2 := serverAt(t, dirA, oA2)
	var version, sum uint64
	if err := srvA2.WithAuthority(ctx, "demo.db", func(a *server.Authority) error {
		version, sum = a.Version(), a.Checksum()
		_, _, err := a.Push(ctx, inc("alice", 3))
		return err
	}); err != nil {
		t.Fatalf("A's push after its reopen: %v", err)
	}
	if version != 4 || sum != tsum {
		t.Fatalf("A reopened at version %d, checksum %016x; want the stream's 4, %016x", version, sum, tsum)
	}
	if _, err := os.Stat(filepath.Join(dirA, "dbs", "demo.db", "db.sqlite.stale")); err != nil {
		t.Fatalf("the fenced file was not set aside: %v", err)
	}
	if tv, _ := tailChecksum(t, ctx, l, "demo.db"); tv != 5 {
		t.Fatalf("the stream ends at version %d after A's push, want 5", tv)
	}
}

// TestNewNodeRestoresAndServesAReplica: a node with no local file takes a
// database over (after its owner closed), restores it from a snapshot and
// the stream after it, and serves a replica that ends at the stream's
// checksum.
func TestNewNodeRestoresAndServesAReplica(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 60*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := OpenSnapshots(ctx, js, SnapshotConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
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
	if tv != 7 || st.Version != tv || st.Checksum != tsum {
		t.Fatalf("replica at version %d, %016x; the stream ends at %d, %016x (want 7: five pushes, the schema, the replica's)", st.Version, st.Checksum, tv, tsum)
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
