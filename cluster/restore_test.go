package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// TestRestoreFromSnapshotAndStream: a real server writes through the
// Owner; a snapshot is taken midway and the stream trimmed behind it; a
// restore from the snapshot plus the rest of the stream (and one from the
// stream alone, before the trim) gives a file at the server's version and
// checksum, which an Authority opens and SQLite finds intact. A version
// that does not link is refused with ErrBrokenChain.
func TestRestoreFromSnapshotAndStream(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	l, snaps, ls := sh.log, sh.snaps, sh.leases
	o := NewOwner(l, ls, snaps, "n1", quiet)
	defer o.Close(ctx)
	srv := demoServer(t, o)
	a := srv.Authority("demo.db")
	id := uint64(0)
	push := func(n int) {
		t.Helper()
		var batch []server.Mutation
		for range n {
			id++
			// Many categories: the database grows over many pages.
			batch = append(batch, server.Mutation{ClientID: "alice", ID: id, Name: mutators.CreateCategoryOrIncrementIfExists,
				Args: mutators.CategoryArgs(fmt.Sprintf("category-%04d-%s", id%700, bytes.Repeat([]byte("x"), 40)), 1)})
		}
		if _, _, err := a.Push(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	for range 10 {
		push(100)
	}
	// Restore from the stream alone (no snapshot yet).
	p0 := filepath.Join(t.TempDir(), "db.sqlite")
	r0, err := Restore(ctx, l, snaps, "demo.db", p0)
	if err != nil {
		t.Fatal(err)
	}
	if r0.Version != a.Version() || r0.Checksum != a.Checksum() || r0.FromSnap != 0 {
		t.Fatalf("restore from the stream: %+v; server at version %d, checksum %016x", r0, a.Version(), a.Checksum())
	}
	// A snapshot at the current version, then more versions, then trim.
	sr, err := a.OpenSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img, err := sr.ReadPages(1, sr.DBSize)
	if err != nil {
		t.Fatal(err)
	}
	sr.Close()
	last, err := l.Last(ctx, "demo.db")
	if err != nil || last.Version != sr.Version {
		t.Fatalf("log tail %+v, %v; snapshot at %d", last, err, sr.Version)
	}
	if _, err := snaps.Put(ctx, SnapshotInfo{DB: "demo.db", Version: sr.Version, Seq: last.Seq, Checksum: sr.Checksum, PageSize: sr.PageSize, Pages: sr.DBSize}, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		push(100)
	}
	if err := l.TrimBefore(ctx, "demo.db", last.Seq); err != nil {
		t.Fatal(err)
	}
	p1 := filepath.Join(t.TempDir(), "db.sqlite")
	r1, err := Restore(ctx, l, snaps, "demo.db", p1)
	if err != nil {
		t.Fatal(err)
	}
	if r1.Version != a.Version() || r1.Checksum != a.Checksum() || r1.FromSnap != sr.Version {
		t.Fatalf("restore from the snapshot: %+v; server at version %d, checksum %016x, snapshot at %d", r1, a.Version(), a.Checksum(), sr.Version)
	}
	// The restored file is a server database at that version.
	ra, err := server.OpenAuthority(ctx, p1, mutators.NewRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	if ra.Version() != r1.Version || ra.Checksum() != r1.Checksum {
		t.Fatalf("the restored file opens at version %d, checksum %016x; want %d, %016x", ra.Version(), ra.Checksum(), r1.Version, r1.Checksum)
	}
	rows, err := ra.Query(ctx, "PRAGMA integrity_check")
	if err != nil {
		t.Fatal(err)
	}
	var ok string
	for rows.Next() {
		rows.Scan(&ok)
	}
	rows.Close()
	if ok != "ok" {
		t.Fatalf("integrity_check: %s", ok)
	}
	// A version that does not link (a rival's junk after the tail) stops
	// a restore, and the target file is left as it was.
	rival, err := l.NewAppender(ctx, "demo.db", "rival")
	if err != nil {
		t.Fatal(err)
	}
	_, tailVersion := rival.Last()
	if _, err := rival.Append(ctx, tailVersion+1, make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(context.Background(), l, snaps, "demo.db", p0); !errors.Is(err, ErrBrokenChain) {
		t.Fatalf("restore over a broken chain: %v, want ErrBrokenChain", err)
	}
	a0, err := server.OpenAuthority(ctx, p0, mutators.NewRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a0.Close()
	if a0.Checksum() != r0.Checksum {
		t.Fatal("a failed restore changed the file it would have replaced")
	}
}
