package replica

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// The disk fills part-way through a rebase (after the journal, on the
// first page of the main file). The replica is poisoned: reads and Mutate
// fail with vfs.ErrPoisoned, saying "no space left on device", and never
// show the torn file. Once space returns, the next Mutate repairs it
// without a restart, and nothing is lost. On the old main the rebase let
// readers back onto the torn file, and every later rebase failed with
// "vfs: checksum mismatch" until a reopen.
func TestDiskFullDuringRebaseRepairs(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	f := vfs.NewFaults(1)
	r, err := Open(ctx, filepath.Join(t.TempDir(), "r.db"), Options{Mutators: reg, fileFaults: f})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	catchUp(t, a, r)
	other := openReplica(t, filepath.Join(t.TempDir(), "other.db"), reg)
	catchUp(t, a, other)
	if _, err := other.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Rent", 5)); err != nil {
		t.Fatal(err)
	}
	ps := push(t, a, other)
	for i := 0; i < 3; i++ {
		if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
			t.Fatal(err)
		}
	}
	f.FailAt(2, vfs.OpWrite, true) // the journal is written, then the disk is full
	err = r.Rebase(ctx, ps)
	if !errors.Is(err, vfs.ErrPoisoned) || !vfs.IsDiskFull(err) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("rebase on a full disk: %v", err)
	}
	var n int
	err = r.DB().QueryRowContext(ctx, "SELECT count FROM Categories WHERE name='Food'").Scan(&n)
	if !errors.Is(err, vfs.ErrPoisoned) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("read on a poisoned replica: %v (Food=%d)", err, n)
	}
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); !errors.Is(err, vfs.ErrPoisoned) {
		t.Fatalf("Mutate while the disk is still full: %v", err)
	}
	if st := r.Status(); st.Pending != 3 {
		t.Fatalf("pending %d, want 3", st.Pending)
	}
	f.Clear() // space returns
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatalf("Mutate once space returns: %v", err)
	}
	got := categories(t, r.DB())
	if got["Food"] != 4 || got["Rent"] != 5 {
		t.Fatalf("after repair: %v, want Food 4 (pending) and Rent 5 (the server's)", got)
	}
	if st := r.Status(); st.Version != a.Version() || st.Checksum != a.Checksum() || st.Pending != 4 {
		t.Fatalf("after repair: %+v, server at %d/%016x", st, a.Version(), a.Checksum())
	}
	push(t, a, r)
	catchUp(t, a, r)
	if got := categories(t, r.DB()); got["Food"] != 4 || r.Status().Pending != 0 || r.Status().Checksum != a.Checksum() {
		t.Fatalf("after sync: %v %+v", got, r.Status())
	}
}

// The same with the sync loop: the disk fills while the replica receives
// versions; it is poisoned, reads fail clearly, and once space returns the
// loop repairs it by itself and it converges with exact counts.
func TestDiskFullSyncLoopRepairs(t *testing.T) {
	ctx := waitCtx(t, 60*time.Second)
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	f := vfs.NewFaults(2)
	r, err := Open(ctx, filepath.Join(t.TempDir(), "r.db"), Options{Mutators: reg, Remote: ts.remote(), Logger: quietLog, fileFaults: f})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	o := openSynced(t, filepath.Join(t.TempDir(), "o.db"), reg, ts.remote())
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r, o)
	f.FailAt(2, vfs.OpWrite, true)
	for i := 0; i < 5; i++ {
		if _, err := o.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 10)); err != nil {
			t.Fatal(err)
		}
	}
	for r.files.Poisoned() == nil {
		select {
		case <-ctx.Done():
			t.Fatalf("the replica was never poisoned (faults fired %d)", f.Fired())
		case <-time.After(5 * time.Millisecond):
		}
	}
	var n int
	err = r.DB().QueryRowContext(ctx, "SELECT count FROM Categories WHERE name='Food'").Scan(&n)
	if !errors.Is(err, vfs.ErrPoisoned) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("read on a poisoned replica: %v (Food=%d)", err, n)
	}
	time.Sleep(300 * time.Millisecond) // the loop tries to repair, and fails
	if r.files.Poisoned() == nil {
		t.Fatal("repaired while the disk was still full")
	}
	f.Clear()
	if _, err := o.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 100)); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r, o)
	for _, x := range []*Replica{r, o} {
		if got := categories(t, x.DB()); got["Food"] != 151 {
			t.Fatalf("%s: Food %d, want 151", x.ClientID(), got["Food"])
		}
	}
}

// The disk fills part-way through copying a snapshot that arrived: the
// replica is poisoned, and the snapshot's file is kept, so that once space
// returns Repair copies it again (on the old main the session removed it
// at once, and the file stayed torn until a restart).
func TestDiskFullDuringSnapshotInstallRepairs(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	other := openReplica(t, filepath.Join(t.TempDir(), "other.db"), reg)
	catchUp(t, a, other)
	for i := 0; i < 3; i++ {
		if _, err := other.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Rent", 5)); err != nil {
			t.Fatal(err)
		}
	}
	push(t, a, other)
	f := vfs.NewFaults(4)
	r, err := Open(ctx, filepath.Join(t.TempDir(), "r.db"), Options{Mutators: reg, fileFaults: f})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	snap, err := a.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	file, err := os.Create(filepath.Join(t.TempDir(), "snapshot"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range snap.Pages {
		if _, err := file.Write(p.Data); err != nil {
			t.Fatal(err)
		}
	}
	buf := &snapBuffer{first: protocol.SnapshotChunk{Version: snap.Version, PageSize: snap.PageSize, DBSize: snap.DBSize, Checksum: snap.PostChecksum}, f: file}
	f.FailAt(2, vfs.OpWrite, true)
	ss := &session{r: r, ready: buf}
	if err := ss.rebase(ctx); !errors.Is(err, vfs.ErrPoisoned) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("install on a full disk: %v", err)
	}
	if _, err := r.DB().ExecContext(ctx, "SELECT 1"); !errors.Is(err, vfs.ErrPoisoned) {
		t.Fatalf("read on a poisoned replica: %v", err)
	}
	if err := r.Repair(ctx); !errors.Is(err, vfs.ErrPoisoned) {
		t.Fatalf("repair while the disk is full: %v", err)
	}
	f.Clear()
	if err := r.Repair(ctx); err != nil {
		t.Fatalf("repair once space returns: %v", err)
	}
	if st := r.Status(); st.Version != a.Version() || st.Checksum != a.Checksum() {
		t.Fatalf("after repair: %+v, server at %d/%016x", st, a.Version(), a.Checksum())
	}
	if got := categories(t, r.DB()); got["Rent"] != 15 {
		t.Fatalf("after repair: %v, want Rent 15", got)
	}
	if _, err := os.Stat(file.Name()); !os.IsNotExist(err) {
		t.Fatalf("the snapshot file outlived the repair: %v", err)
	}
}
