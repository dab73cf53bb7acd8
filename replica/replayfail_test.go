package replica

import (
	"context"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// A replay whose COMMIT fails (twice: it is retried once) must not leave
// DB() showing the server's state without the pending mutations: reads fail
// with ErrPendingHidden until a repair, which the next Mutate makes; then
// everything pending is visible again, once. On the old main the rebase
// returned the error and DB() quietly showed the state without them.
func TestReplayFailureDoesNotHidePending(t *testing.T) {
	for _, npending := range []int{1, 3} {
		t.Run(map[int]string{1: "one", 3: "several"}[npending], func(t *testing.T) {
			ctx := context.Background()
			reg := testRegistry(t)
			a := newAuthority(t, reg)
			var failing atomic.Bool
			injected := errors.New("injected: input/output error")
			r, err := Open(ctx, filepath.Join(t.TempDir(), "r.db"), Options{Mutators: reg, failHook: func(point string) error {
				if point == "commit" && failing.Load() {
					return injected
				}
				return nil
			}})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			catchUp(t, a, r)
			// A server version from another client to rebase on.
			other := openReplica(t, filepath.Join(t.TempDir(), "other.db"), reg)
			catchUp(t, a, other)
			if _, err := other.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Rent", 5)); err != nil {
				t.Fatal(err)
			}
			ps := push(t, a, other)
			for i := 0; i < npending; i++ {
				if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
					t.Fatal(err)
				}
			}
			failing.Store(true)
			if err := r.Rebase(ctx, ps); !errors.Is(err, injected) {
				t.Fatalf("rebase: %v, want the injected failure", err)
			}
			var n int
			err = r.DB().QueryRowContext(ctx, "SELECT count FROM Categories WHERE name='Food'").Scan(&n)
			if !errors.Is(err, ErrPendingHidden) {
				t.Fatalf("read after a failed replay: %v (Food=%d), want ErrPendingHidden", err, n)
			}
			if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); !errors.Is(err, ErrPendingHidden) {
				t.Fatalf("Mutate while the repair still fails: %v, want ErrPendingHidden", err)
			}
			if got := r.Status().Pending; got != npending {
				t.Fatalf("pending %d, want %d (nothing queued by the refused Mutate)", got, npending)
			}
			failing.Store(false)
			if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
				t.Fatalf("Mutate after the fault cleared: %v", err)
			}
			if got := categories(t, r.DB()); got["Food"] != int64(npending+1) || got["Rent"] != 5 {
				t.Fatalf("after repair DB() shows %v, want Food %d and Rent 5", got, npending+1)
			}
		})
	}
}
