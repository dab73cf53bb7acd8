package replica

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
)

func TestMutateRebaseConfirm(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	if st := r.Status(); st.Version != 1 || st.Checksum != a.Checksum() {
		t.Fatalf("after catch-up: %+v, server checksum %x", st, a.Checksum())
	}
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 2))
	if err != nil || h.LocalErr() != nil {
		t.Fatal(err, h.LocalErr())
	}
	if got := categories(t, r.DB()); got["Food"] != 2 {
		t.Fatalf("optimistic state %v", got)
	}
	ps := push(t, a, r)
	if err := r.Rebase(ctx, ps); err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatalf("wait: %v", err)
	}
	if st := r.Status(); st.Pending != 0 || st.Checksum != a.Checksum() || st.Version != a.Version() {
		t.Fatalf("status %+v, server v%d %x", st, a.Version(), a.Checksum())
	}
	if got := categories(t, r.DB()); got["Food"] != 2 {
		t.Fatalf("confirmed state %v", got)
	}
}

func TestRejectedMutationDisappears(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	h1, _ := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	h2, err := r.Mutate(ctx, "fail", []byte(`"no way"`))
	if err != nil {
		t.Fatal(err)
	}
	if h2.LocalErr() == nil {
		t.Fatal("local run of fail succeeded")
	}
	h3, _ := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err := r.Rebase(ctx, push(t, a, r)); err != nil {
		t.Fatal(err)
	}
	if err := h1.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	var rej *RejectedError
	if err := h2.Wait(ctx); !errors.As(err, &rej) || rej.Message == "" {
		t.Fatalf("h2: %v", err)
	}
	if err := h3.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if got := categories(t, r.DB()); got["Food"] != 2 {
		t.Fatalf("state %v", got)
	}
}

func TestOnChangeAfterMutateAndRebase(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	var got []Change
	cancel := r.OnChange(func(c Change) { got = append(got, c) })
	catchUp(t, a, r)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err := r.Rebase(ctx, push(t, a, r)); err != nil {
		t.Fatal(err)
	}
	want := []Change{{Version: 1, Rebased: true}, {Version: 1, Pending: 1}, {Version: 2, Rebased: true}}
	if len(got) != len(want) {
		t.Fatalf("changes %+v, want %+v", got, want)
	}
	for i := range want {
		if g := got[i]; g.Version != want[i].Version || g.Pending != want[i].Pending || g.Rebased != want[i].Rebased {
			t.Fatalf("change %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	cancel()
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if len(got) != len(want) {
		t.Fatal("a cancelled watcher was called")
	}
}

// TestOnChangeMayCallBack: a watcher runs after the replica let go of its
// locks, so it may call Status and even Mutate from inside the callback.
func TestOnChangeMayCallBack(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	ctx := context.Background()
	seen := make(chan Status, 8)
	var once sync.Once
	r.OnChange(func(c Change) {
		if !c.Rebased {
			return
		}
		seen <- r.Status()
		once.Do(func() {
			if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("from-watcher", 1)); err != nil {
				t.Error(err)
			}
		})
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		catchUp(t, a, r)
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("a watcher calling Status and Mutate deadlocked the rebase")
	}
	st := <-seen
	if st.Version != a.Version() {
		t.Fatalf("watcher saw version %d, want %d", st.Version, a.Version())
	}
	if r.Status().Pending != 1 {
		t.Fatalf("the watcher's mutation is not pending: %+v", r.Status())
	}
}

// TestOutcome: Outcome answers from the replicated state what became of
// each mutation, before and after a reopen, when no handle is left.
func TestOutcome(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	path := filepath.Join(t.TempDir(), "r.db")
	r, err := Open(ctx, path, Options{Mutators: reg, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Outcome(ctx, 1); !errors.Is(err, ErrUnknownMutation) {
		t.Fatalf("Outcome of a mutation never issued: %v", err)
	}
	catchUp(t, a, r)
	applied, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	rejected, err := r.Mutate(ctx, "fail", []byte(`"no way"`))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Outcome(ctx, applied.ID); !errors.Is(err, ErrPending) {
		t.Fatalf("Outcome of a pending mutation: %v, want ErrPending", err)
	}
	if err := r.Rebase(ctx, push(t, a, r)); err != nil {
		t.Fatal(err)
	}
	later, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		if err := r.Outcome(ctx, applied.ID); err != nil {
			t.Fatalf("%s: Outcome of an applied mutation: %v", when, err)
		}
		var rej *RejectedError
		if err := r.Outcome(ctx, rejected.ID); !errors.As(err, &rej) || rej.ID != rejected.ID || rej.Name != "fail" || !strings.HasSuffix(rej.Message, "no way") {
			t.Fatalf("%s: Outcome of a rejected mutation: %v", when, err)
		}
		if err := r.Outcome(ctx, later.ID); !errors.Is(err, ErrPending) {
			t.Fatalf("%s: Outcome of a mutation never pushed: %v, want ErrPending", when, err)
		}
		if err := r.Outcome(ctx, later.ID+1); !errors.Is(err, ErrUnknownMutation) {
			t.Fatalf("%s: Outcome of an id not issued: %v", when, err)
		}
	}
	check("open")
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if r, err = Open(ctx, path, Options{Mutators: reg, Logger: quietLog}); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	check("after reopen")
}
