package cluster

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// gatedSource is a SnapshotSource that holds every snapshot until the
// test opens its gate, and counts how many run at once.
type gatedSource struct {
	src  SnapshotSource
	gate chan struct{}

	mu             sync.Mutex
	calls, now, mx int
}

func (g *gatedSource) WithAuthority(ctx context.Context, name string, fn func(*server.Authority) error) error {
	g.mu.Lock()
	g.calls++
	g.now++
	g.mx = max(g.mx, g.now)
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.now--
		g.mu.Unlock()
	}()
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.src.WithAuthority(ctx, name, fn)
}

func (g *gatedSource) counts() (calls, mx int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.calls, g.mx
}

// TestOwnerWritesSnapshotsAndTrims: with a snapshot source, the owner of
// a real server's database writes a snapshot when the policy says (here
// every 10 versions at least, 20 at most), off the writer's path: while a
// snapshot is held up, pushes go on and no second one starts. Once it
// runs, the snapshot holds the stream's sequence and checksum of its
// version, the stream is trimmed behind it, and a restore from it gives
// the server's version and checksum.
func TestOwnerWritesSnapshotsAndTrims(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	l, snaps, ls := sh.log, sh.snaps, sh.leases
	o := NewOwner(l, ls, snaps, "n1", quiet)
	defer o.Close(ctx)
	srv := demoServer(t, o)
	g := &gatedSource{src: srv, gate: make(chan struct{})}
	o.SetSnapshotSource(g, SnapshotPolicy{MinVersions: 10, MaxVersions: 20})
	a := srv.Authority("demo.db")
	if a == nil {
		t.Fatal("the database did not open")
	}
	id := uint64(0)
	push := func(n int) {
		t.Helper()
		for range n {
			id++
			if _, _, err := a.Push(ctx, inc("alice", id)); err != nil {
				t.Fatal(err)
			}
		}
	}
	push(60) // versions 2..61: the 20th started a snapshot, held at the gate
	if calls, mx := g.counts(); calls != 1 || mx != 1 {
		t.Fatalf("%d snapshots started, %d at once, while one was held; want 1, 1", calls, mx)
	}
	if _, err := snaps.Info(ctx, "demo.db"); err == nil {
		t.Fatal("a snapshot was stored while its source was held")
	}
	close(g.gate)
	// The held one runs (at the version of its pin: 61, the latest), the
	// next push starts another (41 versions since the first began).
	var info SnapshotInfo
	var err error
	for {
		info, err = snaps.Info(ctx, "demo.db")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("no snapshot stored: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if info.Version != 61 {
		t.Fatalf("snapshot at version %d, want 61 (the version when it ran)", info.Version)
	}
	e, err := entryOf(ctx, l, "demo.db", info.Version)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := postChecksum(e)
	if err != nil || e.Seq != info.Seq || sum != info.Checksum {
		t.Fatalf("snapshot %+v; the stream's entry of its version: seq %d, checksum %016x (%v)", info, e.Seq, sum, err)
	}
	// Trimmed behind it: the subject's first entry is the snapshot's.
	for {
		es, err := l.Read(ctx, "demo.db", 0, 1)
		if err != nil || len(es) != 1 {
			t.Fatalf("read the subject's first entry: %v, %d", err, len(es))
		}
		if es[0].Seq == info.Seq {
			break
		}
		if es[0].Seq > info.Seq {
			t.Fatalf("trimmed past the snapshot: first entry seq %d, snapshot's %d", es[0].Seq, info.Seq)
		}
		if ctx.Err() != nil {
			t.Fatalf("not trimmed behind the snapshot: first entry seq %d, snapshot's %d", es[0].Seq, info.Seq)
		}
		time.Sleep(20 * time.Millisecond)
	}
	push(25) // 62..86: 62 starts the next (42 versions since the first began), and 20 after it another
	for {
		if info2, err := snaps.Info(ctx, "demo.db"); err == nil && info2.Version > info.Version {
			info = info2
			break
		}
		if ctx.Err() != nil {
			t.Fatal("no second snapshot")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if calls, mx := g.counts(); calls < 2 || mx != 1 {
		t.Fatalf("%d snapshots, %d at once; want at least 2, one at a time", calls, mx)
	}
	r, err := Restore(ctx, l, snaps, "demo.db", filepath.Join(t.TempDir(), "db.sqlite"))
	if err != nil {
		t.Fatal(err)
	}
	// A third snapshot may land between the Info above and the restore
	// (the writer goes on in the background): the restore starts from the
	// newest, which is never older than the one seen.
	if r.FromSnap < info.Version || r.Version != a.Version() || r.Checksum != a.Checksum() {
		t.Fatalf("restore %+v; snapshot at %d, server at %d, %016x", r, info.Version, a.Version(), a.Checksum())
	}
}

// TestEntryOf finds versions by binary search on a subject that shares
// its stream with another and is trimmed at its start.
func TestEntryOf(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	a, err := l.NewAppender(ctx, "a", "x")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.NewAppender(ctx, "b", "x")
	if err != nil {
		t.Fatal(err)
	}
	seqs := map[uint64]uint64{}
	bv := uint64(0)
	for v := uint64(1); v <= 50; v++ {
		s, err := a.Append(ctx, v, []byte{byte(v)})
		if err != nil {
			t.Fatal(err)
		}
		seqs[v] = s
		for range v % 3 { // b's entries between a's, unevenly
			bv++
			if _, err := b.Append(ctx, bv, []byte{1}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := l.TrimBefore(ctx, "a", seqs[10]); err != nil {
		t.Fatal(err)
	}
	for v := uint64(10); v <= 50; v++ {
		e, err := entryOf(ctx, l, "a", v)
		if err != nil || e.Version != v || e.Seq != seqs[v] {
			t.Fatalf("entryOf(%d) = %+v, %v; want seq %d", v, e, err, seqs[v])
		}
	}
	for _, v := range []uint64{0, 1, 9, 51} {
		if _, err := entryOf(ctx, l, "a", v); err == nil {
			t.Fatalf("entryOf(%d) found a version the subject does not hold", v)
		}
	}
}

// TestRestoreSeesATrimUnderIt: a restore whose image is older than the
// stream's first entry (a newer snapshot was stored and the stream
// trimmed behind it while the restore read the old one) says so with
// errTrimmed, which Restore answers by starting again from the newer
// snapshot; a version out of order that is not a gap is only
// ErrBrokenChain.
func TestRestoreSeesATrimUnderIt(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ap, err := l.NewAppender(ctx, "db", "x")
	if err != nil {
		t.Fatal(err)
	}
	var seq20 uint64
	for v := uint64(1); v <= 25; v++ {
		s, err := ap.Append(ctx, v, make([]byte, 16))
		if err != nil {
			t.Fatal(err)
		}
		if v == 20 {
			seq20 = s
		}
	}
	if err := l.TrimBefore(ctx, "db", seq20); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img := wal.EmptyDatabase(wal.DefaultPageSize)
	if _, err := f.WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
	_, err = apply(ctx, l, "db", f, wal.DefaultPageSize, tableOf(img, wal.DefaultPageSize), Restored{Version: 10, FromSnap: 10}, 1)
	if !errors.Is(err, errTrimmed) || !errors.Is(err, ErrBrokenChain) {
		t.Fatalf("an image at 10 over a stream trimmed to 20: %v, want errTrimmed", err)
	}
	_, err = apply(ctx, l, "db", f, wal.DefaultPageSize, tableOf(img, wal.DefaultPageSize), Restored{Version: 22}, seq20)
	if errors.Is(err, errTrimmed) || !errors.Is(err, ErrBrokenChain) {
		t.Fatalf("an image at 22 given version 20: %v, want ErrBrokenChain only", err)
	}
}
