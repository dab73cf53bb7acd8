package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/cluster"
	"github.com/sqlrebase/sqlrebase/internal/relay"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/wal"
)

// The multi-node tests (docs/CLUSTER.md, "Failure and partition
// behaviour"): `sqlrebase serve --cluster` nodes as processes of the built
// binary, and replicas as this test binary re-executed as cluster workers
// (clusterWorkerEnv set), each mutating its own row and printing a line for
// every confirmation, so that the test sees, while it kills nodes, when
// mutations are acknowledged again.

const clusterWorkerEnv = "SQLREBASE_CLUSTER_WORKER" // JSON clusterWorkerConfig: be a cluster worker

// clusterWorkerConfig is one cluster worker's job.
type clusterWorkerConfig struct {
	Dir, Addr, Token, Fingerprint, Name string
	// Alternates are the other nodes (replica.Remote.Alternates).
	Alternates []string
	// Pace is the wait between two mutations (with up to as much again of
	// jitter); 0: make none, only sync to the server's version and report.
	Pace time.Duration
	// Stop is a file: once it exists the worker makes no more mutations,
	// waits until every one it made is confirmed, syncs and reports.
	Stop string
	// HandshakeTimeout bounds an attempt on a dead node.
	HandshakeTimeout time.Duration
}

// clusterWorkerReport is the JSON line a cluster worker prints last.
type clusterWorkerReport struct {
	Made, Confirmed   int
	Count             int64 // the worker's own row
	Version, Checksum uint64
	Pending           int
	Node              string
	Rows              string
}

// runClusterWorker is a cluster worker's process: it mutates at cfg.Pace
// until cfg.Stop exists, printing "ack UNIXNANO" as each mutation is
// confirmed, then settles, syncs and prints its report.
func runClusterWorker(cfgJSON string) int {
	var cfg clusterWorkerConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	ctx := context.Background()
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	tr := replica.NewTransport(replica.TransportOptions{HandshakeTimeout: cfg.HandshakeTimeout})
	defer tr.Close()
	r, err := replica.Open(ctx, filepath.Join(cfg.Dir, "replica.db"), replica.Options{
		Mutators: demoRegistry(),
		Remote: &replica.Remote{Addr: cfg.Addr, Alternates: cfg.Alternates, Database: "demo", Credential: cfg.Token,
			Fingerprint: cfg.Fingerprint, Transport: tr},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 1
	}
	defer r.Close()
	var (
		out       sync.Mutex // one line at a time on stdout
		wg        sync.WaitGroup
		made      int
		confirmed int
		failed    error
	)
	waitCtx, cancelWaits := context.WithCancel(ctx)
	defer cancelWaits()
	for cfg.Pace > 0 {
		if _, err := os.Stat(cfg.Stop); err == nil {
			break
		}
		h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(cfg.Name, 1))
		if err != nil {
			fmt.Fprintln(os.Stderr, "mutate:", err)
			return 1
		}
		made++
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := h.Wait(waitCtx)
			at := time.Now().UnixNano()
			out.Lock()
			defer out.Unlock()
			if err != nil {
				failed = errors.Join(failed, fmt.Errorf("mutation %d: %w", h.ID, err))
				return
			}
			confirmed++
			fmt.Printf("ack %d\n", at)
		}()
		time.Sleep(cfg.Pace + rand.N(cfg.Pace))
	}
	// Every mutation made must be confirmed: a bounded wait.
	timer := time.AfterFunc(90*time.Second, cancelWaits)
	wg.Wait()
	timer.Stop()
	if failed != nil {
		fmt.Fprintln(os.Stderr, "confirm:", failed)
		return 1
	}
	sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	for first := true; first || r.Status().Pending > 0 || r.Status().Version < r.Status().ServerVersion; first = false {
		if err := r.Sync(sctx); err != nil {
			fmt.Fprintln(os.Stderr, "sync:", err, r.Status().LastError)
			return 1
		}
	}
	rows, err := queryRows(ctx, r.DB().QueryContext)
	if err != nil {
		fmt.Fprintln(os.Stderr, "rows:", err)
		return 1
	}
	var count int64
	if err := r.DB().QueryRowContext(ctx, "SELECT count FROM Categories WHERE name = ?", cfg.Name).Scan(&count); err != nil && !errors.Is(err, sql.ErrNoRows) {
		fmt.Fprintln(os.Stderr, "count:", err)
		return 1
	}
	st := r.Status()
	b, _ := json.Marshal(clusterWorkerReport{Made: made, Confirmed: confirmed, Count: count, Version: st.Version, Checksum: st.Checksum,
		Pending: st.Pending, Node: st.Node, Rows: rows})
	out.Lock()
	fmt.Println(string(b))
	out.Unlock()
	return 0
}

// syncBuffer is an io.Writer that a process writes to while the test
// reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// directRoute routes from one node to another's own route port.
func directRoute(nodes []*nodeProc, _, to int) string {
	return fmt.Sprintf("127.0.0.1:%d", nodes[to].route)
}

// nodeProc is one `serve --cluster` node of a test, which may be killed
// and started again on the same data directory and ports.
type nodeProc struct {
	name  string
	data  string
	quic  int // the QUIC port replicas dial
	route int // the NATS route port it listens on
	args  []string

	cmd     *exec.Cmd
	exited  chan struct{} // closed once cmd.Wait returned
	natsURL string        // its NATS client URL (a new port on every start)
	addr    string
	fp      string
	stderr  *syncBuffer
	logs    []string // the stderr of its earlier runs
}

// newClusterNodes makes n nodes' configurations: each routes to every
// other's route address (routeAddr(nodes, from, to): node to's own port,
// or a relay in front of it), with one certificate and key shared by all, so that one
// fingerprint pins them all.
func newClusterNodes(t *testing.T, dir string, n int, leaseTTL time.Duration, routeAddr func(nodes []*nodeProc, from, to int) string,
	advertise func(nodes []*nodeProc, i int) string) []*nodeProc {
	t.Helper()
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if _, _, err := protocol.LoadOrCreateCertificate(cert, key, []string{"127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	nodes := make([]*nodeProc, n)
	for i := range nodes {
		nodes[i] = &nodeProc{name: fmt.Sprintf("n%d", i+1), data: filepath.Join(dir, fmt.Sprintf("n%d", i+1)), quic: freeUDPPort(t), route: freeTCPPort(t)}
	}
	for i, nd := range nodes {
		var routes []string
		for j := range nodes {
			if j != i {
				routes = append(routes, routeAddr(nodes, i, j))
			}
		}
		nd.args = []string{"serve", "--data", nd.data, "--listen", fmt.Sprintf("127.0.0.1:%d", nd.quic), "--db", "demo:tok",
			"--cert", cert, "--key", key, "--cluster", "multi", "--node", nd.name,
			"--cluster-listen", fmt.Sprintf("127.0.0.1:%d", nd.route), "--routes", strings.Join(routes, ","),
			"--lease-ttl", leaseTTL.String()}
		if advertise != nil {
			nd.args = append(nd.args, "--cluster-advertise", advertise(nodes, i))
		}
		t.Cleanup(func() { nd.kill() })
	}
	t.Cleanup(func() {
		// SQLREBASE_NODE_LOGS=1 prints them after a pass too (to read a
		// fail-over's timeline).
		// After a failure NATS's own lines are left out unless it is set:
		// a test's output is cut to its head and tail in CI's report, and
		// hundreds of route errors during a partition pushed the nodes'
		// own lines out of it.
		all := os.Getenv("SQLREBASE_NODE_LOGS") != ""
		if t.Failed() || all {
			for _, n := range nodes {
				log := strings.Join(n.logs, "--- restart ---\n")
				if n.stderr != nil { // nil: it never started
					log += n.stderr.String()
				}
				note := ""
				if !all {
					var left int
					log, left = withoutNATSLines(log)
					note = fmt.Sprintf(" (%d lines of NATS's own left out; SQLREBASE_NODE_LOGS=1 prints them)", left)
				}
				t.Logf("%s's log%s:\n%s", n.name, note, log)
			}
		}
	})
	return nodes
}

// withoutNATSLines drops the lines of an embedded NATS server's own log
// (those with its nats= attribute) from a node's log, and counts them.
func withoutNATSLines(log string) (string, int) {
	var keep []string
	left := 0
	for _, l := range strings.SplitAfter(log, "\n") {
		if strings.Contains(l, " nats=") {
			left++
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, ""), left
}

func (n *nodeProc) running() bool {
	if n.cmd == nil {
		return false
	}
	select {
	case <-n.exited:
		return false
	default:
		return true
	}
}

// start starts the node's process and returns at once; the channel gets
// nil once it serves (its JetStream answers, which needs a quorum of the
// cluster up), or why not.
func (n *nodeProc) start(t *testing.T) <-chan error {
	t.Helper()
	if n.stderr != nil {
		n.logs = append(n.logs, n.stderr.String())
	}
	cmd := exec.Command(sqlrebaseBinary(t), n.args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	n.stderr = &syncBuffer{}
	cmd.Stderr = n.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n.cmd, n.exited = cmd, make(chan struct{})
	n.natsURL, n.addr, n.fp = "", "", ""
	ready := make(chan error, 1)
	exited := n.exited
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		cmd.Wait()
		close(exited)
	}()
	go func() {
		out := map[string]string{}
		for line := range lines {
			if k, v, ok := strings.Cut(line, ": "); ok && out["databases"] == "" {
				out[k] = v
				if k == "databases" {
					if f := strings.Fields(out["nats"]); len(f) > 0 {
						n.natsURL = f[0]
					}
					n.addr, n.fp = out["listening"], out["fingerprint"]
					ready <- nil
				}
			}
		}
		if out["databases"] == "" {
			ready <- fmt.Errorf("%s exited before serving", n.name)
		}
	}()
	return ready
}

// startAll starts nodes at once (a cluster node is ready only once a
// quorum is up) and waits, bounded, until each serves.
func startAll(t *testing.T, nodes ...*nodeProc) {
	t.Helper()
	var readies []<-chan error
	for _, n := range nodes {
		readies = append(readies, n.start(t))
	}
	for i := 0; i < len(readies); i++ {
		select {
		case err := <-readies[i]:
			if err != nil {
				t.Fatalf("%v:\n%s", err, nodes[i].stderr)
			}
		case <-time.After(90 * time.Second):
			t.Fatalf("%s did not serve within 90 s:\n%s", nodes[i].name, nodes[i].stderr)
		}
	}
}

// kill SIGKILLs the node and waits until it is gone.
func (n *nodeProc) kill() {
	if n.running() {
		n.cmd.Process.Signal(syscall.SIGKILL)
		<-n.exited
	}
}

// stop SIGTERMs the node: it closes its databases, releases its leases
// and leaves the cluster.
func (n *nodeProc) stop(t *testing.T) {
	t.Helper()
	if !n.running() {
		return
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(30 * time.Second):
		n.kill()
		t.Fatalf("%s did not stop within 30 s of SIGTERM:\n%s", n.name, n.stderr)
	}
	if code := n.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("%s exited %d on SIGTERM:\n%s", n.name, code, n.stderr)
	}
}

// owner returns the node that holds the database's lease, as the lease
// bucket reads through each live node's NATS in turn ("" if none does, or
// no node answered).
func owner(ctx context.Context, nodes []*nodeProc) string {
	o, _ := ownerRead(ctx, nodes)
	return o
}

// ownerRead is owner, and whether a majority of the nodes agreed on it.
// Each node is asked in turn, and the answer of a majority counts: a node
// that has just rejoined after a partition may still answer as the lease
// stream's leader it was, with the lease as it was then.
func ownerRead(ctx context.Context, nodes []*nodeProc) (string, bool) {
	votes := map[string]int{}
	for _, n := range nodes {
		if !n.running() || n.natsURL == "" {
			continue
		}
		if who, err := leaseHolder(ctx, n.natsURL); err == nil {
			name, _, _ := strings.Cut(who, "-")
			if votes[name]++; votes[name] > len(nodes)/2 {
				return name, true
			}
		}
	}
	return "", false
}

// leaseHolder reads the holder token of the demo database's lease through
// the NATS at url. It asks the lease stream's leader (a message get, not a
// direct get, which any replica answers: a node that rejoins after a
// partition would answer with the lease as it was before it).
func leaseHolder(ctx context.Context, url string) (string, error) {
	nc, err := nats.Connect(url, nats.Timeout(2*time.Second), nats.MaxReconnects(0))
	if err != nil {
		return "", err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, "KV_"+cluster.DefaultLeaseBucket)
	if err != nil {
		return "", err
	}
	m, err := st.GetLastMsgForSubject(ctx, "$KV."+cluster.DefaultLeaseBucket+".demo")
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	// A release is a delete marker; an expired lease leaves a marker too.
	if op := m.Header.Get("KV-Operation"); op == "DEL" || op == "PURGE" || m.Header.Get("Nats-Marker-Reason") != "" {
		return "", nil
	}
	return string(m.Data), nil
}

// waitOwner waits, bounded, until the lease holder is one of want (any
// node when want is empty) and returns it.
func waitOwner(t *testing.T, nodes []*nodeProc, bound time.Duration, want ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	for {
		o := owner(ctx, nodes)
		if o != "" && (len(want) == 0 || slices.Contains(want, o)) {
			return o
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no owner among %v within %v (last read: %q)", want, bound, o)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// streamLeaders names the leaders of the version stream and the lease
// bucket's stream, as the first running node answers, for the log: a kill
// of a node that leads one costs a Raft election (4-9 s in nats-server)
// before the group takes writes again.
func streamLeaders(nodes []*nodeProc) string {
	for _, n := range nodes {
		if !n.running() || n.natsURL == "" {
			continue
		}
		nc, err := nats.Connect(n.natsURL, nats.Timeout(2*time.Second), nats.MaxReconnects(0))
		if err != nil {
			continue
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		var out []string
		for _, name := range []string{cluster.DefaultStream, "KV_" + cluster.DefaultLeaseBucket} {
			leader := "?"
			if st, err := js.Stream(ctx, name); err == nil && st.CachedInfo().Cluster != nil {
				leader = st.CachedInfo().Cluster.Leader
			}
			out = append(out, name+"="+leader)
		}
		return strings.Join(out, " ")
	}
	return "unknown"
}

// waitLeaseFrom waits, bounded, until the lease is no longer held by the
// node named from (expired, released or taken over) and returns when it
// saw that.
func waitLeaseFrom(t *testing.T, nodes []*nodeProc, from string, bound time.Duration) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	for {
		if o, ok := ownerRead(ctx, nodes); ok && o != from {
			return time.Now()
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s still held the lease %v on", from, bound)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func nodeNamed(nodes []*nodeProc, name string) *nodeProc {
	for _, n := range nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// clusterWorker is a running cluster worker as the test sees it.
type clusterWorker struct {
	cfg    clusterWorkerConfig
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan struct{} // its stdout ended

	mu     sync.Mutex
	acks   []int64 // confirmation times, Unix nanoseconds
	report *clusterWorkerReport
}

func startClusterWorker(t *testing.T, cfg clusterWorkerConfig) *clusterWorker {
	t.Helper()
	b, _ := json.Marshal(cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), clusterWorkerEnv+"="+string(b))
	w := &clusterWorker{cfg: cfg, cmd: cmd, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = w.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-w.done
		if t.Failed() {
			t.Logf("worker %s's log:\n%s", cfg.Name, w.stderr)
		}
	})
	go func() {
		defer close(w.done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if v, ok := strings.CutPrefix(line, "ack "); ok {
				if at, err := strconv.ParseInt(v, 10, 64); err == nil {
					w.mu.Lock()
					w.acks = append(w.acks, at)
					w.mu.Unlock()
				}
			} else if strings.HasPrefix(line, "{") {
				var rep clusterWorkerReport
				if json.Unmarshal([]byte(line), &rep) == nil {
					w.mu.Lock()
					w.report = &rep
					w.mu.Unlock()
				}
			}
		}
		io.Copy(io.Discard, stdout)
	}()
	return w
}

// firstAckAfter is the worker's first confirmation at or after at (0: none
// yet).
func (w *clusterWorker) firstAckAfter(at int64) int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	var first int64
	for _, a := range w.acks { // printed in about time order, not exactly
		if a >= at && (first == 0 || a < first) {
			first = a
		}
	}
	return first
}

// finish waits, bounded, for the worker to exit and returns its report.
func (w *clusterWorker) finish(t *testing.T, bound time.Duration) clusterWorkerReport {
	t.Helper()
	select {
	case <-w.done:
	case <-time.After(bound):
		w.cmd.Process.Kill()
		<-w.done
		t.Fatalf("worker %s did not finish within %v:\n%s", w.cfg.Name, bound, w.stderr)
	}
	if err := w.cmd.Wait(); err != nil {
		t.Fatalf("worker %s: %v:\n%s", w.cfg.Name, err, w.stderr)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.report == nil {
		t.Fatalf("worker %s printed no report:\n%s", w.cfg.Name, w.stderr)
	}
	return *w.report
}

// waitAcks waits, bounded, until the first confirmation of any worker
// (all: of every worker) at or after at, and returns how long after at it
// came.
func waitAcks(t *testing.T, workers []*clusterWorker, at time.Time, all bool, bound time.Duration) time.Duration {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		var first, last int64
		seen := 0
		for _, w := range workers {
			if a := w.firstAckAfter(at.UnixNano()); a != 0 {
				seen++
				if first == 0 || a < first {
					first = a
				}
				last = max(last, a)
			}
		}
		if !all && seen > 0 {
			return time.Duration(first - at.UnixNano())
		}
		if all && seen == len(workers) {
			return time.Duration(last - at.UnixNano())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d workers had a mutation confirmed within %v", seen, len(workers), bound)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dbFileChecksum is the whole-database checksum of a database file that
// has no WAL left (a server that closed cleanly checkpointed it).
func dbFileChecksum(t *testing.T, path string) uint64 {
	t.Helper()
	if st, err := os.Stat(path + "-wal"); err == nil && st.Size() > 0 {
		t.Fatalf("%s still has a WAL of %d bytes", path, st.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sums := wal.NewChecksumTable(wal.DefaultPageSize)
	sums.Resize(uint32(len(b) / wal.DefaultPageSize))
	for i := 0; i < len(b)/wal.DefaultPageSize; i++ {
		sums.Set(uint32(i+1), wal.PageChecksum(uint32(i+1), b[i*wal.DefaultPageSize:(i+1)*wal.DefaultPageSize]))
	}
	return sums.Sum()
}

// sqliteCheck runs `PRAGMA integrity_check` with the stock sqlite3 CLI on
// path (read-only) and returns the counts it reads, "name=count,...".
func sqliteCheck(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("sqlite3", "-readonly", path, "PRAGMA integrity_check",
		"SELECT group_concat(name || '=' || count, ',') FROM (SELECT name, count FROM Categories ORDER BY name)").CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3 %s: %v\n%s", path, err, out)
	}
	got, counts, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if got != "ok" {
		t.Fatalf("sqlite3 finds %s not ok:\n%s", path, out)
	}
	return counts
}

// percentile is the p-th percentile (0..1) of ds, nearest rank.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// settleAndCheck is the end of a multi-node test: each worker has stopped
// and confirmed every mutation it made (made[i]). Then the workers that
// started on each node sync through that node alone, so that every node
// serves the final version (the owner from its database, a follower from
// its copy), and every replica must end at the same version and checksum
// with each row at its worker's count. Then every node stops, and its
// file (the owner's db.sqlite, a follower's follow.sqlite), read by our
// checksum and the stock sqlite3 CLI, and every replica's file must agree.
func settleAndCheck(t *testing.T, nodes []*nodeProc, cfgs []clusterWorkerConfig, made []int) {
	t.Helper()
	var want []string
	for i, c := range cfgs {
		want = append(want, fmt.Sprintf("%s=%d", c.Name, made[i]))
	}
	slices.Sort(want)
	finals := make([]clusterWorkerReport, len(cfgs))
	// A node that lost its lease in the churn after a heal or a kill may
	// take the database over again while the final syncs run, and its
	// take-over version then reaches only the replicas that sync after it
	// (seen once under CI's load: two replicas at 232, the third and every
	// node at 233). Or a node that has just turned follower is still
	// catching its copy up from an old version (seen under CI's load: the
	// passes ran within 1.2 s of a follower restarting from version 38,
	// its copy at 222, the owner's at 223). Either is a version some have
	// yet to fetch, not a divergence: the syncs run again (see
	// finalSyncWait), and the checks below hold them to one checksum and
	// exact counts.
	deadline := time.Now().Add(finalSyncWait)
	for pass := 1; ; pass++ {
		for i, n := range nodes {
			for j := i; j < len(cfgs); j += len(nodes) {
				c := cfgs[j]
				c.Addr, c.Alternates, c.Pace = n.addr, nil, 0
				finals[j] = startClusterWorker(t, c).finish(t, 120*time.Second)
				if finals[j].Node != n.addr {
					t.Errorf("%s synced through %s, want %s (%s)", c.Name, finals[j].Node, n.addr, n.name)
				}
			}
		}
		if !finalVersionsDiffer(finals) || time.Now().After(deadline) {
			break
		}
		t.Logf("final syncs, pass %d: the replicas ended at different versions (a take-over during the syncs, or a follower still catching up?); syncing again in %v", pass, finalSyncPause)
		time.Sleep(finalSyncPause)
	}
	for i, r := range finals {
		if r.Version != finals[0].Version || r.Checksum != finals[0].Checksum || r.Pending != 0 {
			t.Errorf("%s ended at version %d checksum %016x pending %d; %s at version %d checksum %016x",
				cfgs[i].Name, r.Version, r.Checksum, r.Pending, cfgs[0].Name, finals[0].Version, finals[0].Checksum)
		}
		if r.Count != int64(made[i]) {
			t.Errorf("%s's row is %d, but it made (and had confirmed) %d increments", cfgs[i].Name, r.Count, made[i])
		}
	}
	// The followers stop first: the owner's stop releases the lease, which
	// a follower still running would take.
	own := waitOwner(t, nodes, 15*time.Second)
	for _, n := range nodes {
		if n.name != own {
			n.stop(t)
		}
	}
	nodeNamed(nodes, own).stop(t)
	wantCounts := strings.Join(want, ",")
	for _, n := range nodes {
		dir := filepath.Join(n.data, "dbs", "demo")
		path, sum, version := filepath.Join(dir, "db.sqlite"), uint64(0), finals[0].Version
		if n.name == own {
			sum = dbFileChecksum(t, path)
		} else {
			path = filepath.Join(dir, "follow.sqlite")
			version, sum = followerCopy(t, path)
		}
		if version != finals[0].Version || sum != finals[0].Checksum {
			t.Errorf("%s's %s is at version %d checksum %016x, the replicas at %d %016x", n.name, filepath.Base(path), version, sum, finals[0].Version, finals[0].Checksum)
		}
		if got := sqliteCheck(t, path); got != wantCounts {
			t.Errorf("sqlite3 reads %s's %s as %s, want %s", n.name, filepath.Base(path), got, wantCounts)
		}
	}
	for _, c := range cfgs {
		if got := sqliteCheck(t, filepath.Join(c.Dir, "replica.db")); got != wantCounts {
			t.Errorf("sqlite3 reads %s's replica as %s, want %s", c.Name, got, wantCounts)
		}
	}
	t.Logf("converged at version %d, checksum %016x, on %d nodes (owner %s) and %d replicas", finals[0].Version, finals[0].Checksum, len(nodes), own, len(cfgs))
}

// followerCopy reads the version and checksum of a follower's copy (a
// replica file) once its node has stopped.
func followerCopy(t *testing.T, path string) (version, checksum uint64) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no follower copy: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := replica.Open(ctx, path, replica.Options{Mutators: demoRegistry(), Logger: quietLog})
	if err != nil {
		t.Fatalf("open the follower copy %s: %v", path, err)
	}
	defer r.Close()
	st := r.Status()
	return st.Version, st.Checksum
}

// TestClusterFailover: three `serve --cluster` nodes (R3, lease TTL 3 s)
// and nine replica processes spread over them, each with the other two as
// its alternates, mutating steadily. The owner of the database is killed
// with SIGKILL at random moments five times, and once a node that is not
// the owner; each killed node starts again on its data directory once
// another node confirms mutations. Fail-over is measured from each kill to
// the next confirmed mutation; a wait beyond 15 s fails (docs/CLUSTER.md
// has the numbers). At the end nothing is lost or applied twice (each row
// is its worker's count of confirmed increments), and every node and
// replica has the same checksum and a sound file.
func TestClusterFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process cluster test")
	}
	const leaseTTL = 3 * time.Second
	dir := t.TempDir()
	nodes := newClusterNodes(t, dir, 3, leaseTTL, directRoute, nil)
	startAll(t, nodes...)
	cfgs := make([]clusterWorkerConfig, 9)
	workers := make([]*clusterWorker, len(cfgs))
	for i := range cfgs {
		first := nodes[i%len(nodes)]
		var alts []string
		for j := 1; j < len(nodes); j++ {
			alts = append(alts, nodes[(i+j)%len(nodes)].addr)
		}
		cfgs[i] = clusterWorkerConfig{Dir: filepath.Join(dir, fmt.Sprintf("w%d", i+1)), Addr: first.addr, Alternates: alts,
			Token: "tok", Fingerprint: first.fp, Name: fmt.Sprintf("w%d", i+1), Pace: 40 * time.Millisecond,
			Stop: filepath.Join(dir, "stop"), HandshakeTimeout: 500 * time.Millisecond}
		workers[i] = startClusterWorker(t, cfgs[i])
	}
	waitAcks(t, workers, time.Now().Add(-time.Hour), true, 60*time.Second)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 12))
	const kills = 6
	bystander := rng.IntN(kills) // the kill of a node that is not the owner
	var failovers, allResumed, leases []time.Duration
	for k := 0; k < kills; k++ {
		time.Sleep(time.Duration(1000+rng.IntN(2000)) * time.Millisecond)
		own := waitOwner(t, nodes, 15*time.Second)
		victim := nodeNamed(nodes, own)
		if k == bystander {
			for victim.name == own {
				victim = nodes[rng.IntN(len(nodes))]
			}
		}
		lead := streamLeaders(nodes)
		victim.kill()
		at := time.Now()
		if victim.name != own {
			// The owner goes on: acknowledgements continue.
			gap := waitAcks(t, workers, at, false, 15*time.Second)
			t.Logf("kill %d: %s (not the owner %s; stream leaders before: %s): next confirmation %v after", k+1, victim.name, own, lead, gap.Round(time.Millisecond))
		} else {
			// A confirmation within 100 ms of the kill is one the dead
			// owner sent before it died; a new owner needs the lease's TTL.
			// The bound is wide: a replica notices that a SIGKILLed node
			// is gone only at QUIC's idle timeout (20 s), see the Log.
			freed := waitLeaseFrom(t, nodes, own, 15*time.Second).Sub(at)
			leases = append(leases, freed)
			first := waitAcks(t, workers, at.Add(100*time.Millisecond), false, 45*time.Second) + 100*time.Millisecond
			all := waitAcks(t, workers, at.Add(100*time.Millisecond), true, 45*time.Second) + 100*time.Millisecond
			failovers, allResumed = append(failovers, first), append(allResumed, all)
			newOwner := waitOwner(t, nodes, 15*time.Second)
			t.Logf("kill %d: owner %s (stream leaders before: %s): its lease gone %v after, first confirmation %v after, every worker's within %v; new owner %s",
				k+1, own, lead, freed.Round(time.Millisecond), first.Round(time.Millisecond), all.Round(time.Millisecond), newOwner)
		}
		startAll(t, victim)
	}
	t.Logf("fail-over over %d owner kills: kill to the lease's end p50 %v max %v; to the first confirmed mutation p50 %v max %v; to every worker's p50 %v max %v",
		len(failovers), percentile(leases, 0.5).Round(time.Millisecond), percentile(leases, 1).Round(time.Millisecond),
		percentile(failovers, 0.5).Round(time.Millisecond), percentile(failovers, 1).Round(time.Millisecond),
		percentile(allResumed, 0.5).Round(time.Millisecond), percentile(allResumed, 1).Round(time.Millisecond))
	settleAndCheck(t, nodes, cfgs, stopWorkers(t, dir, workers, cfgs, 150*time.Second))
}

// stopWorkers tells the workers to stop mutating (the stop file in dir),
// waits for each one's report, bounded, and returns how many mutations each
// made, every one of which must have been confirmed.
func stopWorkers(t *testing.T, dir string, workers []*clusterWorker, cfgs []clusterWorkerConfig, bound time.Duration) []int {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "stop"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	made := make([]int, len(workers))
	for i, w := range workers {
		rep := w.finish(t, bound)
		if rep.Confirmed != rep.Made {
			t.Fatalf("%s made %d mutations and had %d confirmed", cfgs[i].Name, rep.Made, rep.Confirmed)
		}
		made[i] = rep.Made
	}
	return made
}

// frontRelays puts a relay in front of each node's route port: every
// node routes to the others' relays and advertises its own (so that NATS
// gossips the relay, and no node opens a route around it), and each relay
// tags a route by the node that opened it, so that one node can be cut off
// from the others: its own relay cuts everything, the others' block it.
type frontRelays []*relay.Relay

func (f frontRelays) get(t *testing.T, nodes []*nodeProc, i int) *relay.Relay {
	t.Helper()
	if f[i] == nil {
		r, err := relay.Listen("127.0.0.1:0", fmt.Sprintf("127.0.0.1:%d", nodes[i].route), relay.Options{Logger: quietLog, Tag: relay.NATSRouteName})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		f[i] = r
	}
	return f[i]
}

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// partition cuts (or, with heal, heals) node i off from the others.
func (f frontRelays) partition(nodes []*nodeProc, i int, heal bool) {
	for j, r := range f {
		switch {
		case j == i && heal:
			r.Heal()
		case j == i:
			r.Cut()
		case heal:
			r.Unblock(nodes[i].name)
		default:
			r.Block(nodes[i].name)
		}
	}
}

// checkRelayed fails the test if a TCP connection to a node's route port
// does not come from a relay: NATS gossips the route addresses its peers
// listen on, and a node that dialled one of those directly would not be
// cut by the relays.
func checkRelayed(t *testing.T, nodes []*nodeProc, relays []*relay.Relay) {
	t.Helper()
	relayed := map[string]bool{}
	for _, r := range relays {
		for _, a := range r.UpstreamAddrs() {
			relayed[procNetAddr(a)] = true
		}
	}
	routePorts := map[string]string{}
	for _, n := range nodes {
		routePorts[procNetAddr(fmt.Sprintf("127.0.0.1:%d", n.route))] = n.name
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("cannot tell relayed route connections from others: %v", err)
	}
	conns := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "01" { // ESTABLISHED
			continue
		}
		local, remote := f[1], f[2]
		to, ok := routePorts[remote]
		if !ok {
			continue
		}
		conns++
		if !relayed[local] {
			t.Fatalf("a route connection to %s (%s) bypasses the relays (from %s; relayed: %d)", to, remote, local, len(relayed))
		}
	}
	if conns == 0 {
		t.Fatal("no route connection to any node: the cluster is not routed through the relays")
	}
	t.Logf("%d route connections, all through the relays", conns)
}

// procNetAddr writes an IPv4 "a.b.c.d:port" as /proc/net/tcp does.
func procNetAddr(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	ip := net.ParseIP(host).To4()
	p, _ := strconv.Atoi(port)
	if ip == nil {
		return ""
	}
	return fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], p)
}

// acksBetween are the worker's confirmations in [from, to).
func (w *clusterWorker) acksBetween(from, to time.Time) []int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []int64
	for _, a := range w.acks {
		if a >= from.UnixNano() && a < to.UnixNano() {
			out = append(out, a)
		}
	}
	return out
}

// TestClusterPartition: three nodes whose routes run through relays; n1
// owns the database. Replica a syncs through n1 alone, replica b through
// n1 with n2 and n3 as alternates. Then n1 is cut off from the others (its
// relays reset every connection and refuse new ones): n1 must confirm
// nothing after the lease's TTL (a sees nothing after TTL + 1 s), while
// the majority takes the database over (b, and a replica d started on n2,
// get confirmations). After the partition heals, n1's commit that never
// reached the stream is served nowhere (n1 follows from its own copy, or
// restores its file from the stream before it owns the database again),
// a's mutations (made while n1 was cut off) are each applied once, and
// every node and replica ends at one checksum.
func TestClusterPartition(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process cluster test")
	}
	const leaseTTL = 3 * time.Second
	dir := t.TempDir()
	fronts := make(frontRelays, 3)
	nodes := newClusterNodes(t, dir, 3, leaseTTL,
		func(nodes []*nodeProc, _, to int) string { return fronts.get(t, nodes, to).Addr() },
		func(nodes []*nodeProc, i int) string { return fronts.get(t, nodes, i).Addr() })
	startAll(t, nodes...)
	n1 := nodes[0]
	stop := filepath.Join(dir, "stop")
	cfg := func(name string, on *nodeProc, alts ...*nodeProc) clusterWorkerConfig {
		c := clusterWorkerConfig{Dir: filepath.Join(dir, name), Addr: on.addr, Token: "tok", Fingerprint: on.fp, Name: name,
			Pace: 40 * time.Millisecond, Stop: stop, HandshakeTimeout: 500 * time.Millisecond}
		for _, a := range alts {
			c.Alternates = append(c.Alternates, a.addr)
		}
		return c
	}
	ca, cb, cd := cfg("a", n1), cfg("b", n1, nodes[1], nodes[2]), cfg("d", nodes[1], nodes[2])
	// a's first Hello opens the database on n1, which takes the lease.
	a := startClusterWorker(t, ca)
	waitAcks(t, []*clusterWorker{a}, time.Now().Add(-time.Hour), false, 60*time.Second)
	if o := waitOwner(t, nodes, 15*time.Second); o != n1.name {
		t.Fatalf("the owner is %s, want n1", o)
	}
	b := startClusterWorker(t, cb)
	waitAcks(t, []*clusterWorker{b}, time.Now().Add(-time.Hour), false, 60*time.Second)
	time.Sleep(time.Second)
	checkRelayed(t, nodes, fronts)

	cut := time.Now()
	fronts.partition(nodes, 0, false)
	d := startClusterWorker(t, cd)
	dFirst := waitAcks(t, []*clusterWorker{d}, cut, false, 45*time.Second)
	bFirst := waitAcks(t, []*clusterWorker{b}, cut.Add(leaseTTL), false, 45*time.Second) + leaseTTL
	newOwner := waitOwner(t, nodes[1:], 15*time.Second, nodes[1].name, nodes[2].name)
	// Let the majority go on a while, and a make mutations that n1 cannot
	// get confirmed, then heal.
	time.Sleep(max(2*time.Second, time.Until(cut.Add(2*leaseTTL+time.Second))))
	heal := time.Now()
	late := a.acksBetween(cut.Add(leaseTTL+time.Second), heal)
	aAfter := a.acksBetween(cut, heal)
	fronts.partition(nodes, 0, true)
	t.Logf("partition of n1 for %v: a's last confirmation after the cut %v; the majority (%s) confirmed d's first %v and b's first %v after the cut",
		heal.Sub(cut).Round(time.Millisecond), lastAfter(aAfter, cut), newOwner, dFirst.Round(time.Millisecond), bFirst.Round(time.Millisecond))
	if len(late) > 0 {
		t.Fatalf("n1, cut off from the majority, confirmed %d of a's mutations later than the lease's TTL + 1 s after the cut (the last %v after)",
			len(late), time.Duration(late[len(late)-1]-cut.UnixNano()))
	}

	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cfgs := []clusterWorkerConfig{ca, cb, cd}
	made := make([]int, 3)
	for i, w := range []*clusterWorker{b, d} {
		rep := w.finish(t, 120*time.Second)
		if rep.Confirmed != rep.Made {
			t.Fatalf("%s made %d mutations and had %d confirmed", cfgs[i+1].Name, rep.Made, rep.Confirmed)
		}
		made[i+1] = rep.Made
	}
	// a syncs through n1 alone: its mutations, made while n1 was cut
	// off, are confirmed there once the partition heals.
	rep := a.finish(t, 120*time.Second)
	if rep.Confirmed != rep.Made {
		t.Fatalf("a made %d mutations and had %d confirmed", rep.Made, rep.Confirmed)
	}
	made[0] = rep.Made
	// n1's commit that the stream never took is in no file that serves:
	// n1 follows from its own copy, or, as the owner again, restored its
	// file from the stream first; either ends at the replicas' checksum.
	settleAndCheck(t, nodes, cfgs, made)
}

// settleAndCheck runs the final syncs again, finalSyncPause apart, while
// the replicas end at different versions, until finalSyncWait has passed:
// a follower's catch-up after a churn (one direct read per version, then a
// new consumer, which may wait out its 1 s bound on a cluster that just
// healed) took up to 5 s under load; a replica still apart after 30 s
// synced through a stuck follower, which the checks then report.
const (
	finalSyncWait  = 30 * time.Second
	finalSyncPause = time.Second
)

// finalVersionsDiffer reports whether the final reports name more than one
// version.
func finalVersionsDiffer(finals []clusterWorkerReport) bool {
	for _, r := range finals {
		if r.Version != finals[0].Version {
			return true
		}
	}
	return false
}

func lastAfter(acks []int64, t0 time.Time) string {
	if len(acks) == 0 {
		return "none"
	}
	return time.Duration(slices.Max(acks) - t0.UnixNano()).Round(time.Millisecond).String()
}
