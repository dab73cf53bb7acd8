package replica

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

func TestRebaseDueDrain(t *testing.T) {
	cases := []struct {
		name string
		s    rebaseState
		want bool
	}{
		{"nothing collected", rebaseState{Pending: 1000}, false},
		{"small replay: at once", rebaseState{Collected: 1, Pending: drainMinReplay}, true},
		{"backlog, few acks: defer", rebaseState{Collected: 1, Pending: 1000, Acked: 100}, false},
		{"backlog, acks reach half the replay", rebaseState{Collected: 1, Pending: 1000, Acked: 334}, true},
		{"backlog, deferred too long", rebaseState{Collected: 1, Pending: 1000, SinceRebase: time.Second}, true},
		{"backlog, batch full", rebaseState{Collected: maxRebaseBatch, Pending: 1000, MoreWaiting: true}, true},
		{"all acked", rebaseState{Collected: 1, Pending: 1000, Acked: 1000}, true},
		{"acks beyond the queue", rebaseState{Collected: 1, Pending: 10, Acked: 50}, true},
		{"partial snapshot", rebaseState{Collected: 1, SnapshotPartial: true, SinceRebase: time.Hour}, false},
	}
	for _, c := range cases {
		if got := rebaseDue(c.s, time.Second); got != c.want {
			t.Errorf("%s: rebaseDue(%+v) = %v, want %v", c.name, c.s, got, c.want)
		}
	}
}

// Draining a backlog of P mutations, acknowledged in batches of any size
// with a version each, replays O(P) in total: at most 2P plus
// drainMinReplay for each of the few rebases at the tail. (Rebasing on
// every version, as before, replays about P^2/(2*batch).)
func TestRebaseDueDrainIsLinear(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := rapid.Uint64Range(0, 20000).Draw(t, "P")
		pending, acked, replayed, rebases, tail := p, uint64(0), uint64(0), 0, 0
		collected := 0
		for pending > 0 {
			b := rapid.Uint64Range(1, 600).Draw(t, "batch")
			acked = min(acked+b, pending)
			collected++
			s := rebaseState{Collected: collected, Pending: pending, Acked: acked}
			if rebaseDue(s, time.Hour) {
				replay := pending - acked
				replayed += replay
				if replay <= drainMinReplay {
					tail++
				}
				pending, acked, collected = replay, 0, 0
				rebases++
			}
			if collected > maxRebaseBatch {
				t.Fatalf("collected %d versions without a rebase", collected)
			}
		}
		if limit := 2*p + uint64(drainMinReplay*tail); replayed > limit {
			t.Fatalf("P=%d: replayed %d in %d rebases (%d at the tail), over %d", p, replayed, rebases, tail, limit)
		}
		if tail > drainMinReplay+1 {
			t.Fatalf("%d tail rebases", tail)
		}
	})
}

// rebaseDue never applies a half snapshot or nothing, always applies a full
// batch, and never defers a cheap replay or past its bound.
func FuzzRebaseDue(f *testing.F) {
	f.Add(1, false, false, uint64(1000), uint64(10), int64(0))
	f.Add(maxRebaseBatch, false, true, uint64(5), uint64(0), int64(time.Hour))
	f.Fuzz(func(t *testing.T, collected int, partial, more bool, pending, acked uint64, since int64) {
		s := rebaseState{Collected: collected, SnapshotPartial: partial, MoreWaiting: more, Pending: pending, Acked: acked, SinceRebase: time.Duration(since)}
		got := rebaseDue(s, time.Second)
		switch {
		case collected <= 0 || partial:
			if got && (collected == 0 || partial) {
				t.Fatalf("due with nothing to apply: %+v", s)
			}
		case collected >= maxRebaseBatch:
			if !got {
				t.Fatalf("full batch not due: %+v", s)
			}
		case !more && (pending-min(acked, pending) <= drainMinReplay || s.SinceRebase >= time.Second):
			if !got {
				t.Fatalf("deferred a cheap or overdue rebase: %+v", s)
			}
		}
	})
}

// A replica that made P mutations offline drains them through the sync
// loop with O(P) replays in all, counted (not timed).
func TestDrainBacklogReplaysLinear(t *testing.T) {
	p := 5000
	if testing.Short() {
		p = 1500
	}
	drained := drainBacklog(t, p)
	t.Logf("P=%d: draining replayed %d mutations (%.2f per mutation)", p, drained, float64(drained)/float64(p))
	// rebaseDue's bound: 2P, plus drainMinReplay per tail rebase (at most
	// drainMinReplay+1 of them). Rebasing on every version replayed 25P here.
	if limit := uint64(2*p + drainMinReplay*(drainMinReplay+1)); drained > limit {
		t.Fatalf("draining %d mutations replayed %d, more than %d", p, drained, limit)
	}
}

// BenchmarkDrainBacklog drains 2,000 offline mutations per op and reports
// the replays that cost.
func BenchmarkDrainBacklog(b *testing.B) {
	const p = 2000
	var replays uint64
	for b.Loop() {
		replays += drainBacklog(b, p)
	}
	b.ReportMetric(float64(replays)/float64(b.N)/p, "replays/mutation")
}

// drainBacklog makes p mutations offline, then opens the replica against a
// server and returns how many mutations it replayed until in sync (the
// replay at Open not counted).
func drainBacklog(t testing.TB, p int) uint64 {
	reg := testRegistry(t)
	// A small push window, so that the backlog comes back as many
	// versions, each acknowledging a little.
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) { c.MaxInFlight = 100 })
	path := filepath.Join(t.TempDir(), "r.db")
	off, err := Open(context.Background(), path, Options{Mutators: reg, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range p {
		if _, err := off.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr("Food", i%3+1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := off.Close(); err != nil {
		t.Fatal(err)
	}
	// The deferral bound set long, so that the count does not depend on
	// how fast this machine drains.
	r, err := Open(ctx, path, Options{Mutators: reg, Remote: ts.remote(), Logger: quietLog, rebaseDefer: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	atOpen := r.replayed.Load() // Open replays the backlog once
	converged(t, ts, r)
	drained := r.replayed.Load() - atOpen
	if got, want := categories(t, r.DB())["Food"], int64(p/3*6+[]int{0, 1, 3}[p%3]); got != want {
		t.Fatalf("Food = %d, want %d", got, want)
	}
	return drained
}
