package cluster

import (
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
