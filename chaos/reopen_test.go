package chaos

import (
	"context"
	"database/sql"
	"errors"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// TestReopenSettlesWhatAPoisonedApplyLeft replays, at its exact point, what
// TestChaos seed 4057605303640594230 met on replica 0 (random I/O errors):
// a version that acknowledges pending mutations is journaled, the write of
// its pages into the main file fails, the replica is poisoned, and it is
// closed before a repair settles them. Their handles end with ErrClosed;
// the next Open repairs from the journal, which completes the apply, and
// settles them (replica.TestAckInPoisonedApplySettlesAtReopen holds the
// replica to that). The harness took such a mutation for lost ("unsettled
// at Close, yet is not pending after reopen"); it must find it in the
// confirmed state instead, with the server's outcome, and count it once.
func TestReopenSettlesWhatAPoisonedApplyLeft(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	c := &cluster{t: t, reg: registry(t), dir: dir, log: quietLogger(),
		remote: func(*worker) *replica.Remote { return nil }} // no sync loop: the test delivers the versions
	a, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), c.reg, func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec(mutators.DemoSchema)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	w := &worker{c: c, i: 0, path: filepath.Join(dir, "r0.db"), faults: vfs.NewFaults(1)}
	c.reps = []*worker{w}
	w.open(ctx)
	defer w.close()
	catchUp := func() error {
		sets, err := a.Since(w.r.Status().Version)
		if err != nil {
			t.Fatal(err)
		}
		return w.r.Rebase(ctx, sets...)
	}
	push := func() {
		var batch []server.Mutation
		for _, m := range w.r.Pending() {
			batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
		}
		if _, _, err := a.Push(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	if err := catchUp(); err != nil {
		t.Fatal(err)
	}
	// The capped counter takes capLimit; the next one is rejected.
	for range capLimit + 1 {
		w.mutate(ctx, toCapped)
	}
	w.mutate(ctx, own)
	push()             // acknowledges all of them
	w.mutate(ctx, own) // never pushed: pending through the reopen
	if t.Failed() {
		t.FailNow()
	}

	w.faults.FailAt(2, vfs.OpWrite, false) // the journal is written, then a page write fails
	if err := catchUp(); !errors.Is(err, vfs.ErrPoisoned) {
		t.Fatalf("rebase with its main-file write failing: %v, want vfs.ErrPoisoned", err)
	}
	w.faults.Clear()
	w.close()
	w.open(ctx) // settles the acknowledged ones; the harness must not call them lost
	if got := w.r.Status().Pending; got != 1 {
		t.Fatalf("pending after reopen %d, want 1 (the one never pushed)", got)
	}
	atOpen := 0
	for _, m := range w.recs {
		if m.atOpen {
			atOpen++
		}
	}
	if atOpen != capLimit+2 {
		t.Fatalf("%d mutations settled at the reopen, want %d", atOpen, capLimit+2)
	}

	push()
	if err := catchUp(); err != nil {
		t.Fatal(err)
	}
	want := c.settled(ctx) // every outcome as the server decided, each once
	if got, w := format(want), format(map[string]int64{"r0": 2, capRow: capLimit}); got != w {
		t.Fatalf("settled rows %s, want %s", got, w)
	}
	if got := rows(t, "server", func(q string) (*sql.Rows, error) { return a.Query(ctx, q) }); got != format(want) {
		t.Fatalf("server rows %s, want %s", got, format(want))
	}
}
