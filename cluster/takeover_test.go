package cluster

import (
	"errors"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/server"
)

var _ server.Takeover = (*Owner)(nil)

// TestTakeoverFencesAPausedOwner: owner A is paused (its lease renewals
// stop, as in a stopped process) while it still holds a working Appender.
// Its lease runs out; node B takes the database over and, before it serves
// anything or takes a push, appends its takeover version. A's Appender
// still expected the old tail until then, so B's takeover version alone is
// what refuses A's next append: ErrFenced, and nothing of A's reaches the
// stream.
func TestTakeoverFencesAPausedOwner(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, MinLeaseTTL)
	l, snaps, ls := sh.log, sh.snaps, sh.leases
	oA := NewOwner(l, ls, snaps, "a", quiet)
	defer oA.Close(ctx)
	srvA := serverAt(t, t.TempDir(), oA)
	aA := srvA.Authority("demo.db")
	if aA == nil {
		t.Fatal("A did not open the database")
	}
	for id := uint64(1); id <= 2; id++ {
		if _, _, err := aA.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	oA.mu.Lock()
	wA := oA.dbs["demo.db"]
	oA.mu.Unlock()
	// Pause A: a renewal waits for the lease's write lock, which a stopped
	// process would never get to.
	wA.lease.writeMu.Lock()
	paused := true
	defer func() {
		if paused {
			wA.lease.writeMu.Unlock()
		}
	}()
	for {
		who, _, err := ls.Holder(ctx, "demo.db")
		if err == nil && who == "" {
			break // A's lease ran out in the bucket
		}
		if ctx.Err() != nil {
			t.Fatalf("A's lease never ran out: held by %q, %v", who, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	last, err := l.Last(ctx, "demo.db")
	if err != nil {
		t.Fatal(err)
	}
	if seq, _ := wA.ap.Last(); seq != last.Seq || wA.ap.Err() != nil {
		t.Fatalf("paused A's Appender expects seq %d (err %v), the tail is %d: it should still be able to append", seq, wA.ap.Err(), last.Seq)
	}

	oB := NewOwner(l, ls, snaps, "b", quiet)
	defer oB.Close(ctx)
	srvB := serverAt(t, t.TempDir(), oB)
	var bv, bsum uint64
	if err := srvB.WithAuthority(ctx, "demo.db", func(a *server.Authority) error {
		bv, bsum = a.Version(), a.Checksum()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// No push reached B, yet the stream's tail is its takeover version.
	tookOverAt(t, ctx, l, bv, bsum, tv, tsum)
	if who := tailOwner(t, ctx, l); who != oB.Token() {
		t.Fatalf("the stream's tail is by %q, want B's %q", who, oB.Token())
	}

	// A resumes inside an append, past its lease check, as a process
	// paused there would: the fence refuses it.
	if _, err := wA.ap.Append(ctx, tv+1, []byte("paused A's version")); !errors.Is(err, ErrFenced) {
		t.Fatalf("paused A's append after B's takeover: %v, want ErrFenced", err)
	}
	wA.lease.writeMu.Unlock()
	paused = false
	// And A's server acknowledges nothing more.
	if _, _, err := aA.Push(ctx, inc("alice", 3)); err == nil {
		t.Fatal("A's server took a push after B took the database over")
	}
	if v, sum := tailChecksum(t, ctx, l, "demo.db"); v != bv || sum != bsum || tailOwner(t, ctx, l) != oB.Token() {
		t.Fatalf("the stream moved to %d, %016x by %q after B's takeover; want B's %d, %016x", v, sum, tailOwner(t, ctx, l), bv, bsum)
	}
}
