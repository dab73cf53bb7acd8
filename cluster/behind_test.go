package cluster

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// recorder is a slog.Handler that keeps the records' messages and
// attributes, for tests that check what the owner reports.
type recorder struct {
	mu   *sync.Mutex
	recs *[]map[string]any
}

func newRecorder() recorder { return recorder{mu: &sync.Mutex{}, recs: &[]map[string]any{}} }

func (r recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r recorder) Handle(_ context.Context, rec slog.Record) error {
	m := map[string]any{"msg": rec.Message}
	rec.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.Any(); return true })
	r.mu.Lock()
	*r.recs = append(*r.recs, m)
	r.mu.Unlock()
	return nil
}
func (r recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r recorder) WithGroup(string) slog.Handler      { return r }

// find returns the records with message msg.
func (r recorder) find(msg string) []map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]any
	for _, m := range *r.recs {
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

const restoredMsg = "restored database from the stream"

// TestRestartedNodeAppliesOnlyWhatItMissed: node A stops at version N;
// node B takes the database over (its takeover version) and goes 1000
// versions further; the
// stream is trimmed behind a snapshot older than N, so N's entry is still
// there. When A restarts on its disk, its file (set aside: not the tail)
// is at N with the stream's checksum there, so the restore starts from it
// and applies only the 1001 versions after N, ending at the stream's
// version and checksum, before its own takeover version. The same state restored in full (from the snapshot) is
// timed beside it.
func TestRestartedNodeAppliesOnlyWhatItMissed(t *testing.T) {
	if testing.Short() {
		t.Skip("1000 pushes through a real server and JetStream")
	}
	ctx := bounded(t, 120*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	l, snaps, ls := sh.log, sh.snaps, sh.leases
	dirA := t.TempDir()
	oA := NewOwner(l, ls, snaps, "a", quiet)
	srvA := serverAt(t, dirA, oA)
	aA := srvA.Authority("demo.db")
	if aA == nil {
		t.Fatal("A did not open the database")
	}
	// About 4 MB of categories, so that an image costs more than a few
	// versions to fetch.
	id := uint64(0)
	for b := range 20 {
		var batch []server.Mutation
		for range 100 {
			id++
			batch = append(batch, server.Mutation{ClientID: "alice", ID: id, Name: mutators.CreateCategoryOrIncrementIfExists,
				Args: mutators.CategoryArgs(fmt.Sprintf("category-%05d-%s", id, bytes.Repeat([]byte("x"), 1000)), 1)})
		}
		if _, _, err := aA.Push(ctx, batch); err != nil {
			t.Fatal(err)
		}
		if b == 17 {
			putSnapshot(t, ctx, snaps, l, aA) // and trim behind it: before N
		}
	}
	n := aA.Version()
	srvA.Close()
	if err := oA.Close(ctx); err != nil {
		t.Fatal(err)
	}

	oB := NewOwner(l, ls, snaps, "b", quiet)
	srvB := serverAt(t, t.TempDir(), oB)
	aB := srvB.Authority("demo.db")
	if aB == nil {
		t.Fatal("B did not open the database")
	}
	for id := uint64(1); id <= 1000; id++ {
		if _, _, err := aB.Push(ctx, inc("bob", id)); err != nil {
			t.Fatal(err)
		}
	}
	srvB.Close()
	if err := oB.Close(ctx); err != nil {
		t.Fatal(err)
	}
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	if tv < n+1000 {
		t.Fatalf("the stream ends at %d, want at least %d", tv, n+1000)
	}

	rec := newRecorder()
	oA2 := NewOwner(l, ls, snaps, "a", slog.New(rec))
	defer oA2.Close(ctx)
	srvA2 := serverAt(t, dirA, oA2)
	var version, sum uint64
	if err := srvA2.WithAuthority(ctx, "demo.db", func(a *server.Authority) error {
		version, sum = a.Version(), a.Checksum()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	tookOverAt(t, ctx, l, version, sum, tv, tsum)
	rs := rec.find(restoredMsg)
	if len(rs) != 1 {
		t.Fatalf("%d restores logged, want 1: %v", len(rs), *rec.recs)
	}
	if rs[0]["from_file"] != n || rs[0]["applied"] != int64(tv-n) || rs[0]["version"] != tv || rs[0]["from_snapshot"] != uint64(0) {
		t.Fatalf("restore %v; want from the file at %d, %d versions applied, ending at %d", rs[0], n, tv-n, tv)
	}
	// The same two restores side by side, from the set-aside file and in
	// full from the snapshot: what the shortcut saves.
	stale := filepath.Join(dirA, "dbs", "demo.db", "db.sqlite.stale")
	start := time.Now()
	rb, err := restoreBehind(ctx, l, "demo.db", filepath.Join(t.TempDir(), "db.sqlite"), stale)
	behind := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	rf, err := Restore(ctx, l, snaps, "demo.db", filepath.Join(t.TempDir(), "db.sqlite"))
	full := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if rb.Checksum != rf.Checksum || rb.Version != rf.Version {
		t.Fatalf("the two restores differ: %+v, %+v", rb, rf)
	}
	t.Logf("restore of %d versions behind: from the local file %v (%d applied), in full from the snapshot at %d %v (%d applied): ratio %.2f",
		rb.Version-n, behind, rb.Applied, rf.FromSnap, full, rf.Applied, float64(behind)/float64(full))
}

// TestDivergedFileIsRestoredInFull: node A's last local commit (version
// N+1) was fenced by node B's N+1, so the file A sets aside is at a
// version the stream holds, but with another checksum: A's reopen does not
// start from it, it restores in full, and ends at B's version and
// checksum.
func TestDivergedFileIsRestoredInFull(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	// Two lease buckets: two nodes that both believe they own it.
	l, snaps, lsA, lsB := sh.log, sh.snaps, sh.leases, sh.rivalLeases(t, ctx, 5*time.Second)
	rec := newRecorder()
	oA := NewOwner(l, lsA, snaps, "a", slog.New(rec))
	defer oA.Close(ctx)
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
	oB := NewOwner(l, lsB, snaps, "b", quiet)
	defer oB.Close(ctx)
	srvB := serverAt(t, t.TempDir(), oB)
	aB := srvB.Authority("demo.db")
	if aB == nil {
		t.Fatal("B did not open the database")
	}
	if _, _, err := aB.Push(ctx, inc("bob", 1)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := aA.Push(ctx, inc("alice", 4)); !errors.Is(err, ErrFenced) {
		t.Fatalf("A's push after B's: %v, want ErrFenced", err)
	}
	// B's takeover version and push, then A's takeover version.
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	if aA.Version() != tv || aA.Checksum() != tsum || tv != 7 {
		t.Fatalf("A at %d, %016x after its reopen; want the stream's 7, %016x", aA.Version(), aA.Checksum(), tsum)
	}
	if len(rec.find("the set-aside file is not a version of the stream; restoring in full")) != 1 {
		t.Fatalf("A's fenced file was not refused as a base: %v", *rec.recs)
	}
	rs := rec.find(restoredMsg)
	if len(rs) != 1 || rs[0]["from_file"] != uint64(0) || rs[0]["version"] != tv-1 {
		t.Fatalf("restores %v; want one in full to %d", rs, tv-1)
	}
}

// tookOverAt checks that a node that restored db to the stream's version
// tv (checksum tsum) and then appended its takeover version is at
// (version, sum): tv+1, whose entry starts from tsum and ends at sum.
func tookOverAt(t *testing.T, ctx context.Context, l *Log, version, sum, tv, tsum uint64) {
	t.Helper()
	if version != tv+1 {
		t.Fatalf("at version %d; want the restored %d and the takeover version after it", version, tv)
	}
	e, err := entryOf(ctx, l, "demo.db", version)
	if err != nil {
		t.Fatal(err)
	}
	post, err := postChecksum(e)
	if err != nil {
		t.Fatal(err)
	}
	if pre := binary.LittleEndian.Uint64(e.Rec); pre != tsum || post != sum {
		t.Fatalf("the takeover version %d goes from %016x to %016x; want from the restored %016x to the node's %016x", version, pre, post, tsum, sum)
	}
}

// TestRestoreBehindReadsTheWAL: a set-aside file whose last versions are
// still in its WAL (copied while the server had it open: its main file is
// the empty database of the open's checkpoint, every version since is in
// the WAL) is at the WAL's version, not the main file's: the restore
// starts there and applies only what came after. Without its WAL the same
// file is the new database it was before version 1, and is not a base.
func TestRestoreBehindReadsTheWAL(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 60*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwner(l, ls, nil, "a", quiet)
	defer o.Close(ctx)
	dir := t.TempDir()
	srv := serverAt(t, dir, o)
	a := srv.Authority("demo.db")
	if a == nil {
		t.Fatal("the database did not open")
	}
	for id := uint64(1); id <= 5; id++ {
		if _, _, err := a.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	at := a.Version()
	live := filepath.Join(dir, "dbs", "demo.db", "db.sqlite")
	stale := filepath.Join(t.TempDir(), "db.sqlite.stale")
	for _, sfx := range []string{"", "-wal"} {
		if err := copyFile(live+sfx, stale+sfx); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := os.Stat(stale + "-wal"); err != nil || st.Size() == 0 {
		t.Fatalf("the copied WAL: %v, %v; the test needs versions in it", st, err)
	}
	for id := uint64(6); id <= 8; id++ {
		if _, _, err := a.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	res, err := restoreBehind(ctx, l, "demo.db", filepath.Join(t.TempDir(), "db.sqlite"), stale)
	if err != nil {
		t.Fatal(err)
	}
	if res.FromFile != at || res.Applied != 3 || res.Version != a.Version() || res.Checksum != a.Checksum() {
		t.Fatalf("restore %+v; want from the WAL's version %d, 3 applied, at the server's %d, %016x", res, at, a.Version(), a.Checksum())
	}
	if st, err := os.Stat(stale + "-wal"); err != nil || st.Size() == 0 {
		t.Fatalf("the set-aside WAL was changed: %v, %v", st, err)
	}
	if err := os.Remove(stale + "-wal"); err != nil {
		t.Fatal(err)
	}
	if _, err := restoreBehind(ctx, l, "demo.db", filepath.Join(t.TempDir(), "db.sqlite"), stale); !errors.Is(err, errNoLocal) {
		t.Fatalf("the main file without its WAL: %v, want errNoLocal", err)
	}
}
