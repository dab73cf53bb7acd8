package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/internal/faultnet"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// trioNode is one of three cluster nodes in this process: an embedded NATS
// node, its Owner on the R3 stream, lease bucket and object store, and its
// server, which presents the cluster's one certificate.
type trioNode struct {
	node  *Node
	owner *Owner
	srv   *server.Server
	addr  string
}

// openR3 opens the log, the leases and the snapshots on node n's own
// connection, retrying while the cluster elects its leaders.
func openR3(t *testing.T, ctx context.Context, n *Node, ttl time.Duration) (*Log, *Leases, *Snapshots) {
	t.Helper()
	nc, js := connect(t, n)
	for {
		l, err := OpenLog(ctx, nc, js, LogConfig{Replicas: 3})
		var ls *Leases
		var snaps *Snapshots
		if err == nil {
			ls, err = OpenLeases(ctx, js, LeaseConfig{Replicas: 3, TTL: ttl})
		}
		if err == nil {
			snaps, err = OpenSnapshots(ctx, js, SnapshotConfig{Replicas: 3})
		}
		if err == nil {
			return l, ls, snaps
		}
		if ctx.Err() != nil {
			t.Fatalf("node %s: open the log, leases and snapshots: %v", n.Name(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startTrio starts three nodes whose servers share the certificate made in
// certDir.
func startTrio(t *testing.T, ctx context.Context, ttl time.Duration) []*trioNode {
	t.Helper()
	nodes := trio(t)
	certDir := t.TempDir()
	out := make([]*trioNode, len(nodes))
	for i, n := range nodes {
		l, ls, snaps := openR3(t, ctx, n, ttl)
		o := NewOwner(l, ls, snaps, n.Name(), quiet)
		reg := mutators.NewRegistry()
		if err := mutators.RegisterDemo(reg); err != nil {
			t.Fatal(err)
		}
		srv, err := server.Open(context.Background(), server.Config{
			Dir: t.TempDir(), Mutators: reg, Logger: quiet, VersionLog: o,
			CertFile: filepath.Join(certDir, "cert.pem"), KeyFile: filepath.Join(certDir, "key.pem"),
			Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err },
		})
		if err != nil {
			t.Fatal(err)
		}
		o.SetForwardHandler(srv.ServeForwarded)
		if err := srv.AddDatabase(context.Background(), "demo.db", "s3cret"); err != nil {
			t.Fatal(err)
		}
		addr, err := srv.Listen(ctx, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		tn := &trioNode{node: n, owner: o, srv: srv, addr: addr}
		out[i] = tn
		t.Cleanup(func() {
			srv.Close()
			cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			o.Close(cctx)
		})
	}
	return out
}

// crash takes a node down as a crash looks to its peers: its NATS node goes
// first (no lease is released, nothing more is appended), then its server.
func (n *trioNode) crash() {
	n.node.Shutdown()
	n.srv.Close()
}

// TestTrioFailsOverWithReplicasOnEveryNode: three nodes, a replica on each
// (with the other two as alternates). The first node to serve owns the
// database; the other two follow it and forward. Its node crashes; the
// replicas on the other nodes go on, one of those nodes takes the database
// over once the lease runs out, and the dead node's replica fails over to
// a live one. Every increment acknowledged is counted exactly once, and
// every replica ends at the stream's tail.
func TestTrioFailsOverWithReplicasOnEveryNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	const ttl = 2 * time.Second
	ctx := bounded(t, 150*time.Second)
	ns := startTrio(t, ctx, ttl)
	fp := ns[0].srv.Fingerprint()
	// Node 0's replica reaches it through a relay that goes silent at the
	// crash, as a SIGKILLed process does (no QUIC close, nothing at all):
	// the replica must count the connection dead after Remote.DeadAfter
	// (5 s with Alternates), not QUIC's usual 20 s.
	rel, err := faultnet.Listen(faultnet.Config{Target: ns[0].addr, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rel.Close() })
	rs := make([]*replica.Replica, len(ns))
	for i := range ns {
		addrs := []string{ns[i].addr}
		if i == 0 {
			addrs[0] = rel.Addr()
		}
		for j := 1; j < len(ns); j++ {
			addrs = append(addrs, ns[(i+j)%len(ns)].addr)
		}
		r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "replica.db"), replica.Options{
			Mutators: demoRegistry(t),
			Remote:   &replica.Remote{Addr: addrs[0], Alternates: addrs[1:], Database: "demo.db", Credential: "s3cret", Fingerprint: fp},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		rs[i] = r
		if i == 0 {
			increments(t, ctx, r, "r0", 1) // node 0 serves first: it owns
		}
	}
	if !ns[0].owner.Owns("demo.db") {
		t.Fatal("the first node to serve does not own the database")
	}
	const rounds = 6
	done := map[string]int{"r0": 1}
	var mu sync.Mutex
	run := func(from, to int) {
		var wg sync.WaitGroup
		for i, r := range rs {
			name := fmt.Sprintf("r%d", i)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := from; k < to; k++ {
					h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(name, 1))
					if err == nil {
						err = h.Wait(ctx)
					}
					if err != nil {
						t.Errorf("%s increment %d: %v", name, k, err)
						return
					}
					mu.Lock()
					done[name]++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	}
	run(0, rounds)
	if t.Failed() {
		t.FailNow()
	}
	killed := time.Now()
	rel.Close()
	ns[0].crash()
	// The first acknowledged increment after the crash, on a live node.
	h, err := rs[1].Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("r1", 1))
	if err == nil {
		err = h.Wait(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	done["r1"]++
	t.Logf("from the owner's crash to the next acknowledged mutation: %v (lease TTL %v)", time.Since(killed).Round(time.Millisecond), ttl)
	// The dead node's own replica: bounded well above DeadAfter's 5 s and
	// well below QUIC's 20 s idle timeout, which it must not wait out.
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	h, err = rs[0].Mutate(wctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("r0", 1))
	if err == nil {
		err = h.Wait(wctx)
	}
	cancel()
	if err != nil {
		t.Fatalf("the silent node's replica: %v (status %+v)", err, rs[0].Status())
	}
	done["r0"]++
	t.Logf("from the crash to the silent node's replica's next acknowledged mutation: %v", time.Since(killed).Round(time.Millisecond))
	run(rounds, 2*rounds)
	if t.Failed() {
		t.FailNow()
	}
	owners := 0
	for _, n := range ns[1:] {
		if n.owner.Owns("demo.db") {
			owners++
		}
	}
	if owners != 1 {
		t.Fatalf("%d live nodes own the database, want 1", owners)
	}
	l, _, _ := openR3(t, ctx, ns[1].node, ttl)
	tv, tsum := tailChecksum(t, ctx, l, "demo.db")
	var names []string
	for name := range done {
		names = append(names, name)
	}
	sort.Strings(names)
	for i, r := range rs {
		waitVersion(t, ctx, r, tv)
		if st := r.Status(); st.Version != tv || st.Checksum != tsum {
			t.Errorf("replica %d at %d/%016x, the stream's tail %d/%016x", i, st.Version, st.Checksum, tv, tsum)
		}
		for _, name := range names {
			if got := count(t, ctx, r, name); got != done[name] {
				t.Errorf("replica %d: %s = %d, want %d acknowledged", i, name, got, done[name])
			}
		}
	}
}
