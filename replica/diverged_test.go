package replica

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// TestDivergedRepairedFromServer: a replica whose main file was corrupted
// while closed (a torn write after a power failure) is never served. Without
// a server it refuses to open; with one, it sets the bad file aside,
// re-syncs from the server, keeps its pending mutations, and converges.
func TestDivergedRepairedFromServer(t *testing.T) {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	path := filepath.Join(t.TempDir(), "r.db")
	r := openSynced(t, path, reg, ts.remote())
	ctx := waitCtx(t, time.Minute)
	for i := 0; i < 20; i++ {
		if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1)); err != nil {
			t.Fatal(err)
		}
	}
	converged(t, ts, r)
	// Offline: one more mutation pending, then the replica closes.
	ts.srv.Close()
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 100)); err != nil {
		t.Fatal(err)
	}
	r.Close()

	// Corrupt every page of the main file: the journal re-applies the
	// pages of the last version, and cannot vouch for the others.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for off := 200; off < len(b); off += 4096 {
		b[off] ^= 0xff
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), path, Options{Mutators: reg, Logger: quietLog}); !errors.Is(err, vfs.ErrDiverged) {
		t.Fatalf("offline open of a corrupt replica: %v, want ErrDiverged", err)
	}

	ts.restart()
	r2 := openSynced(t, path, reg, ts.remote())
	if st := r2.Status(); st.Pending != 1 {
		t.Fatalf("after repair: %d pending, want the 1 made offline", st.Pending)
	}
	converged(t, ts, r2)
	var food int
	if err := r2.DB().QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&food); err != nil || food != 120 {
		t.Fatalf("Food = %d, %v; want 120", food, err)
	}
	if aside, _ := filepath.Glob(path + ".diverged-*"); len(aside) == 0 {
		t.Fatal("the diverged file was not kept aside")
	}
}
