package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

// The cluster benchmarks (issue 12, "Measured"): one database served by a
// single node with its local change log, by a one-node cluster (R1) and by a
// three-node cluster (R3, sync always: three embedded NATS nodes in this
// process on loopback routes, each with its own sqlrebase server whose
// VersionLog is that node's Owner). Every comparison is interleaved in one
// run, the deployments taking turns sample by sample, so that all see the
// same machine; the metrics are same-run ratios. Clients are raw protocol
// sessions over loopback QUIC (as server's BenchmarkServerThroughput and
// bench's fan-out use), in the same process: CPU and RSS figures include
// them. None of these runs in `go test ./...`; run them with -bench and a
// fixed -benchtime (each iteration is a round of every deployment):
//
//	go test -run '^$' -bench ClusterThroughput -benchtime 5x ./cluster
//	go test -run '^$' -bench ClusterPushAck -benchtime 300x ./cluster
//	go test -run '^$' -bench ClusterFanout -benchtime 30x ./cluster
//	go test -run '^$' -bench ClusterConnections -benchtime 4x ./cluster
//	go test -run '^$' -bench ClusterDatabases -benchtime 2x ./cluster

const (
	benchDB     = "demo.db"
	benchSecret = "s3cret"
)

// deployment is one way of serving benchDB: its servers, one per node, of
// which srvs[0] owns the database (it opened it first, so it holds the
// lease in a cluster).
type deployment struct {
	name  string
	srvs  []*server.Server
	addrs []string
	auth  *server.Authority // the owner's, pinned open
	logs  []*Log            // per node; nil for the single node
	nodes []*Node
	ncs   []*nats.Conn
}

// benchServer is a sqlrebase server on a fresh directory with the demo
// mutators and benchDB, listening on loopback, taking up to conns QUIC
// connections from 127.0.0.1. vl nil is a single node (local change log).
func benchServer(tb testing.TB, vl server.VersionLog, conns int) (*server.Server, string) {
	tb.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		tb.Fatal(err)
	}
	ctx := bounded(tb, 30*time.Second)
	srv, err := server.Open(ctx, server.Config{
		Dir: tb.TempDir(), Mutators: reg, Logger: quiet, VersionLog: vl,
		MaxConnsPerAddr: conns + 16, CredentialHashIterations: 1,
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err },
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { srv.Close() })
	if err := srv.AddDatabase(ctx, benchDB, benchSecret); err != nil {
		tb.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	return srv, addr
}

// singleNode is a server without a VersionLog: today's single node.
func singleNode(tb testing.TB, conns int) *deployment {
	tb.Helper()
	srv, addr := benchServer(tb, nil, conns)
	a := srv.Authority(benchDB)
	if a == nil {
		tb.Fatal("the single node did not open the database")
	}
	return &deployment{name: "single", srvs: []*server.Server{srv}, addrs: []string{addr}, auth: a}
}

// clusterOf starts n embedded NATS nodes (1: no routes, R1; 3: a cluster,
// R3), a server on each with an Owner as its VersionLog that writes
// snapshots by the default policy and serves forwarded pushes, as `serve
// --cluster` does, and opens benchDB on the first, which so takes the
// lease; a session on another node opens it there as a follower.
func clusterOf(tb testing.TB, n, conns int) *deployment {
	tb.Helper()
	var nodes []*Node
	if n == 1 {
		node, err := StartNode(bounded(tb, 20*time.Second), NodeConfig{Name: "r1", Dir: tb.TempDir(), Logger: quiet})
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(node.Shutdown)
		nodes = []*Node{node}
	} else {
		nodes = trio(tb)
	}
	d := &deployment{name: fmt.Sprintf("r%d", n)}
	ctx := bounded(tb, 60*time.Second)
	for _, node := range nodes {
		nc, js := connect(tb, node)
		d.nodes, d.ncs = append(d.nodes, node), append(d.ncs, nc)
		l := untilOpen(tb, ctx, func() (*Log, error) { return OpenLog(ctx, nc, js, LogConfig{Replicas: n}) })
		ls := untilOpen(tb, ctx, func() (*Leases, error) { return OpenLeases(ctx, js, LeaseConfig{Replicas: n}) })
		snaps := untilOpen(tb, ctx, func() (*Snapshots, error) { return OpenSnapshots(ctx, js, SnapshotConfig{Replicas: n}) })
		o := NewOwner(l, ls, snaps, node.Name(), quiet)
		tb.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			o.Close(ctx)
		})
		srv, addr := benchServer(tb, o, conns)
		o.SetSnapshotSource(srv, SnapshotPolicy{})
		o.SetForwardHandler(srv.ServeForwarded)
		d.srvs, d.addrs, d.logs = append(d.srvs, srv), append(d.addrs, addr), append(d.logs, l)
	}
	if d.auth = d.srvs[0].Authority(benchDB); d.auth == nil {
		tb.Fatalf("%s: the first node did not open the database", d.name)
	}
	return d
}

// leaderOn moves the version stream's Raft leader to node i (a leader
// stepdown with a preferred placement) and waits until it is there, and
// names d after where it put it: the owner's appends then go to a leader
// in its own process (i 0) or one route hop away (the usual case once
// databases hash onto streams whose leaders spread over the nodes).
func (d *deployment) leaderOn(tb testing.TB, i int) {
	tb.Helper()
	ctx := bounded(tb, 60*time.Second)
	want := d.nodes[i].Name()
	if i == 0 {
		d.name += "-leader-owner"
	} else {
		d.name += "-leader-other"
	}
	stream := d.logs[0].stream.CachedInfo().Config.Name
	body, err := json.Marshal(map[string]any{"placement": map[string]string{"preferred": want}})
	if err != nil {
		tb.Fatal(err)
	}
	for {
		si, err := d.logs[0].stream.Info(ctx)
		if err == nil && si.Cluster != nil && si.Cluster.Leader == want {
			return
		}
		if err == nil && si.Cluster != nil && si.Cluster.Leader != "" {
			if _, err := d.ncs[0].RequestWithContext(ctx, fmt.Sprintf("$JS.API.STREAM.LEADER.STEPDOWN.%s", stream), body); err != nil && ctx.Err() == nil {
				tb.Logf("%s: stepdown: %v", d.name, err)
			}
		}
		select {
		case <-ctx.Done():
			tb.Fatalf("%s: the stream's leader did not move to %s", d.name, want)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// leader is the node name of the version stream's leader ("" if unknown).
func (d *deployment) leader(ctx context.Context) string {
	if len(d.logs) == 0 {
		return ""
	}
	si, err := d.logs[0].stream.Info(ctx)
	if err != nil || si.Cluster == nil {
		return ""
	}
	return si.Cluster.Leader
}

// pinnedTrios are two three-node clusters, one with the stream's leader on
// the owner's node and one with it on another node.
func pinnedTrios(tb testing.TB, conns int) []*deployment {
	tb.Helper()
	own, other := clusterOf(tb, 3, conns), clusterOf(tb, 3, conns)
	own.leaderOn(tb, 0)
	other.leaderOn(tb, 1)
	return []*deployment{own, other}
}

// checkLeaders fails tb if a pinned leader moved during the benchmark (an
// election on the loaded machine), which would mix the two cases.
func checkLeaders(tb testing.TB, deps []*deployment) {
	tb.Helper()
	ctx := bounded(tb, 10*time.Second)
	for _, d := range deps {
		want := ""
		switch {
		case strings.HasSuffix(d.name, "-leader-owner"):
			want = d.nodes[0].Name()
		case strings.HasSuffix(d.name, "-leader-other"):
			want = d.nodes[1].Name()
		default:
			continue
		}
		if got := d.leader(ctx); got != want {
			tb.Errorf("%s: the stream's leader moved to %q during the run", d.name, got)
		}
	}
}

// untilOpen calls open until it succeeds or ctx ends. A cluster that has
// just elected its meta leader may still refuse an R3 stream with "no
// suitable peers for placement" (10005) until it has heard of every peer,
// which OpenLog does not take for transient.
func untilOpen[T any](tb testing.TB, ctx context.Context, open func() (T, error)) T {
	tb.Helper()
	for {
		v, err := open()
		if err == nil {
			return v
		}
		select {
		case <-ctx.Done():
			tb.Fatal(err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// benchConn is a raw protocol session on its own QUIC connection. A reader
// goroutine records the last Ack and the last version received (with the
// time it arrived) and pokes notify; it never blocks on the benchmark.
type benchConn struct {
	conn   *quic.Conn
	stream *quic.Stream
	next   uint64 // the next mutation id to push

	acked   atomic.Uint64
	version atomic.Uint64
	at      atomic.Int64 // UnixNano when version arrived
	notify  chan struct{}
	dead    chan struct{} // closed when the reader stops; err says why
	err     error
}

// dial opens a session of clientID to benchDB on d's node i, announcing the
// owner's current version and checksum (so no catch-up is sent), and
// starts its reader. Cleanup closes the connection and waits for the
// reader.
func dial(tb testing.TB, d *deployment, i int, clientID string) *benchConn {
	tb.Helper()
	return dialAt(tb, target{Addr: d.addrs[i], Fingerprint: d.srvs[i].Fingerprint(), Version: d.auth.Version(), Checksum: d.auth.Checksum()}, clientID)
}

// target is where a session goes, and the state it announces.
type target struct {
	Addr, Fingerprint string
	Version, Checksum uint64
}

// dialAt is dial to any target (also from a child process). A refusal a
// replica would retry (a follower still building its copy answers
// CodeInternal after 5 s; busy; shutting down) is retried for up to 60 s.
func dialAt(tb testing.TB, tg target, clientID string) *benchConn {
	tb.Helper()
	ctx := bounded(tb, 60*time.Second)
	for {
		c, r, err := dialOnce(ctx, tg, clientID)
		if err == nil {
			tb.Cleanup(func() {
				c.conn.CloseWithError(0, "")
				<-c.dead
			})
			go c.read(r)
			return c
		}
		var re *protocol.RemoteError
		retry := errors.As(err, &re) && (re.Code == protocol.CodeInternal || re.Code == protocol.CodeBusy || re.Code == protocol.CodeShuttingDown)
		if !retry || ctx.Err() != nil {
			tb.Fatalf("session %s to %s: %v", clientID, tg.Addr, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// dialOnce opens a connection and a session and reads the Welcome; on an
// error the connection is closed.
func dialOnce(ctx context.Context, tg target, clientID string) (c *benchConn, r *protocol.Reader, err error) {
	tlsConf, err := protocol.ClientTLS(tg.Fingerprint, "", "")
	if err != nil {
		return nil, nil, err
	}
	conn, err := quic.DialAddr(ctx, tg.Addr, tlsConf, protocol.QUICConfig())
	if err != nil {
		return nil, nil, fmt.Errorf("dial: %w", err)
	}
	defer func() {
		if err != nil {
			conn.CloseWithError(0, "")
		}
	}()
	c = &benchConn{conn: conn, next: 1, notify: make(chan struct{}, 1), dead: make(chan struct{})}
	if c.stream, err = conn.OpenStreamSync(ctx); err != nil {
		return nil, nil, err
	}
	hello := &protocol.Hello{Protocol: protocol.Version, Database: benchDB, ClientID: clientID, Credential: benchSecret, Version: tg.Version, Checksum: tg.Checksum}
	if err := protocol.WriteMessage(c.stream, hello); err != nil {
		return nil, nil, err
	}
	r = protocol.NewReader(c.stream, protocol.DefaultLimits)
	c.stream.SetReadDeadline(time.Now().Add(20 * time.Second))
	m, err := r.Read()
	if err != nil {
		return nil, nil, fmt.Errorf("Hello: %w", err)
	}
	switch m := m.(type) {
	case *protocol.Welcome:
		c.stream.SetReadDeadline(time.Time{})
		c.version.Store(m.Version)
		return c, r, nil
	case *protocol.Error:
		return nil, nil, fmt.Errorf("refused: %w", m.Err())
	default:
		return nil, nil, fmt.Errorf("the Hello was answered with %T", m)
	}
}

func (c *benchConn) read(r *protocol.Reader) {
	defer close(c.dead)
	for {
		m, err := r.Read()
		if err != nil {
			c.err = err
			return
		}
		switch m := m.(type) {
		case *protocol.Ack:
			c.acked.Store(max(c.acked.Load(), m.LastMutationID))
		case *protocol.Versions:
			if n := len(m.Versions); n > 0 {
				c.at.Store(time.Now().UnixNano())
				c.version.Store(m.Versions[n-1].Version)
			}
		case *protocol.Error:
			c.err = m.Err()
			return
		default:
			continue
		}
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}

// wait blocks until done() holds, the reader stops or ctx ends.
func (c *benchConn) wait(ctx context.Context, done func() bool) error {
	for !done() {
		select {
		case <-c.notify:
		case <-c.dead:
			if done() {
				return nil
			}
			return fmt.Errorf("session ended: %w", c.err)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// pump pushes n demo mutations in pushes of batch, keeping at most window
// unacknowledged, and returns once all are acknowledged.
func (c *benchConn) pump(ctx context.Context, n, batch, window int, category string) error {
	args := mutators.CategoryArgs(category, 1)
	last := c.next + uint64(n) - 1
	for c.acked.Load() < last {
		for c.next <= last && int(c.next-1-c.acked.Load())+batch <= window {
			p := &protocol.Push{}
			for j := 0; j < batch && c.next <= last; j++ {
				p.Mutations = append(p.Mutations, protocol.Mutation{ID: c.next, Name: mutators.CreateCategoryOrIncrementIfExists, Args: args})
				c.next++
			}
			if err := protocol.WriteMessage(c.stream, p); err != nil {
				return err
			}
		}
		acked := c.acked.Load()
		if err := c.wait(ctx, func() bool { return c.acked.Load() > acked || c.acked.Load() >= last }); err != nil {
			return err
		}
	}
	return nil
}

// cpuTime is the process's user and system CPU so far: servers, NATS nodes
// and clients alike, since they share the process.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rssKiB is the process's resident set, after a collection that returns
// freed memory to the system, so that successive readings differ by what
// is live.
func rssKiB() int {
	runtime.GC()
	debug.FreeOSMemory()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}

// noLeaks fails tb if, once its other cleanups ran (servers, NATS nodes,
// connections, client processes), more goroutines or open file
// descriptors (sockets: the ports; files) are left than when it was
// called, after a bounded wait for them to wind down. Call it first.
func noLeaks(tb testing.TB) {
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			return 0 // no /proc: goroutines only
		}
		return len(ents)
	}
	g0, f0 := runtime.NumGoroutine(), fds()
	tb.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for (runtime.NumGoroutine() > g0 || fds() > f0) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if n := fds(); n > f0 {
			tb.Errorf("%d file descriptors left after the set-up closed", n-f0)
		}
		if n := runtime.NumGoroutine(); n > g0 {
			buf := make([]byte, 1<<20)
			tb.Errorf("%d goroutines left after the set-up closed:\n%s", n-g0, buf[:runtime.Stack(buf, true)])
		}
	})
}

// median of xs (0 for none).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// spread is "median [min-max]" of xs.
func spread(xs []float64) string {
	if len(xs) == 0 {
		return "none"
	}
	return fmt.Sprintf("%.3g [%.3g-%.3g]", median(xs), slices.Min(xs), slices.Max(xs))
}

// ms is d in milliseconds, for metrics.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkClusterThroughput: 10 clients push the demo mutator to the
// owner as fast as it acknowledges (the writer's group commit takes what
// waits), on a single node, a one-node cluster and a three-node cluster in
// turn; each iteration is one round of every deployment. Three cases: pushes
// of 200 with 2,000 in flight per client (server's
// BenchmarkServerThroughput), pushes of 1 with 2,000 in flight, and pushes
// of 1 with one in flight (each client waits for its Ack: a batch holds at
// most 10 mutations, so the append's latency is not hidden). The metrics
// are the medians over the rounds of each one's acknowledged mutations per
// second and of the per-round ratios to the single node.
func BenchmarkClusterThroughput(b *testing.B) {
	for _, c := range []struct{ batch, window, per int }{{200, 2000, 5000}, {1, 2000, 1000}, {1, 1, 200}} {
		b.Run(fmt.Sprintf("push=%d/window=%d", c.batch, c.window), func(b *testing.B) { benchClusterThroughput(b, c.batch, c.window, c.per) })
	}
}

// benchClusterThroughput runs one case: each client pushes per mutations a
// round, batch to a Push, at most window in flight.
func benchClusterThroughput(b *testing.B, batch, window, per int) {
	noLeaks(b)
	const clients = 10
	deps := append([]*deployment{singleNode(b, clients), clusterOf(b, 1, clients)}, pinnedTrios(b, clients)...)
	conns := make([][]*benchConn, len(deps))
	for i, d := range deps {
		for j := range clients {
			conns[i] = append(conns[i], dial(b, d, 0, fmt.Sprintf("pusher-%d", j)))
		}
	}
	ctx := bounded(b, 30*time.Minute)
	round := func(i, n int) float64 {
		start := time.Now()
		errs := make(chan error, clients)
		var wg sync.WaitGroup
		for j, c := range conns[i] {
			wg.Go(func() { errs <- c.pump(ctx, n, batch, window, fmt.Sprintf("cat-%d", j%3)) })
		}
		wg.Wait()
		el := time.Since(start)
		close(errs)
		for err := range errs {
			if err != nil {
				b.Fatalf("%s: %v", deps[i].name, err)
			}
		}
		return float64(n*clients) / el.Seconds()
	}
	for i := range deps { // a warm round: past the first WAL generation (bench/README.md)
		round(i, per)
	}
	rates := make([][]float64, len(deps))
	ratios := make([][]float64, len(deps)) // to the single node, per round
	v0 := make([]uint64, len(deps))
	for i, d := range deps {
		v0[i] = d.auth.Version()
	}
	b.ResetTimer()
	for n := range b.N {
		got := make([]float64, len(deps))
		for k := range deps {
			i := (n + k) % len(deps)
			got[i] = round(i, per)
		}
		for i := range deps {
			rates[i] = append(rates[i], got[i])
			ratios[i] = append(ratios[i], got[i]/got[0])
		}
	}
	b.StopTimer()
	checkLeaders(b, deps)
	for i, d := range deps {
		versions := d.auth.Version() - v0[i]
		b.Logf("%s: %s acked/s, %s of the single node's; %.0f mutations per version", d.name, spread(rates[i]), spread(ratios[i]), float64(b.N*per*clients)/float64(max(versions, 1)))
		b.ReportMetric(median(rates[i]), d.name+"-acked/s")
		if i > 0 {
			b.ReportMetric(median(ratios[i]), d.name+"/single")
		}
	}
}

// BenchmarkClusterPushAck: one client pushes one mutation and waits for
// its Ack, on a single node, a one-node cluster, and three-node clusters
// (the stream's leader on the owner's node, or on another), in turn (each
// iteration is one push on each): the server's part of Mutate to
// confirmed, with the stream's quorum ack in the path for the clusters.
// "r3-forwarded" is a client of the third node of the leader-other
// cluster, neither owner nor leader: a follower, which forwards the push
// to the owner and acks once the owner answers.
func BenchmarkClusterPushAck(b *testing.B) {
	noLeaks(b)
	deps := append([]*deployment{singleNode(b, 1), clusterOf(b, 1, 1)}, pinnedTrios(b, 1)...)
	names := []string{}
	var cs []*benchConn
	for _, d := range deps {
		cs, names = append(cs, dial(b, d, 0, "lat")), append(names, d.name)
	}
	cs, names = append(cs, dial(b, deps[3], 2, "fwd")), append(names, "r3-forwarded")
	ctx := bounded(b, 30*time.Minute)
	one := func(i int) time.Duration {
		start := time.Now()
		if err := cs[i].pump(ctx, 1, 1, 1, "Food"); err != nil {
			b.Fatalf("%s: %v", names[i], err)
		}
		return time.Since(start)
	}
	for range 600 { // past the first WAL generation
		for i := range cs {
			one(i)
		}
	}
	lat := make([][]time.Duration, len(cs))
	b.ResetTimer()
	for n := range b.N {
		for k := range cs {
			i := (n + k) % len(cs)
			lat[i] = append(lat[i], one(i))
		}
	}
	b.StopTimer()
	checkLeaders(b, deps)
	for i, name := range names {
		b.ReportMetric(ms(pct(lat[i], 50)), name+"-p50-ms")
		b.ReportMetric(ms(pct(lat[i], 99)), name+"-p99-ms")
		if i > 0 {
			b.ReportMetric(float64(pct(lat[i], 50))/float64(pct(lat[0], 50)), name+"/single-p50")
			b.ReportMetric(float64(pct(lat[i], 99))/float64(pct(lat[0], 99)), name+"/single-p99")
		}
	}
}

// fanout is a set of subscribers to one deployment's database, held by
// client processes (one per node they connect to).
type fanout struct {
	name     string
	d        *deployment
	procs    []*clientProc
	follower []bool // whether procs[i]'s sessions are on a follower
}

// BenchmarkClusterFanout: 300 subscribers read every version, on a single
// node, on the owner of a three-node cluster, and spread over the three
// nodes of another (100 on the owner, 100 on each follower, which gets the
// version from the stream with an ordered consumer and applies it to its
// copy before it sends it), in turn; each iteration makes one version (a
// one-row update through the owner's authority) on each and waits until
// all 300 have it. The subscribers are in client processes, so this
// process's CPU over a sample is the servers' and NATS nodes' only (and
// what the idle deployments spend meanwhile): deliveries per server
// CPU-second. Latency is from the start of the commit to each subscriber's
// read, by the machine's clock in both processes.
func BenchmarkClusterFanout(b *testing.B) {
	noLeaks(b)
	const n = 300
	single, r3, spread := singleNode(b, n), clusterOf(b, 3, n), clusterOf(b, 3, n)
	r3.leaderOn(b, 1)
	spread.leaderOn(b, 1)
	fs := []*fanout{{name: "single", d: single}, {name: "r3-owner", d: r3}, {name: "r3-spread", d: spread}}
	for _, f := range fs {
		nodes := 1
		if f.name == "r3-spread" {
			nodes = 3
		}
		for i := range nodes {
			f.procs = append(f.procs, clients(b, f.d, i, n/nodes, fmt.Sprintf("sub-%d", i)))
			f.follower = append(f.follower, i > 0)
		}
	}
	ctx := bounded(b, 30*time.Minute)
	type result struct {
		lat      []time.Duration
		followed []time.Duration // the subscribers of a follower
		made     []time.Duration
		cpu      time.Duration
	}
	res := make([]result, len(fs))
	sample := func(i int) {
		f := fs[i]
		cpu0 := cpuTime()
		start := time.Now()
		ps, err := f.d.auth.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES ('Food', 1) ON CONFLICT(name) DO UPDATE SET count = count + 1`)
			return err
		})
		if err != nil {
			b.Fatalf("%s: %v", f.name, err)
		}
		res[i].made = append(res[i].made, time.Since(start))
		for _, p := range f.procs {
			p.ask(b, ps.Version)
		}
		var got [][]time.Time
		for _, p := range f.procs {
			got = append(got, p.got(b, ps.Version))
		}
		res[i].cpu += cpuTime() - cpu0
		for j, ts := range got {
			for _, t := range ts {
				l := t.Sub(start)
				res[i].lat = append(res[i].lat, l)
				if f.follower[j] {
					res[i].followed = append(res[i].followed, l)
				}
			}
		}
	}
	for range 5 {
		for i := range fs {
			sample(i)
		}
	}
	res = make([]result, len(fs))
	b.ResetTimer()
	for k := range b.N {
		for j := range fs {
			sample((k + j) % len(fs))
		}
	}
	b.StopTimer()
	per := make([]float64, len(fs))
	for i, f := range fs {
		per[i] = float64(len(res[i].lat)) / res[i].cpu.Seconds()
		b.ReportMetric(per[i], f.name+"-deliveries/server-cpu-s")
		b.ReportMetric(ms(pct(res[i].lat, 50)), f.name+"-p50-ms")
		b.ReportMetric(ms(pct(res[i].lat, 99)), f.name+"-p99-ms")
		b.ReportMetric(ms(pct(res[i].made, 50)), f.name+"-commit-p50-ms")
		if len(res[i].followed) > 0 {
			b.ReportMetric(ms(pct(res[i].followed, 50)), f.name+"-on-followers-p50-ms")
		}
	}
	for i, f := range fs[1:] {
		b.ReportMetric(per[i+1]/per[0], f.name+"/single-per-cpu")
		b.ReportMetric(float64(pct(res[i+1].lat, 50))/float64(pct(res[0].lat, 50)), f.name+"/single-p50")
	}
}

// clientsEnv names the environment variable that makes
// TestClusterBenchClients a client process: a JSON clientsJob.
const clientsEnv = "SQLREBASE_BENCH_CLIENTS"

// clientsJob is what a client process does: open N sessions to Target.
type clientsJob struct {
	Target target
	N      int
	Prefix string
}

// TestClusterBenchClients is not a test: it is the client process of the
// benchmarks that keep their clients out of the measured process
// (BenchmarkClusterConnections, BenchmarkClusterFanout re-run this binary
// with clientsEnv set). It opens the sessions and prints "ready"; then for
// each line "V" on its standard input it waits until every session has
// version V and prints "V" and the time (UnixNano) each got it, or
// "timeout V"; it ends when its standard input closes.
func TestClusterBenchClients(t *testing.T) {
	spec := os.Getenv(clientsEnv)
	if spec == "" {
		t.Skip("the client process of BenchmarkClusterConnections and BenchmarkClusterFanout")
	}
	var job clientsJob
	if err := json.Unmarshal([]byte(spec), &job); err != nil {
		t.Fatal(err)
	}
	var subs []*benchConn
	for j := range job.N {
		subs = append(subs, dialAt(t, job.Target, fmt.Sprintf("%s-%d", job.Prefix, j)))
	}
	fmt.Println("ready")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		v, err := strconv.ParseUint(sc.Text(), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		line := []string{strconv.FormatUint(v, 10)}
		for _, c := range subs {
			if err := c.wait(ctx, func() bool { return c.version.Load() >= v }); err != nil {
				line = []string{"timeout", strconv.FormatUint(v, 10)}
				break
			}
			line = append(line, strconv.FormatInt(c.at.Load(), 10))
		}
		cancel()
		fmt.Println(strings.Join(line, " "))
	}
}

// clientProc is a running client process.
type clientProc struct {
	stdin io.WriteCloser
	lines chan string // its standard output, line by line; closed at its end
}

// clients starts a client process holding n sessions to d's node i, and
// returns once they are all welcomed. Cleanup ends it.
func clients(tb testing.TB, d *deployment, i, n int, prefix string) *clientProc {
	tb.Helper()
	exe, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	spec, err := json.Marshal(clientsJob{Target: target{Addr: d.addrs[i], Fingerprint: d.srvs[i].Fingerprint(), Version: d.auth.Version(), Checksum: d.auth.Checksum()}, N: n, Prefix: prefix})
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run", "^TestClusterBenchClients$", "-test.count", "1")
	cmd.Env = append(os.Environ(), clientsEnv+"="+string(spec))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	p := &clientProc{stdin: stdin, lines: make(chan string, 16)}
	done := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		done <- cmd.Wait()
	}()
	tb.Cleanup(func() {
		stdin.Close()
		go func() { // drain, so that the reader can finish
			for range p.lines {
			}
		}()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	select {
	case l, ok := <-p.lines:
		if !ok || l != "ready" {
			out := []string{l}
			for l := range p.lines { // its test log, up to its end
				out = append(out, l)
			}
			tb.Fatalf("the client process failed:\n%s\n%s", strings.Join(out, "\n"), stderr.String())
		}
	case <-time.After(2 * time.Minute):
		tb.Fatalf("the client process did not open %d sessions in time", n)
	}
	return p
}

// ask asks p for the times its sessions got version v.
func (p *clientProc) ask(tb testing.TB, v uint64) {
	tb.Helper()
	if _, err := fmt.Fprintln(p.stdin, v); err != nil {
		tb.Fatal(err)
	}
}

// got reads p's answer to ask(v): when each of its sessions got it.
func (p *clientProc) got(tb testing.TB, v uint64) []time.Time {
	tb.Helper()
	select {
	case l, ok := <-p.lines:
		f := strings.Fields(l)
		if !ok || len(f) == 0 || f[0] != strconv.FormatUint(v, 10) {
			tb.Fatalf("the client process answered %q for version %d", l, v)
		}
		ts := make([]time.Time, 0, len(f)-1)
		for _, x := range f[1:] {
			n, err := strconv.ParseInt(x, 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			ts = append(ts, time.Unix(0, n))
		}
		return ts
	case <-time.After(time.Minute):
		tb.Fatalf("the client process did not answer for version %d", v)
		return nil
	}
}

// BenchmarkClusterConnections: what a connection costs the node that
// serves it. Each iteration adds 100 subscribed sessions (a QUIC
// connection each, held by a client process, so that this process has only
// the server ends) to a single node, to the owner of a three-node cluster
// and to a follower of that cluster, in turn; after each step it reads this
// process's RSS (after a collection that returns freed memory), its
// goroutines and the CPU of an idle window, and charges the difference from
// the reading before to that step, with the CPU its connects and Hellos
// took. The first iteration warms pools and caches (and opens the
// follower): the metrics are per connection over the later ones. The fixed
// cost of the deployments themselves (the RSS and idle CPU of a single
// node, and of three cluster nodes holding one open database) is logged
// first.
func BenchmarkClusterConnections(b *testing.B) {
	noLeaks(b)
	const step, idle = 100, 5 * time.Second
	idleCPU := func() float64 { // ms of CPU per second
		time.Sleep(time.Second) // let the last handshakes and the collection settle
		c0 := cpuTime()
		time.Sleep(idle)
		return ms(cpuTime()-c0) / idle.Seconds()
	}
	rss0, cpu0 := rssKiB(), idleCPU()
	single := singleNode(b, 8*step)
	rss1, cpu1 := rssKiB(), idleCPU()
	r3 := clusterOf(b, 3, 8*step)
	rss2, cpu2 := rssKiB(), idleCPU()
	b.Logf("fixed: the test process %d KiB RSS, idle %.2f ms CPU/s; a single node +%d KiB, +%.2f ms CPU/s idle; three cluster nodes (in one process, one open database) +%d KiB, +%.2f ms CPU/s idle",
		rss0, cpu0, rss1-rss0, cpu1-cpu0, rss2-rss1, cpu2-cpu1)
	// Where the sessions go: the owner of each, and a follower of the
	// cluster (its second node, which opens the database as a follower
	// on the first Hello).
	type where struct {
		name string
		d    *deployment
		node int
	}
	ws := []where{{"single", single, 0}, {"r3-owner", r3, 0}, {"r3-follower", r3, 1}}
	// A measurement of the process after an idle window; each step's cost
	// is the difference from the measurement just before it (the previous
	// step's, whichever deployment took it).
	type level struct {
		rss, goroutines int
		idle            float64
	}
	measure := func() level {
		l := level{idle: idleCPU()}
		l.rss, l.goroutines = rssKiB(), runtime.NumGoroutine() // after the idle window: what stays
		return l
	}
	type totals struct {
		conns, rss, goroutines int
		idle                   float64
		connect                time.Duration
	}
	tot := make([]totals, len(ws))
	prev := measure()
	b.Logf("both deployments, no connection: idle %.2f ms CPU/s, %d goroutines", prev.idle, prev.goroutines)
	b.ResetTimer()
	for n := range b.N {
		for i, w := range ws {
			c0 := cpuTime()
			clients(b, w.d, w.node, step, fmt.Sprintf("%s-%d", w.name, n))
			connect := cpuTime() - c0
			l := measure()
			b.Logf("%s, connections %d to %d: RSS %+d KiB, %+d goroutines, connect %.2f ms CPU each, idle %.2f ms CPU/s (%+.2f)",
				w.name, n*step, (n+1)*step, l.rss-prev.rss, l.goroutines-prev.goroutines, ms(connect)/step, l.idle, l.idle-prev.idle)
			if n > 0 { // the first hundred also warm pools and caches (and open the follower)
				t := &tot[i]
				t.conns += step
				t.rss += l.rss - prev.rss
				t.goroutines += l.goroutines - prev.goroutines
				t.idle += l.idle - prev.idle
				t.connect += connect
			}
			prev = l
		}
	}
	b.StopTimer()
	if b.N < 2 {
		return // only the warm step
	}
	for i, w := range ws {
		t := tot[i]
		k := float64(t.conns)
		b.ReportMetric(float64(t.rss)/k, w.name+"-KiB/conn")
		b.ReportMetric(float64(t.goroutines)/k, w.name+"-goroutines/conn")
		b.ReportMetric(float64(t.connect.Microseconds())/k, w.name+"-hello-cpu-µs")
		b.ReportMetric(t.idle*1000/k, w.name+"-idle-cpu-µs/s/conn")
	}
}

// BenchmarkClusterDatabases: what an open database costs a node. Each
// iteration opens 100 more databases on a single node and on the owner of
// a three-node cluster (AddDatabase, then open: in the cluster the lease is
// taken and version 1 appended), and reads the RSS, the goroutines, the
// time an open took (AddDatabase's write of the access file apart) and
// the CPU of 5 s idle after. An open database in a
// cluster holds its lease, renewed every TTL/3 (1 s) through the R3 lease
// bucket, for as long as the node's Owner runs: that renewal is its idle
// cost.
func BenchmarkClusterDatabases(b *testing.B) {
	noLeaks(b)
	const step, idle = 100, 5 * time.Second
	idleCPU := func() time.Duration {
		time.Sleep(time.Second) // let the opens' work settle
		c0 := cpuTime()
		time.Sleep(idle)
		return cpuTime() - c0
	}
	deps := []*deployment{singleNode(b, 1), clusterOf(b, 3, 1)}
	type totals struct {
		dbs, rss, goroutines int
		open, idle           time.Duration
	}
	tot := make([]totals, len(deps))
	ctx := bounded(b, 30*time.Minute)
	b.ResetTimer()
	for range b.N {
		for i, d := range deps {
			rssA, gA, idleA := rssKiB(), runtime.NumGoroutine(), idleCPU()
			for j := range step {
				if err := d.srvs[0].AddDatabase(ctx, fmt.Sprintf("t%d.db", tot[i].dbs+j), benchSecret); err != nil {
					b.Fatal(err)
				}
			}
			start := time.Now()
			for j := range step {
				if name := fmt.Sprintf("t%d.db", tot[i].dbs+j); d.srvs[0].Authority(name) == nil {
					b.Fatalf("%s: %s did not open", d.name, name)
				}
			}
			open := time.Since(start)
			rssB, gB, idleB := rssKiB(), runtime.NumGoroutine(), idleCPU()
			tot[i].dbs += step
			tot[i].rss += rssB - rssA
			tot[i].goroutines += gB - gA
			tot[i].open += open
			tot[i].idle += idleB - idleA
			b.Logf("%s at %d open databases: +%d KiB RSS, +%d goroutines, %.2f ms to open one, idle +%.2f ms CPU/s",
				d.name, tot[i].dbs, rssB-rssA, gB-gA, ms(open)/step, ms(idleB-idleA)/idle.Seconds())
		}
	}
	b.StopTimer()
	for i, d := range deps {
		t := tot[i]
		b.ReportMetric(float64(t.rss)/float64(t.dbs), d.name+"-KiB/db")
		b.ReportMetric(float64(t.goroutines)/float64(t.dbs), d.name+"-goroutines/db")
		b.ReportMetric(ms(t.open)/float64(t.dbs), d.name+"-open-ms")
		b.ReportMetric(float64(t.idle.Microseconds())/idle.Seconds()/float64(t.dbs), d.name+"-idle-cpu-µs/s/db")
	}
}
