package chaos

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	scluster "github.com/sqlrebase/sqlrebase/cluster"
	"github.com/sqlrebase/sqlrebase/internal/faultnet"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// leaseTTL is the cluster mode's lease TTL: a node that crashes holding
// the lease blocks the take-over this long (the tests of the cluster
// package use the same 2 s).
const leaseTTL = 2 * time.Second

// snapshotPolicy makes the owner snapshot (and trim the stream) every
// 10-25 versions, so that a run (a hundred versions or so: group commits
// gather the backlog) restores and follows from snapshots too, not only
// from the stream's start.
var snapshotPolicy = scluster.SnapshotPolicy{MinVersions: 10, MaxVersions: 25}

// TestChaosCluster is the suite on the cluster code path (issue 12): an
// embedded JetStream (one node, R1; three, R3, with SQLREBASE_CHAOS_R3=1),
// two or three sqlrebase nodes in this
// process, each with its own cluster.Owner (the VersionLog, LocalCache and
// Follower) that runs forwarded pushes on its server, all presenting one
// certificate. Each replica connects to its node through that node's
// relay, with the other nodes' relays as alternates. The faults are the
// single-node suite's (loss, duplication, reordering, partitions, replica
// restarts, disk faults, the final cut and its offline backlog; the
// server's full disk is the first node's) and, in place of the server's
// restarts, node restarts on the same directory: the owner's node mostly,
// which either releases its lease (a clean stop) or crashes holding it, so
// that the others wait out the TTL. At the end every confirmed mutation is
// counted exactly once, every replica is at the stream's tail (version and
// checksum), every node serves that tail, exactly one node owns, and the
// stock sqlite3 CLI finds each node's file (the owner's db.sqlite, a
// follower's follow.sqlite) intact, with the rows and checksum of the tail.
func TestChaosCluster(t *testing.T) {
	runSeeds(t, "TestChaosCluster", clusterMode(chooseMode(t)), runClusterSeed)
}

// clusterMode sizes the cluster mode from the single-node one: fewer
// seeds, each costs more (a JetStream, two or three servers, waits for a
// lease TTL).
func clusterMode(m mode) mode {
	switch m.name {
	case "short":
		m.seeds = 1
	case "default":
		m.seeds = 2
		m.runFor = 4 * time.Second
		m.perReplica = 48
		m.backlog = 200
	}
	return m
}

// clusterPlan is what a seed decides of the cluster beyond the plan: how
// many nodes, and who stops how at each of the plan's server restarts.
type clusterPlan struct {
	nodes int
	stops []nodeStop // one per plan.serverRestarts
	// r3: the JetStream is three NATS nodes with everything replicated
	// three times (each sqlrebase node on its own NATS node, modulo), not
	// one node R1. Only with SQLREBASE_CHAOS_R3=1 (see r3Settle).
	r3 bool
}

// nodeStop is one node restart.
type nodeStop struct {
	owner   bool // stop whichever node owns the database then (else node)
	node    int
	release bool // a clean stop (the lease released), or a crash holding it
}

func makeClusterPlan(seed uint64, p plan) clusterPlan {
	rng := rand.New(rand.NewPCG(seed, seed^0xc1057e5))
	cp := clusterPlan{nodes: 2 + rng.IntN(2)}
	for range p.serverRestarts {
		cp.stops = append(cp.stops, nodeStop{owner: rng.IntN(3) > 0, node: rng.IntN(cp.nodes), release: rng.IntN(2) == 0})
	}
	cp.r3 = os.Getenv("SQLREBASE_CHAOS_R3") == "1"
	return cp
}

// r3Settle is how long a new 3-node JetStream is left alone before the
// nodes start. Without it, in about one seed of six the first follower,
// whose ordered consumer was made in the JetStream's first second, got
// nothing for the whole run (its copy at version 0, every Hello refused;
// seeds 6145475932284165162, 8284188237866198538); with it, none in 12
// seeds. Not understood (a stream leader election settling under the
// consumer?), so R3 stays opt-in; the cluster package's follower is the
// place to find it.
const r3Settle = 3 * time.Second

// replicas is the JetStream replication of the stream, leases and
// snapshots.
func (cp clusterPlan) replicas() int {
	if cp.r3 {
		return 3
	}
	return 1
}

// startJetStream starts the plan's JetStream in dir: one node, or three
// on loopback routes.
func startJetStream(t *testing.T, ctx context.Context, dir string, r3 bool) []*scluster.Node {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if !r3 {
		n, err := scluster.StartNode(ctx, scluster.NodeConfig{Name: "nats", Dir: filepath.Join(dir, "nats"), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(n.Shutdown)
		return []*scluster.Node{n}
	}
	var ports []int
	var ls []net.Listener
	for range 3 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	var routes []string
	for i, l := range ls {
		l.Close()
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[i]))
	}
	nodes := make([]*scluster.Node, 3)
	errs := make(chan error, 3)
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for i := range nodes {
		go func() {
			n, err := scluster.StartNode(sctx, scluster.NodeConfig{Name: fmt.Sprintf("nats%d", i), Dir: filepath.Join(dir, fmt.Sprintf("nats%d", i)),
				Logger: quiet, ClusterName: "chaos", ClusterPort: ports[i], Routes: routes})
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

// clusterRun is one seed's cluster: the JetStream, the nodes and, in c,
// the replicas and the machinery the single-node mode drives them with.
type clusterRun struct {
	c       *cluster
	cp      clusterPlan
	nats    []*scluster.Node // node i's is nats[i % len]
	nodes   []*node
	certDir string
	start   time.Time // of the run, under faults
	tally   *tally
	// tailVersion is the stream's last version at the check.
	tailVersion uint64
	leases      *scluster.Leases // on the test's own connection: who holds the lease
	// forwarded counts the pushes the owners ran for the other nodes.
	forwarded atomic.Int64
}

// tallied are the log lines that show the cluster code path at work,
// counted for the seed's summary.
var tallied = []string{
	"following the database: another node owns it",
	"rebuilding the follower's copy from the log",
	"took the database over",
	"restored database from the stream",
	"snapshot stored, stream trimmed behind it",
	"forward pushes to the owner",
}

// tally counts the tallied log lines on their way to the ring.
type tally struct {
	next io.Writer
	mu   sync.Mutex
	n    map[string]int
}

func (t *tally) Write(p []byte) (int, error) {
	t.mu.Lock()
	for _, s := range tallied {
		t.n[s] += bytes.Count(p, []byte(s))
	}
	t.mu.Unlock()
	return t.next.Write(p)
}

func (t *tally) count(s string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n[s]
}

// node is one sqlrebase node; its server listens on the same address in
// every life, behind its own relay.
type node struct {
	r     *clusterRun
	i     int
	dir   string
	addr  string
	relay *faultnet.Relay

	mu    sync.Mutex // guards life and child
	life  *nodeLife  // the node's life in this process, or nil
	child *child     // its life in a child process, or nil
}

// nodeLife is one life of a node: its own NATS connection, Owner and server.
type nodeLife struct {
	nc    *nats.Conn
	owner *scluster.Owner
	srv   *server.Server
}

func runClusterSeed(t *testing.T, seed uint64, m mode) time.Duration {
	p := makePlan(seed, m)
	cp := makeClusterPlan(seed, p)
	t.Logf("plan: %d nodes, JetStream R%d; profile %+v; partitions %+v (of each node's clients); replica restarts before mutation %v; node stops %+v at %+v; disk faults %+v; node 0's disk full %+v; shared transport %v",
		cp.nodes, cp.replicas(), p.profile, p.partitions, p.restartAt, cp.stops, p.serverRestarts, p.diskFaults, p.serverFull, p.sharedTransport)
	c := &cluster{t: t, seed: seed, plan: p, reg: registry(t), dir: t.TempDir(), logs: newRing(400)}
	tl := &tally{next: c.logs, n: map[string]int{}}
	c.childLog = tl
	c.log = slog.New(slog.NewTextHandler(tl, &slog.HandlerOptions{Level: slog.LevelInfo}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("seed %d failed; the last log lines:\n%s", seed, c.logs.String())
		}
	})
	ctx := context.Background()
	cr := &clusterRun{c: c, cp: cp, certDir: filepath.Join(c.dir, "cert"), tally: tl}
	c.describe = cr.describe
	c.remote = cr.remote
	if err := os.MkdirAll(cr.certDir, 0o755); err != nil {
		t.Fatal(err)
	}

	cr.nats = startJetStream(t, ctx, c.dir, cp.r3)
	if cp.r3 {
		time.Sleep(r3Settle)
	}
	nc, js, err := cr.nats[0].Connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	if _, cr.leases, _, err = openStreams(ctx, nc, js, cp.replicas()); err != nil {
		t.Fatal(err)
	}

	for i := range cp.nodes {
		n := &node{r: cr, i: i, dir: filepath.Join(c.dir, fmt.Sprintf("node%d", i)), addr: "127.0.0.1:0"}
		if i == 0 && p.serverFull.long > 0 {
			if disk, err := smallDisk(t, "64m"); err != nil {
				t.Logf("node 0's disk will not fill: %v", err)
			} else {
				c.serverDisk = disk
				n.dir = filepath.Join(disk, "node0")
			}
		}
		// Node 0 starts first: its AddDatabase opens the database, so it
		// owns; the others follow it.
		if err := n.start(ctx, true, false); err != nil {
			t.Fatal(err)
		}
		relay, err := faultnet.Listen(faultnet.Config{Target: n.addr, Seed: seed + uint64(i), Logger: c.log.With("relay", i)})
		if err != nil {
			t.Fatal(err)
		}
		n.relay = relay
		t.Cleanup(func() { relay.Close() })
		cr.nodes = append(cr.nodes, n)
	}
	t.Cleanup(func() {
		for _, n := range cr.nodes {
			n.stop(true)
		}
	})
	c.fp = cr.nodes[0].life.srv.Fingerprint()
	if p.sharedTransport {
		c.tr = replica.NewTransport(replica.TransportOptions{Logger: c.log})
	}
	for i := range p.replicas {
		w := &worker{c: c, i: i, path: filepath.Join(c.dir, fmt.Sprintf("r%d.db", i)), faults: vfs.NewFaults(seed + uint64(i))}
		for _, df := range p.diskFaults {
			if df.replica == i && df.full {
				if disk, err := smallDisk(t, "32m"); err != nil {
					t.Logf("replica %d's disk will not fill for real: %v", i, err)
				} else {
					w.disk, w.path = disk, filepath.Join(disk, fmt.Sprintf("r%d.db", i))
				}
			}
		}
		w.open(ctx)
		c.reps = append(c.reps, w)
		c.bounded("replica connects", 20*time.Second, func(ctx context.Context) error { return w.r.WaitConnected(ctx) })
	}
	t.Cleanup(func() {
		for _, w := range c.reps {
			w.close()
		}
		if c.tr != nil {
			c.tr.Close()
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	// Faults on, on every relay (each has its own clock), then the run.
	start := time.Now()
	cr.start = start
	var lastUntil time.Duration
	for _, n := range cr.nodes {
		base := n.relay.Elapsed()
		prof := p.profile
		for _, q := range p.partitions {
			q.From += base
			q.Until += base
			prof.Partitions = append(prof.Partitions, q)
			lastUntil = max(lastUntil, q.Until-base)
		}
		if err := n.relay.SetProfile(prof); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := func() time.Duration { return time.Since(start) }
	var wg sync.WaitGroup
	for _, w := range c.reps {
		wg.Add(1)
		go func() { defer wg.Done(); w.run(ctx) }()
	}
	c.diskFaults(&wg, elapsed)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for k, rs := range p.serverRestarts {
			time.Sleep(rs.at - elapsed())
			cr.restart(ctx, cp.stops[k], rs.down, rs.child)
		}
	}()
	c.boundedWait("the run", 10*m.runFor+60*time.Second, &wg)
	if t.Failed() {
		t.FailNow()
	}
	// The checks need every node in this process: a life in a child
	// process ends with one more crash.
	for _, n := range cr.nodes {
		if n.inChild() {
			cr.restart(ctx, nodeStop{node: n.i}, 0, false)
		}
	}
	if d := lastUntil - elapsed(); d > 0 {
		time.Sleep(d)
	}
	var relays []*faultnet.Relay
	for _, n := range cr.nodes {
		relays = append(relays, n.relay)
	}
	converged := c.finalCut(ctx, m, relays)
	cr.check(ctx)

	var lost, clients int
	for _, n := range cr.nodes {
		st := n.relay.Stats()
		lost += int(st.Lost[0] + st.Lost[1])
		clients += st.Clients
	}
	if p.profile.Loss > 0.02 && lost == 0 {
		t.Errorf("loss %.3f, yet the relays lost no packet", p.profile.Loss)
	}
	c.logs.mu.Lock()
	noSpace, vague := c.logs.noSpace, c.logs.vague
	c.logs.mu.Unlock()
	if len(vague) > 0 {
		t.Errorf("disk errors said vaguely (a full disk must say \"no space left on device\"):\n%s", strings.Join(vague, "\n"))
	}
	if c.serverDisk != "" {
		t.Logf("%d log lines said \"no space left on device\"", noSpace)
	}
	t.Logf("in sync %v after a %v cut healed (%d mutations made offline by each replica); %d client addresses over %d relays, %d packets lost",
		converged.Round(time.Millisecond), p.finalCut, m.backlog, clients, len(relays), lost)
	// The cluster code path was the one hammered: replicas on the nodes
	// that did not own had their pushes forwarded.
	if cr.forwarded.Load() == 0 {
		t.Errorf("no push was forwarded to an owner")
	}
	var b strings.Builder
	for _, s := range tallied {
		fmt.Fprintf(&b, "; %q %d", s, tl.count(s))
	}
	t.Logf("%d versions; %d pushes forwarded to an owner%s", cr.tailVersion, cr.forwarded.Load(), b.String())
	return converged
}

// remote is replica w's Remote: its node (w.i mod the nodes) through that
// node's relay, the other nodes' relays as alternates.
func (cr *clusterRun) remote(w *worker) *replica.Remote {
	k := len(cr.nodes)
	home := w.i % k
	rm := &replica.Remote{Addr: cr.nodes[home].relay.Addr(), Database: dbName, Credential: secret, Fingerprint: cr.c.fp}
	for j := 1; j < k; j++ {
		rm.Alternates = append(rm.Alternates, cr.nodes[(home+j)%k].relay.Addr())
	}
	return rm
}

// openLife opens a node's life on nc, its own NATS connection: the log,
// the leases and the snapshots, an Owner named node that snapshots and
// runs forwarded pushes (counting them in forwarded, if set) on a server
// on dir that presents the certificate in certDir. In this process and in
// a child.
func openLife(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, replicas int, node, dir, certDir string, reg *mutators.Registry, log *slog.Logger, forwarded *atomic.Int64) (*nodeLife, error) {
	l, ls, snaps, err := openStreams(ctx, nc, js, replicas)
	if err != nil {
		nc.Close()
		return nil, err
	}
	o := scluster.NewOwner(l, ls, snaps, node, log)
	srv, err := server.Open(ctx, server.Config{
		Dir: dir, Mutators: reg, Logger: log, VersionLog: o,
		CertFile: filepath.Join(certDir, "cert.pem"), KeyFile: filepath.Join(certDir, "key.pem"),
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		},
	})
	life := &nodeLife{nc: nc, owner: o, srv: srv}
	if err != nil {
		life.srv = nil
		life.end(false)
		return nil, fmt.Errorf("server open: %w", err)
	}
	o.SetSnapshotSource(srv, snapshotPolicy)
	o.SetForwardHandler(func(ctx context.Context, db string, pushes []server.ForwardedPush) ([]server.ForwardedResult, error) {
		if forwarded != nil {
			forwarded.Add(int64(len(pushes)))
		}
		return srv.ServeForwarded(ctx, db, pushes)
	})
	return life, nil
}

// openStreams opens the log, the leases and the snapshots, replicated
// replicas times, retrying (for at most 30 s) while a 3-node JetStream
// elects their leaders.
func openStreams(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, replicas int) (*scluster.Log, *scluster.Leases, *scluster.Snapshots, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := scluster.OpenLog(ctx, nc, js, scluster.LogConfig{Replicas: replicas})
		var ls *scluster.Leases
		var snaps *scluster.Snapshots
		if err == nil {
			ls, err = scluster.OpenLeases(ctx, js, scluster.LeaseConfig{Replicas: replicas, TTL: leaseTTL})
		}
		if err == nil {
			snaps, err = scluster.OpenSnapshots(ctx, js, scluster.SnapshotConfig{Replicas: replicas})
		}
		if err == nil {
			return l, ls, snaps, nil
		}
		if time.Now().After(deadline) {
			return nil, nil, nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// listen serves the life's server on addr, retrying while the port is
// still taken by the previous life.
func (l *nodeLife) listen(ctx context.Context, addr string) (string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		a, err := l.srv.Listen(ctx, addr)
		if err == nil {
			return a, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("listen %s: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// start starts a life of the node on its directory, on its address (the
// first: any port; AddDatabase): in this process, or in a child.
func (n *node) start(ctx context.Context, first, inChild bool) error {
	c := n.r.c
	if inChild {
		ch, err := c.spawnChild(childConfig{Dir: n.dir, Addr: n.addr, NATS: n.natsNode().ClientURL(), Replicas: n.r.cp.replicas(), Node: n.name(), CertDir: n.r.certDir})
		if err != nil {
			return fmt.Errorf("node %d: %w", n.i, err)
		}
		n.mu.Lock()
		n.child = ch
		n.mu.Unlock()
		return nil
	}
	nc, js, err := n.natsNode().Connect()
	if err != nil {
		return fmt.Errorf("node %d: connect to NATS: %w", n.i, err)
	}
	life, err := openLife(ctx, nc, js, n.r.cp.replicas(), n.name(), n.dir, n.r.certDir, c.reg, c.log.With("node", n.i), &n.r.forwarded)
	if err != nil {
		return fmt.Errorf("node %d: %w", n.i, err)
	}
	if first {
		if err := life.srv.AddDatabase(ctx, dbName, secret); err != nil {
			life.end(true)
			return fmt.Errorf("node %d: %w", n.i, err)
		}
	}
	a, err := life.listen(ctx, n.addr)
	if err != nil {
		life.end(true)
		return fmt.Errorf("node %d: %w", n.i, err)
	}
	n.mu.Lock()
	n.addr, n.life = a, life
	n.mu.Unlock()
	return nil
}

// natsNode is the NATS node the node connects to.
func (n *node) natsNode() *scluster.Node { return n.r.nats[n.i%len(n.r.nats)] }

// name is the node's name: its lease tokens start with it.
func (n *node) name() string { return fmt.Sprintf("node%d", n.i) }

// runClusterChild runs a cluster node's life in a child process (as
// runChild does the single server's) until its stdin closes or it is
// killed.
func runClusterChild(cfg childConfig) int {
	reg, err := newRegistry()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("node", cfg.Node, "child", true)
	nc, err := nats.Connect(cfg.NATS, nats.Name("chaos-"+cfg.Node))
	var js jetstream.JetStream
	if err == nil {
		js, err = jetstream.New(nc)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	life, err := openLife(ctx, nc, js, cfg.Replicas, cfg.Node, cfg.Dir, cfg.CertDir, reg, log, nil)
	if err == nil {
		_, err = life.listen(ctx, cfg.Addr)
		if err != nil {
			life.end(true)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	life.end(true)
	return 0
}

// end ends a life: a clean stop closes the server, then the Owner (which
// releases the leases), then the NATS connection; a crash closes the
// connection first, so that the lease stays held until its TTL runs out
// and nothing more reaches the stream, then the server and the Owner.
func (l *nodeLife) end(release bool) {
	if !release {
		l.nc.Close()
	}
	if l.srv != nil {
		l.srv.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l.owner.Close(ctx)
	l.nc.Close()
}

// stop ends the node's life, if it has one; one in a child process ends
// with SIGKILL (a crash, whatever it was writing, the lease held) whatever
// release says.
func (n *node) stop(release bool) {
	n.mu.Lock()
	l, ch := n.life, n.child
	n.life, n.child = nil, nil
	n.mu.Unlock()
	if l != nil {
		l.end(release)
	}
	if ch != nil {
		ch.kill()
	}
}

// inChild reports whether the node's life is in a child process.
func (n *node) inChild() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.child != nil
}

// owns reports whether the node is up and owns the database.
func (n *node) owns() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.life != nil && n.life.owner.Owns(dbName)
}

// restart stops a node as s says, and starts it again on its directory
// after down, in a child process if inChild, as a supervisor would: until
// it starts.
func (cr *clusterRun) restart(ctx context.Context, s nodeStop, down time.Duration, inChild bool) {
	c := cr.c
	n := cr.nodes[s.node]
	owner := cr.holder(ctx)
	if s.owner && owner != nil {
		n = owner
	}
	c.t.Logf("node %d (owner %v, in a child %v) stops at %v (lease released %v), down %v, next life in a child %v",
		n.i, n == owner, n.inChild(), time.Since(cr.start).Round(time.Millisecond), s.release && !n.inChild(), down.Round(time.Millisecond), inChild)
	c.log.Info("chaos: node stops", "node", n.i, "release", s.release)
	n.stop(s.release)
	time.Sleep(down)
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := n.start(ctx, false, inChild)
		if err == nil {
			c.log.Info("chaos: node started", "node", n.i, "child", inChild)
			return
		}
		if time.Now().After(deadline) {
			c.t.Errorf("node %d did not start again in 30 s: %v", n.i, err)
			return
		}
		c.t.Logf("node %d did not start (will retry): %v", n.i, err)
		if msg := err.Error(); strings.Contains(msg, "disk I/O error") && !strings.Contains(msg, "no space left on device") {
			c.t.Errorf("node %d's start failed on a full disk without saying so: %v", n.i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// holder is the node that holds the database's lease now (in this process
// or a child), or nil.
func (cr *clusterRun) holder(ctx context.Context) *node {
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	tok, _, err := cr.leases.Holder(hctx, dbName)
	if err != nil {
		cr.c.t.Logf("the lease's holder: %v", err)
		return nil
	}
	for _, n := range cr.nodes {
		if strings.HasPrefix(tok, n.name()+"-") {
			return n
		}
	}
	return nil
}

// describe describes the nodes for a failure message.
func (cr *clusterRun) describe() string {
	var b strings.Builder
	for _, n := range cr.nodes {
		n.mu.Lock()
		up := n.life != nil
		n.mu.Unlock()
		fmt.Fprintf(&b, "node %d: up %v, in a child %v, owns %v; relay at %v: %+v\n", n.i, up, n.inChild(), n.owns(), n.relay.Elapsed(), n.relay.Stats())
	}
	return b.String()
}

// tail is the version and checksum after the last version in the stream,
// read on a connection of its own.
func (cr *clusterRun) tail(ctx context.Context) (version, checksum uint64) {
	t := cr.c.t
	nc, js, err := cr.nats[0].Connect()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	l, err := scluster.OpenLog(ctx, nc, js, scluster.LogConfig{Replicas: cr.cp.replicas()})
	if err != nil {
		t.Fatal(err)
	}
	e, err := l.Last(ctx, dbName)
	if err != nil || len(e.Rec) < 8 {
		t.Fatalf("the stream's tail: %+v, %v", e, err)
	}
	ev, err := protocol.DecodeEncodedVersion(e.Rec[8:], protocol.DefaultLimits)
	if err != nil {
		t.Fatalf("the stream's tail: %v", err)
	}
	return e.Version, ev.PostChecksum
}

// check verifies the invariants once every replica has synced.
func (cr *clusterRun) check(ctx context.Context) {
	c := cr.c
	t := c.t
	want := c.settled(ctx)
	wantRows := format(want)
	tv, tsum := cr.tail(ctx)
	cr.tailVersion = tv

	// Exactly one node owns, and its file holds the confirmed rows.
	var owner *node
	for _, n := range cr.nodes {
		if n.owns() {
			if owner != nil {
				t.Errorf("nodes %d and %d both own the database", owner.i, n.i)
			}
			owner = n
		}
	}
	if owner == nil {
		t.Fatalf("no node owns the database\n%s", c.state())
	}
	auth := owner.life.srv.Authority(dbName)
	if auth == nil {
		t.Fatal("the owner has no authority")
	}
	if got := rows(t, "owner", func(q string) (*sql.Rows, error) { return auth.Query(ctx, q) }); got != wantRows {
		t.Errorf("the owner's rows %s, want %s (exact counts of the confirmed mutations)", got, wantRows)
	}
	if auth.Version() != tv || auth.Checksum() != tsum {
		t.Errorf("the owner (node %d) at %d/%016x, the stream's tail %d/%016x", owner.i, auth.Version(), auth.Checksum(), tv, tsum)
	}

	// Every replica at the stream's tail, with the confirmed rows.
	deadline := time.Now().Add(20 * time.Second)
	for _, w := range c.reps {
		for {
			st := w.r.Status()
			if st.Version == tv && st.Checksum == tsum && st.Pending == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("replica %d at %+v; the stream's tail %d/%016x", w.i, st, tv, tsum)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if got := rows(t, fmt.Sprintf("replica %d", w.i), func(q string) (*sql.Rows, error) { return w.r.DB().QueryContext(ctx, q) }); got != wantRows {
			t.Errorf("replica %d rows %s, want %s", w.i, got, wantRows)
		}
	}
	for _, w := range c.reps {
		w.close()
	}

	// Every node serves the tail: a new replica on each, straight to its
	// server, reaches the tail's version and checksum.
	for _, n := range cr.nodes {
		r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "probe.db"), replica.Options{Mutators: c.reg, Logger: c.log.With("probe", n.i),
			Remote: &replica.Remote{Addr: n.addr, Database: dbName, Credential: secret, Fingerprint: c.fp}})
		if err != nil {
			t.Errorf("probe of node %d: %v", n.i, err)
			continue
		}
		c.bounded(fmt.Sprintf("probe of node %d", n.i), 20*time.Second, func(ctx context.Context) error {
			for {
				if st := r.Status(); st.Version == tv {
					if st.Checksum != tsum {
						return fmt.Errorf("at %d/%016x, the tail's checksum %016x", st.Version, st.Checksum, tsum)
					}
					return nil
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("at %+v, the tail %d: %w", r.Status(), tv, ctx.Err())
				case <-time.After(10 * time.Millisecond):
				}
			}
		})
		r.Close()
	}

	// Each node's file, read by the stock sqlite3 CLI once the nodes
	// stopped: intact, the confirmed rows, the tail's checksum.
	var files []string
	for _, n := range cr.nodes {
		name := "follow.sqlite"
		if n == owner {
			name = "db.sqlite"
		}
		files = append(files, filepath.Join(n.dir, "dbs", dbName, name))
	}
	for _, n := range cr.nodes {
		n.stop(true)
	}
	for i, file := range files {
		out, err := exec.Command("sqlite3", file, "PRAGMA integrity_check",
			"SELECT group_concat(name || '=' || count, ',') FROM (SELECT name, count FROM Categories ORDER BY name)").CombinedOutput()
		if err != nil {
			t.Errorf("sqlite3 %s: %v\n%s", file, err, out)
			continue
		}
		if got, w := strings.TrimSpace(string(out)), "ok\n"+wantRows; got != w {
			t.Errorf("the sqlite3 CLI reads node %d's %s as\n%s\nwant\n%s", i, filepath.Base(file), got, w)
		}
		if fs := fileChecksum(t, file); fs != tsum {
			t.Errorf("node %d's %s (checkpointed by the CLI) has checksum %016x; the stream's tail %016x", i, filepath.Base(file), fs, tsum)
		}
	}
}
