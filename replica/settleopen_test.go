package replica

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// A version that acknowledges pending mutations arrives, and a write of its
// rebase fails (each write, sync and truncate in turn). Once the journal
// has it, the replica is poisoned and the mutations stay unsettled in this
// life: Close ends their handles with ErrClosed. The next Open repairs from
// the journal, which completes the apply, and settles them there, where no
// handle of the app can hear of it. Each such mutation must then be either
// pending again or settled in the confirmed state with the server's
// outcome; never neither (lost), never both, and every one counts exactly
// once. TestChaos seed 4057605303640594230 reached this point (replica 0,
// random I/O errors: version 18 journaled, its main-file write failed,
// Close, Open settled mutation 5) and its harness took the mutation for
// lost; chaos.TestReopenSettlesWhatAPoisonedApplyLeft replays that.
func TestAckInPoisonedApplySettlesAtReopen(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	for n := 1; ; n++ {
		a := newAuthority(t, reg)
		f := vfs.NewFaults(uint64(n))
		path := filepath.Join(t.TempDir(), "r.db")
		r, err := Open(ctx, path, Options{Mutators: reg, Logger: quietLog, fileFaults: f})
		if err != nil {
			t.Fatal(err)
		}
		catchUp(t, a, r)
		applied, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
		if err != nil {
			t.Fatal(err)
		}
		rejected, err := r.Mutate(ctx, "fail", []byte(`"no"`))
		if err != nil {
			t.Fatal(err)
		}
		ps := push(t, a, r) // acknowledges both, rejects the second
		later, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
		if err != nil {
			t.Fatal(err)
		}

		f.FailAt(n, vfs.OpAll, false)
		rerr := r.Rebase(ctx, ps)
		if f.Fired() == 0 {
			// n is past the rebase's last write: every point was tried.
			if rerr != nil {
				t.Fatalf("rebase with no fault: %v", rerr)
			}
			if n < 3 {
				t.Fatalf("only %d write points in a rebase", n-1)
			}
			return
		}
		f.Clear()
		type want struct {
			h   *Handle
			err error // the server's outcome
		}
		wants := []want{{applied, nil}, {rejected, &RejectedError{}}}
		var unsettled []want
		for _, w := range wants {
			select {
			case <-w.h.Done():
			default:
				unsettled = append(unsettled, w)
			}
		}
		if err := r.Close(); err != nil && !errors.Is(err, vfs.ErrPoisoned) && !errors.Is(err, vfs.ErrInjected) {
			t.Fatalf("point %d: close: %v", n, err)
		}
		for _, w := range unsettled {
			if err := w.h.Wait(ctx); !errors.Is(err, ErrClosed) {
				t.Fatalf("point %d: mutation %d unsettled at Close: Wait %v, want ErrClosed", n, w.h.ID, err)
			}
		}

		r, err = Open(ctx, path, Options{Mutators: reg, Logger: quietLog})
		if err != nil {
			t.Fatalf("point %d (rebase: %v): reopen: %v", n, rerr, err)
		}
		lmid, err := mutators.LastMutationID(ctx, r.DB(), r.ClientID())
		if err != nil {
			t.Fatal(err)
		}
		rejections, err := mutators.Rejections(ctx, r.DB(), r.ClientID(), 0, lmid)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range unsettled {
			id := w.h.ID
			pending := r.Handle(id) != nil
			settled := id <= lmid
			// The app asks what became of the mutation whose handle said
			// ErrClosed: pending again, or the server's outcome.
			var rej *RejectedError
			switch err := r.Outcome(ctx, id); {
			case pending && !errors.Is(err, ErrPending):
				t.Fatalf("point %d: Outcome of pending mutation %d: %v, want ErrPending", n, id, err)
			case !pending && w.err == nil && err != nil:
				t.Fatalf("point %d: Outcome of applied mutation %d: %v, want nil", n, id, err)
			case !pending && w.err != nil && (!errors.As(err, &rej) || rej.ID != id || rej.Name != "fail" || !strings.HasSuffix(rej.Message, "no")):
				t.Fatalf("point %d: Outcome of rejected mutation %d: %v, want its RejectedError", n, id, err)
			}
			switch {
			case pending && settled:
				t.Fatalf("point %d: mutation %d is pending and settled (last mutation id %d)", n, id, lmid)
			case !pending && !settled:
				t.Fatalf("point %d (rebase: %v): mutation %d unsettled at Close is neither pending nor settled after reopen (last mutation id %d): lost", n, rerr, id, lmid)
			case settled:
				if _, rej := rejections[id]; rej != (w.err != nil) {
					t.Fatalf("point %d: mutation %d settled at reopen: rejected %v, want %v (%v)", n, id, rej, w.err != nil, rejections)
				}
			}
		}
		if r.Handle(later.ID) == nil {
			t.Fatalf("point %d: mutation %d, never pushed, is not pending after reopen", n, later.ID)
		}
		push(t, a, r)
		catchUp(t, a, r)
		st := r.Status()
		if got := categories(t, r.DB()); got["Food"] != 2 || st.Pending != 0 || st.Checksum != a.Checksum() {
			t.Fatalf("point %d: after sync Food %d (want 2: each once), %+v, server checksum %016x", n, got["Food"], st, a.Checksum())
		}
		r.Close()
	}
}
