package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// quiet is the logger of test nodes: only errors, to the test log's
// stderr only when -v.
var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// bounded is a test's context: a hang fails the test instead of hanging it.
func bounded(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// single starts a one-node JetStream in a temporary directory.
func single(t testing.TB) (*Node, *nats.Conn, jetstream.JetStream) {
	t.Helper()
	n, err := StartNode(bounded(t, 20*time.Second), NodeConfig{Name: "n1", Dir: t.TempDir(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Shutdown)
	nc, js, err := n.Connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return n, nc, js
}

// freePorts returns k TCP ports on 127.0.0.1 that were free a moment ago.
func freePorts(t testing.TB, k int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range k {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// trio starts a 3-node JetStream cluster on loopback routes, in this
// process, and returns its nodes.
func trio(t testing.TB) []*Node {
	t.Helper()
	ports := freePorts(t, 3)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	nodes := make([]*Node, 3)
	errs := make(chan error, 3)
	ctx := bounded(t, 60*time.Second)
	for i := range nodes {
		go func() {
			n, err := StartNode(ctx, NodeConfig{
				Name: fmt.Sprintf("n%d", i+1), Dir: t.TempDir(), Logger: quiet,
				ClusterName: "test", ClusterPort: ports[i], Routes: routes,
			})
			nodes[i] = n
			errs <- err
		}()
	}
	var failed error
	for range nodes {
		if err := <-errs; err != nil {
			failed = err
		}
	}
	for _, n := range nodes {
		if n != nil {
			t.Cleanup(n.Shutdown)
		}
	}
	if failed != nil {
		t.Fatal(failed)
	}
	return nodes
}

func connect(t testing.TB, n *Node) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, js, err := n.Connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc, js
}

// shared is the JetStream side every test node of one cluster shares.
type shared struct {
	log    *Log
	leases *Leases
	snaps  *Snapshots
	js     jetstream.JetStream
}

func openShared(t *testing.T, ctx context.Context, ttl time.Duration) shared {
	t.Helper()
	_, nc, js := single(t)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := OpenSnapshots(ctx, js, SnapshotConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return shared{l, ls, snaps, js}
}

// rivalLeases opens a second lease bucket beside sh's: the only way to
// make two nodes both believe they own a database, as a paused or
// partitioned owner may.
func (sh shared) rivalLeases(t *testing.T, ctx context.Context, ttl time.Duration) *Leases {
	t.Helper()
	ls, err := OpenLeases(ctx, sh.js, LeaseConfig{Bucket: "sqlrebase-leases-b", TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return ls
}
