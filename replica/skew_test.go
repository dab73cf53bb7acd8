package replica

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// TestSyncUpgradeRequired: a build older than the server's MinAppVersion
// stops with ErrUpgradeRequired (WaitConnected, Sync and the Handle say
// so); its mutation stays queued, and the upgraded build, opening the same
// files, pushes it.
func TestSyncUpgradeRequired(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) { c.MinAppVersion = 2 })
	path := filepath.Join(t.TempDir(), "r.db")
	ctx := waitCtx(t, 30*time.Second)
	old, err := Open(ctx, path, Options{Mutators: reg, Remote: ts.remote(), Logger: quietLog, AppVersion: 1})
	if err != nil {
		t.Fatal(err)
	}
	h := mustMutate(t, old, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	if err := old.WaitConnected(ctx); !errors.Is(err, ErrUpgradeRequired) || !strings.Contains(err.Error(), "upgrade") {
		t.Fatalf("WaitConnected: %v, want ErrUpgradeRequired", err)
	}
	if err := old.Sync(ctx); !errors.Is(err, ErrUpgradeRequired) {
		t.Fatalf("Sync: %v", err)
	}
	if err := h.Wait(ctx); !errors.Is(err, ErrUpgradeRequired) {
		t.Fatalf("Handle.Wait: %v", err)
	}
	if st := old.Status(); st.Pending != 1 {
		t.Fatalf("pending %d, want the mutation kept", st.Pending)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := Open(ctx, path, Options{Mutators: reg, Remote: ts.remote(), Logger: quietLog, AppVersion: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	converged(t, ts, r)
	if got := categories(t, r.DB()); got["Food"] != 1 {
		t.Fatalf("after the upgrade: %v", got)
	}
}

// TestSyncRemovedMutator: a mutation of a mutator the server no longer
// has (removed in a migration's contract step) is rejected, once, with
// the server's "unknown mutator"; it is not retried and the mutations
// after it are applied.
func TestSyncRemovedMutator(t *testing.T) {
	creg, sreg := testRegistry(t), testRegistry(t)
	creg.MustRegister("retired", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES('Retired', 1)`)
		return err
	})
	ts := startServer(t, sreg, "", "127.0.0.1:0", nil)
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), creg, ts.remote())
	ctx := waitCtx(t, 30*time.Second)
	h1 := mustMutate(t, r, "retired", json.RawMessage(`null`))
	h2 := mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	var rej *RejectedError
	if err := h1.Wait(ctx); !errors.As(err, &rej) || !strings.Contains(rej.Message, "unknown mutator") {
		t.Fatalf("removed mutator: %v", err)
	}
	if err := h2.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r)
	if got := categories(t, r.DB()); got["Retired"] != 0 || got["Food"] != 1 {
		t.Fatalf("after the rejection: %v", got)
	}
}

// TestSyncClientCollected: the server collects the records of a client
// away longer than its ClientTTL (injected clock). The client, coming back
// with a pending mutation, stops with ErrClientCollected instead of
// pushing it under ids the server would take as new; the mutation stays
// queued. On today's main it would loop on "mutation id gap" forever.
func TestSyncClientCollected(t *testing.T) {
	reg := testRegistry(t)
	var now atomic.Int64
	now.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) { c.ClientTTL = 30 * 24 * time.Hour; c.Now = clock })
	path := filepath.Join(t.TempDir(), "away.db")
	away := openSynced(t, path, reg, ts.remote())
	mustMutate(t, away, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, away)
	if err := away.Close(); err != nil {
		t.Fatal(err)
	}
	now.Add(int64(31 * 24 * time.Hour))
	other := openSynced(t, filepath.Join(t.TempDir(), "other.db"), reg, ts.remote())
	mustMutate(t, other, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, other)

	ctx := waitCtx(t, 30*time.Second)
	back := openSynced(t, path, reg, ts.remote())
	h := mustMutate(t, back, mutators.CreateCategoryOrIncrementIfExists, incr("Late", 1))
	if err := back.WaitConnected(ctx); !errors.Is(err, ErrClientCollected) {
		t.Fatalf("WaitConnected: %v, want ErrClientCollected", err)
	}
	if err := h.Wait(ctx); !errors.Is(err, ErrClientCollected) {
		t.Fatalf("Handle.Wait: %v", err)
	}
	if st := back.Status(); st.Pending != 1 {
		t.Fatalf("pending %d, want the mutation kept", st.Pending)
	}
}
