package cluster

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestLeaseAcquireRaceOnAReleasedLease: two nodes that both see a released
// lease and acquire it at once: one gets it, the other ErrLeaseHeld. The
// loser got a bare "wrong last sequence" (the key's create is an update on
// its delete marker), which a follower's take-over took for a failure and
// stopped the database for good (found by TestChaosCluster, R3, a restarted
// owner re-taking its lease as the follower's watcher saw it free).
// On a replicated bucket JetStream says 10164, which the client does not
// take for "key exists".
func TestLeaseAcquireRaceOnAReleasedLease(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	ctx := bounded(t, 90*time.Second)
	_, ls, _ := openR3(t, ctx, trio(t)[0], 5*time.Second)
	for i := range 30 {
		db := fmt.Sprintf("race%d.db", i)
		le, err := ls.Acquire(ctx, db, "first")
		if err != nil {
			t.Fatal(err)
		}
		if err := le.Release(ctx); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for k := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[k] = ls.Acquire(ctx, db, fmt.Sprintf("node%d", k))
			}()
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, ErrLeaseHeld):
				t.Fatalf("round %d: the loser's error %v, want ErrLeaseHeld", i, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d acquired the lease (%v)", i, won, errs)
		}
	}
}
