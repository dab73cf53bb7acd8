package cluster

import (
	"context"
	"testing"
	"time"
)

// TestFailoverThreeNodes: the owner's node of a 3-node cluster dies (its
// server shut down, as a crash looks to its peers); another node takes the
// lease once it expires, makes its appender from the stream's tail and goes
// on. Every version acknowledged before the death is in the stream once,
// and the new owner's follow on from them.
func TestFailoverThreeNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	const ttl = 2 * time.Second
	nodes := trio(t)
	ctx := bounded(t, 90*time.Second)
	nc1, js1 := connect(t, nodes[0])
	l1, err := OpenLog(ctx, nc1, js1, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	ls1, err := OpenLeases(ctx, js1, LeaseConfig{Replicas: 3, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	lease, err := ls1.Acquire(ctx, "db", NewToken("n1"))
	if err != nil {
		t.Fatal(err)
	}
	ap, err := l1.NewAppender(ctx, "db", lease.Holder())
	if err != nil {
		t.Fatal(err)
	}
	for v := uint64(1); v <= 20; v++ {
		if _, err := ap.Append(ctx, v, []byte{byte(v)}); err != nil {
			t.Fatalf("append %d: %v", v, err)
		}
	}
	nc1.Close()
	nodes[0].Shutdown()
	killed := time.Now()

	nc2, js2 := connect(t, nodes[1])
	var l2 *Log
	var ls2 *Leases
	for l2 == nil || ls2 == nil {
		if l2 == nil {
			l2, _ = OpenLog(ctx, nc2, js2, LogConfig{Replicas: 3})
		}
		if l2 != nil && ls2 == nil {
			ls2, _ = OpenLeases(ctx, js2, LeaseConfig{Replicas: 3, TTL: ttl})
		}
		if ctx.Err() != nil {
			t.Fatal("n2 could not open the log and leases after n1 died")
		}
		if l2 == nil || ls2 == nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	token := NewToken("n2")
	var lease2 *Lease
	for lease2 == nil {
		lease2, err = ls2.Acquire(bounded(t, 5*time.Second), "db", token)
		if ctx.Err() != nil {
			t.Fatalf("n2 did not get the lease: %v", err)
		}
		if lease2 == nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	var ap2 *Appender
	for ap2 == nil {
		ap2, err = l2.NewAppender(bounded(t, 5*time.Second), "db", token)
		if ctx.Err() != nil {
			t.Fatalf("n2 could not read the tail: %v", err)
		}
	}
	if _, v := ap2.Last(); v != 20 {
		t.Fatalf("the new owner's tail is version %d, want 20", v)
	}
	for v := uint64(21); v <= 30; v++ {
		if _, err := ap2.Append(ctx, v, []byte{byte(v)}); err != nil {
			t.Fatalf("new owner's append %d: %v", v, err)
		}
		if v == 21 {
			t.Logf("from the kill to the new owner's first acknowledged append: %v (lease TTL %v)", time.Since(killed).Round(time.Millisecond), ttl)
		}
	}
	nc3, js3 := connect(t, nodes[2])
	l3, err := OpenLog(ctx, nc3, js3, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	es, err := l3.Read(ctx, "db", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 30 {
		t.Fatalf("n3 reads %d versions, want 30", len(es))
	}
	for i, e := range es {
		owner := lease.Holder()
		if i >= 20 {
			owner = token
		}
		if e.Version != uint64(i+1) || e.Owner != owner || e.Rec[0] != byte(i+1) {
			t.Fatalf("entry %d: %+v", i, e)
		}
	}
}

// TestAppendRidesOutTheStreamLeadersDeath: the node that leads the
// version stream dies while an owner on another node appends. The append
// in flight then is never answered (its leader is gone); the Appender
// sends it again until the new leader, elected seconds later, takes it,
// and every version lands once, in order: no append fails, so the owner
// keeps its database instead of dropping it after the version log's
// timeout.
func TestAppendRidesOutTheStreamLeadersDeath(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	nodes := trio(t)
	ctx := bounded(t, 90*time.Second)
	nc1, js1 := connect(t, nodes[0])
	l1, err := OpenLog(ctx, nc1, js1, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	info, err := l1.stream.Info(ctx)
	if err != nil || info.Cluster == nil || info.Cluster.Leader == "" {
		t.Fatalf("the stream's leader: %v, %+v", err, info)
	}
	var leader *Node
	var writer *Node
	for _, n := range nodes {
		if n.Name() == info.Cluster.Leader {
			leader = n
		} else if writer == nil {
			writer = n
		}
	}
	if leader == nil || writer == nil {
		t.Fatalf("leader %q is none of the nodes", info.Cluster.Leader)
	}
	ncw, jsw := connect(t, writer)
	lw, err := OpenLog(ctx, ncw, jsw, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	ap, err := lw.NewAppender(ctx, "db", NewToken(writer.Name()))
	if err != nil {
		t.Fatal(err)
	}
	const total = 60
	killed := make(chan time.Time, 1)
	var slowest time.Duration
	for v := uint64(1); v <= total; v++ {
		if v == 20 {
			go func() {
				time.Sleep(5 * time.Millisecond) // while an append is in flight
				leader.Shutdown()
				killed <- time.Now()
			}()
		}
		actx, cancel := context.WithTimeout(ctx, 15*time.Second) // the version log's timeout, and some
		start := time.Now()
		_, err := ap.Append(actx, v, []byte{byte(v)})
		cancel()
		if err != nil {
			t.Fatalf("append %d after the leader %s died: %v", v, leader.Name(), err)
		}
		slowest = max(slowest, time.Since(start))
	}
	t.Logf("the slowest append took %v (the stream's leader %s died during the 20th)", slowest.Round(time.Millisecond), leader.Name())
	es, err := lw.Read(ctx, "db", 0, total+10)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != total {
		t.Fatalf("the stream holds %d versions, want %d", len(es), total)
	}
	for i, e := range es {
		if e.Version != uint64(i+1) || e.Rec[0] != byte(i+1) {
			t.Fatalf("entry %d: %+v", i, e)
		}
	}
}
