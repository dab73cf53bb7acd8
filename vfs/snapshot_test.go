package vfs_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"

	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// image returns a server snapshot as an installable image.
func image(t *testing.T, ps *wal.PageSet) (vfs.SnapshotImage, []byte) {
	t.Helper()
	var raw []byte
	for _, p := range ps.Pages {
		raw = append(raw, p.Data...)
	}
	return vfs.SnapshotImage{Src: bytes.NewReader(raw), Version: ps.Version, PageSize: ps.PageSize, Pages: ps.DBSize, Checksum: ps.PostChecksum}, raw
}

// TestInstallSnapshot: an image installed from outside memory's page set
// makes the main file the server's bytes; versions apply on top; a wrong
// checksum or an older version changes nothing.
func TestInstallSnapshot(t *testing.T) {
	ctx := context.Background()
	a := newAuthority(t)
	serverExec(t, a, "INSERT INTO other SELECT randomblob(1000) FROM generate_series(1, 1500)") // beyond one chunk of 256 pages
	snap, err := a.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img, raw := image(t, snap)
	r, path := openReplica(t)
	bad := img
	bad.Checksum ^= 1
	if err := r.InstallSnapshot(ctx, bad); !errors.Is(err, vfs.ErrChecksum) || r.Version() != 0 {
		t.Fatalf("wrong checksum: %v, version %d", err, r.Version())
	}
	if err := r.InstallSnapshot(ctx, img); err != nil {
		t.Fatal(err)
	}
	if r.Version() != a.Version() || r.Checksum() != a.Checksum() {
		t.Fatalf("replica at %d/%016x, server at %d/%016x", r.Version(), r.Checksum(), a.Version(), a.Checksum())
	}
	main, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(main, raw) {
		t.Fatal("the main file differs from the snapshot")
	}
	serverExec(t, a, "DELETE FROM other WHERE rowid % 2 = 0")
	if err := r.Rebase(ctx, since(t, a, r.Version())...); err != nil {
		t.Fatal(err)
	}
	if r.Checksum() != a.Checksum() {
		t.Fatal("a version after the snapshot does not apply on top of it")
	}
	if err := r.InstallSnapshot(ctx, img); !errors.Is(err, vfs.ErrVersion) {
		t.Fatalf("an older snapshot: %v, want ErrVersion", err)
	}
	db := openDB(t, path)
	integrityOK(t, db)
	db.Close()
	// The install survives a reopen (its journal record vouches for it).
	r.Close()
	r2, err := vfs.OpenReplica(path, vfs.Normal)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if r2.Version() != a.Version() || r2.Checksum() != a.Checksum() {
		t.Fatalf("after reopen: %d/%016x, server %d/%016x", r2.Version(), r2.Checksum(), a.Version(), a.Checksum())
	}
}

// TestInstallSnapshotTornIsDiverged: a crash in the middle of the copy
// leaves a main file its journal record does not vouch for: the next open
// refuses it rather than serving it.
func TestInstallSnapshotTornIsDiverged(t *testing.T) {
	ctx := context.Background()
	a := newAuthority(t)
	serverExec(t, a, "INSERT INTO other SELECT randomblob(1000) FROM generate_series(1, 1500)")
	snap, err := a.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img, _ := image(t, snap)
	r, path := openReplica(t)
	// Fail the copy after its first chunk, as a crash would stop it.
	reads := int(img.Pages+255) / 256               // chunks of the checksum pass
	img.Src = &failAfter{r: img.Src, ok: reads + 1} // and one chunk of the copy
	if err := r.InstallSnapshot(ctx, img); err == nil {
		t.Fatal("the failing copy did not fail")
	}
	r.Close()
	if _, err := vfs.OpenReplica(path, vfs.Normal); !errors.Is(err, vfs.ErrDiverged) {
		t.Fatalf("open after a torn install: %v, want ErrDiverged", err)
	}
}

// failAfter fails every ReadAt after ok calls.
type failAfter struct {
	r interface {
		ReadAt([]byte, int64) (int, error)
	}
	ok, n int
}

func (f *failAfter) ReadAt(b []byte, off int64) (int, error) {
	f.n++
	if f.n > f.ok {
		return 0, errors.New("crash")
	}
	return f.r.ReadAt(b, off)
}
