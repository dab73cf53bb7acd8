package cluster

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/replica"
)

// TestFollowerBehindAReplicaDoesNotStopIt: a replica that synced on the
// owner's node and then connects to a follower whose copy is behind it (a
// node that restarts on its directory with an old copy, or a copy that
// lags the log by a few versions) must wait for the copy to catch up, not
// be told that the server's history is behind it, a fatal error that stops
// its sync for good (found by TestChaosCluster: a crashed owner's node
// came back as a follower and answered the first Hello from its new copy,
// at version 1, to a replica at version 34).
func TestFollowerBehindAReplicaDoesNotStopIt(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	a := startNode(t, ctx, sh, "a", t.TempDir())
	path := filepath.Join(t.TempDir(), "replica.db")
	open := func(addr, fp string) *replica.Replica {
		r, err := replica.Open(ctx, path, replica.Options{
			Mutators: demoRegistry(t),
			Remote:   &replica.Remote{Addr: addr, Database: "demo.db", Credential: "s3cret", Fingerprint: fp},
		})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := open(a.addr, a.srv.Fingerprint())
	increments(t, ctx, r, "alice", 3)

	// B follows, then stops with its copy at the tail of the time.
	dirB := t.TempDir()
	b := startNode(t, ctx, sh, "b", dirB)
	rB := openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 1)
	rB.Close()
	b.stop()

	// The log moves on while B is down; the replica goes with it.
	increments(t, ctx, r, "alice", 50)
	have := r.Status().Version
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	// B again, on its directory, with its old copy: the replica, ahead of
	// that copy, connects to it.
	b = startNode(t, ctx, sh, "b", dirB)
	r = open(b.addr, b.srv.Fingerprint()) // its certificate is in its directory
	defer r.Close()
	if err := r.Sync(ctx); err != nil {
		if errors.Is(err, replica.ErrServerBehind) {
			t.Fatalf("a follower behind the replica (at %d) stopped it: %v", have, err)
		}
		t.Fatal(err)
	}
	if st := r.Status(); st.Version < have {
		t.Fatalf("replica at %d after Sync, was at %d", st.Version, have)
	}
	if got := count(t, ctx, r, "alice"); got != 53 {
		t.Errorf("alice = %d, want 53", got)
	}
	increments(t, ctx, r, "alice", 1)
}

// TestFollowerRebuiltFromAnImageMovesItsSessionsOn: a replica welcomed by a
// follower from its old copy, which the follower then rebuilds from an
// image (the stream was trimmed past the copy while the node was down),
// must reach the image's version. It was left at the old copy's version
// for good: the rebuild offered its sessions nothing (found by
// TestChaosCluster: a restarted node's probe stuck at version 47, the tail
// 66).
func TestFollowerRebuiltFromAnImageMovesItsSessionsOn(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	a := startNode(t, ctx, sh, "a", t.TempDir())
	rA := openReplica(t, ctx, a.srv, a.addr)
	increments(t, ctx, rA, "alice", 3)

	// B follows, then stops with its copy at the tail of the time.
	dirB := t.TempDir()
	b := startNode(t, ctx, sh, "b", dirB)
	rB := openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 1)
	old := rB.Status().Version
	rB.Close()
	b.stop()

	// The log moves on and is trimmed past B's copy.
	increments(t, ctx, rA, "alice", 5)
	putSnapshot(t, ctx, sh.snaps, sh.log, a.srv.Authority("demo.db"))
	increments(t, ctx, rA, "alice", 1)
	tv, tsum := tailChecksum(t, ctx, sh.log, "demo.db")

	// B again: a new replica's Hello opens the database there, from the
	// old copy, which then gaps and is rebuilt from the image.
	b = startNode(t, ctx, sh, "b", dirB)
	r := openReplica(t, ctx, b.srv, b.addr)
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for r.Status().Version < tv {
		select {
		case <-wctx.Done():
			t.Fatalf("replica on the rebuilt follower at %d (the old copy %d), the tail %d", r.Status().Version, old, tv)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if st := r.Status(); st.Checksum != tsum {
		t.Fatalf("replica at %d/%016x, the tail %d/%016x", st.Version, st.Checksum, tv, tsum)
	}
}
