package chaos

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/internal/faultnet"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

var (
	flagSeed     = flag.Uint64("chaos.seed", 0, "run only this seed (also SQLREBASE_CHAOS_SEED)")
	flagDuration = flag.Duration("chaos.duration", 0, "soak: run new seeds for this long (SQLREBASE_CHAOS=long: 10m)")
)

// mode sizes a run.
type mode struct {
	name       string
	seeds      int           // seeds to run, unless soaking
	soak       time.Duration // run new seeds until this much time has passed
	runFor     time.Duration // how long the replicas mutate under faults
	perReplica int           // mutations each replica makes
	maxCut     time.Duration // longest partition
	restarts   int           // most restarts of each replica, and of the server
	backlog    int           // mutations each replica makes offline, in the final cut
}

func chooseMode(t *testing.T) mode {
	soak := *flagDuration
	if soak == 0 && os.Getenv("SQLREBASE_CHAOS") == "long" {
		soak = 10 * time.Minute
	}
	switch {
	case soak > 0:
		// Partitions past QUIC's 20 s idle timeout: connections die and
		// are made again.
		return mode{name: "long", soak: soak, runFor: 30 * time.Second, perReplica: 300, maxCut: 25 * time.Second, restarts: 4, backlog: 2000}
	case testing.Short():
		return mode{name: "short", seeds: 2, runFor: 2 * time.Second, perReplica: 24, maxCut: 1200 * time.Millisecond, restarts: 1, backlog: 30}
	default:
		return mode{name: "default", seeds: 5, runFor: 5 * time.Second, perReplica: 60, maxCut: 3 * time.Second, restarts: 2, backlog: 300}
	}
}

// replaySeed is the seed asked for by flag or environment, or 0.
func replaySeed(t *testing.T) uint64 {
	if *flagSeed != 0 {
		return *flagSeed
	}
	if s := os.Getenv("SQLREBASE_CHAOS_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("SQLREBASE_CHAOS_SEED=%q: %v", s, err)
		}
		return v
	}
	return 0
}

// TestChaos runs the whole stack under network faults and restarts, one
// seed after another, and checks the invariants after each.
func TestChaos(t *testing.T) {
	runSeeds(t, "TestChaos", chooseMode(t), runSeed)
}

// runSeeds runs one mode's seeds (or the one asked to replay, or new ones
// while soaking) through run, each a subtest of test, and logs the
// convergence times.
func runSeeds(t *testing.T, test string, m mode, run func(*testing.T, uint64, mode) time.Duration) {
	if _, err := exec.LookPath("sqlite3"); err != nil {
		t.Fatal("the chaos suite needs the stock sqlite3 CLI on PATH")
	}
	var seeds []uint64
	if s := replaySeed(t); s != 0 {
		seeds = []uint64{s}
	} else {
		for range m.seeds {
			seeds = append(seeds, rand.Uint64())
		}
	}
	var converge []time.Duration
	start := time.Now()
	for i := 0; ; i++ {
		var seed uint64
		switch {
		case i < len(seeds):
			seed = seeds[i]
		case m.soak > 0 && time.Since(start) < m.soak && replaySeed(t) == 0:
			seed = rand.Uint64()
		default:
			logConvergence(t, m, converge)
			return
		}
		var d time.Duration
		ok := t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("seed %d (replay: go test ./chaos -run '%s/seed=%d$' -chaos.seed=%d; mode %s)", seed, test, seed, seed, m.name)
			d = run(t, seed, m)
		})
		if !ok {
			t.Logf("seed %d failed", seed)
			return
		}
		converge = append(converge, d)
	}
}

func logConvergence(t *testing.T, m mode, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	t.Logf("mode %s, %d seeds: time from faults stopping to every replica in sync: median %v, max %v (all: %v)",
		m.name, len(s), s[(len(s)-1)/2].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), roundAll(ds))
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

// The test app: the demo mutator, for each replica's own row and a shared
// row, and a capped counter whose server run fails once it is full, so
// that rejections depend on the server's order.
const (
	dbName   = "chaos"
	secret   = "chaos-secret"
	shared   = "shared"
	capName  = "chaosCapped"
	capRow   = "capped"
	capLimit = 7
)

var errCapFull = errors.New("capped counter is full")

func registry(t *testing.T) *mutators.Registry {
	reg, err := newRegistry()
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// newRegistry is the test app's registry, the same in the test and in its
// child server processes.
func newRegistry() (*mutators.Registry, error) {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return nil, err
	}
	err := reg.Register(capName, func(_ context.Context, tx mutators.Tx, _ json.RawMessage) error {
		if _, err := tx.Exec(mutators.DemoSchema); err != nil {
			return err
		}
		var n int64
		switch err := tx.QueryRow(`SELECT count FROM Categories WHERE name = ?`, capRow).Scan(&n); {
		case errors.Is(err, sql.ErrNoRows):
		case err != nil:
			return err
		}
		if n >= capLimit {
			return errCapFull
		}
		_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES (?, 1)
			ON CONFLICT(name) DO UPDATE SET count = count + 1`, capRow)
		return err
	})
	if err != nil {
		return nil, err
	}
	return reg, nil
}

// plan is what a seed decides before the run: the fault profile, the
// partitions, who restarts when, and each replica's mutations.
type plan struct {
	replicas       int
	profile        faultnet.Profile
	partitions     []faultnet.Partition // offsets from the start of the run
	restartAt      [][]int              // per replica, the mutations before which it restarts
	serverRestarts []restart
	kinds          [][]kind // per replica, its mutations
	pause          time.Duration
	finalCut       time.Duration // the partition of everyone at the end
	diskFaults     []diskFault   // at most one per replica
	// serverFull, if long is set, fills the server's disk for a while: a
	// real ENOSPC, on a tmpfs the test mounts (root only; else not made).
	serverFull diskFault
	// sharedTransport: replicas 0 and 1 share one replica.Transport (one
	// UDP socket, one QUIC connection, a stream each), in every life.
	sharedTransport bool
}

// diskFault makes a replica's disk fail for a while: full (ENOSPC, a
// write writes part of its bytes first), or random I/O errors.
type diskFault struct {
	replica  int
	at, long time.Duration
	full     bool
	prob     float64 // of each write, sync and truncate failing, if not full
}

// restart ends a life of the server at at (since the start of the run) and
// starts the next after down. A life in a child process ends with SIGKILL
// (a crash, whatever it was writing); one in this process with Close.
type restart struct {
	at, down time.Duration
	// child: the life this restart starts runs in a child process.
	child bool
}

type kind int

const (
	own kind = iota
	toShared
	toCapped
)

func makePlan(seed uint64, m mode) plan {
	rng := rand.New(rand.NewPCG(seed, seed^0x5eed))
	dur := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(rng.Int64N(int64(hi-lo)+1)) }
	p := plan{replicas: 3}
	p.profile = faultnet.Profile{
		Loss:         rng.Float64() * 0.15,
		Duplicate:    rng.Float64() * 0.1,
		Reorder:      rng.Float64() * 0.2,
		Delay:        dur(0, 10*time.Millisecond),
		Jitter:       dur(0, 10*time.Millisecond),
		ReorderDelay: dur(5*time.Millisecond, 30*time.Millisecond),
	}
	for range 1 + rng.IntN(2) {
		from := dur(0, m.runFor*3/4)
		p.partitions = append(p.partitions, faultnet.Partition{
			From: from, Until: from + dur(m.maxCut/5, m.maxCut),
			Dir:    []faultnet.Direction{faultnet.Up, faultnet.Down, faultnet.Both}[rng.IntN(3)],
			Client: rng.IntN(p.replicas + 1), // 0: all
		})
	}
	for range p.replicas {
		var at []int
		for range rng.IntN(m.restarts + 1) {
			at = append(at, 1+rng.IntN(m.perReplica-1))
		}
		slices.Sort(at)
		p.restartAt = append(p.restartAt, slices.Compact(at))
		ks := make([]kind, m.perReplica)
		for j := range ks {
			switch x := rng.IntN(10); {
			case x < 5:
				ks[j] = own
			case x < 8:
				ks[j] = toShared
			default:
				ks[j] = toCapped
			}
		}
		p.kinds = append(p.kinds, ks)
	}
	var at []time.Duration
	for range 1 + rng.IntN(m.restarts) { // at least one
		at = append(at, dur(m.runFor/5, m.runFor*4/5))
	}
	slices.Sort(at)
	for _, a := range at {
		p.serverRestarts = append(p.serverRestarts, restart{at: a, down: dur(50*time.Millisecond, 800*time.Millisecond), child: rng.IntN(2) == 0})
	}
	p.pause = m.runFor / time.Duration(m.perReplica)
	p.finalCut = dur(m.maxCut/5, m.maxCut)
	p.sharedTransport = rng.IntN(2) == 0
	if rng.IntN(2) == 0 {
		p.serverFull = diskFault{replica: -1, at: dur(0, m.runFor*3/4), long: dur(m.runFor/20, m.runFor/4), full: true}
	}
	for i := range p.replicas {
		if rng.IntN(2) == 0 {
			continue
		}
		p.diskFaults = append(p.diskFaults, diskFault{
			replica: i, at: dur(0, m.runFor*3/4), long: dur(m.runFor/20, m.runFor/4),
			full: rng.IntN(2) == 0, prob: 0.05 + rng.Float64()*0.25,
		})
	}
	return p
}

// rec is one mutation and what the test knows of it.
type rec struct {
	id   uint64
	kind kind
	h    *replica.Handle // of the replica's latest life that knew it; nil once atOpen
	// atOpen: the mutation was unsettled at a Close, and the next Open
	// settled it. A disk fault poisoned the rebase of a version that
	// acknowledges it after that version's journal was written; Open's
	// repair completes the apply from the journal and settles the
	// mutation, where no handle hears of it. Its outcome is read from the
	// confirmed state (the reserved tables) at the end.
	atOpen bool
}

// cluster is one seed's server, relay and replicas.
type cluster struct {
	t     *testing.T
	seed  uint64
	plan  plan
	reg   *mutators.Registry
	dir   string
	logs  *ring
	log   *slog.Logger
	relay *faultnet.Relay

	srvMu   sync.Mutex
	srv     *server.Server // the server's life in this process, or nil
	child   *child         // the server's life in a child process, or nil
	srvAddr string
	fp      string

	reps []*worker
	tr   *replica.Transport // shared by replicas 0 and 1, or nil

	// serverDir is the server's data directory; on a small tmpfs of its
	// own (serverDisk) when the plan fills the server's disk and the test
	// may mount one.
	serverDir, serverDisk string

	// remote, if set, is the Remote a replica connects through (the
	// cluster mode's: its node's relay, the other nodes' as alternates);
	// nil: the one server, through relay.
	remote func(w *worker) *replica.Remote
	// describe, if set, describes the servers for a failure message in
	// place of the one server's line.
	describe func() string
	// childLog is where child processes log: the ring (runSeed), or the
	// cluster mode's tally of it.
	childLog io.Writer
}

// worker is one replica and the mutations it made.
type worker struct {
	c    *cluster
	i    int
	path string

	// faults is the hook under the replica's own file I/O, in every life.
	faults *vfs.Faults
	// disk, if set, is the small tmpfs the replica's files are on, which
	// a full-disk fault fills: a real ENOSPC for every file it writes.
	disk string

	mu        sync.Mutex // guards r, recs, life, faultErrs
	r         *replica.Replica
	recs      []*rec
	life      int
	faultErrs int // Mutate, Open and Close calls the disk faults failed
}

func runSeed(t *testing.T, seed uint64, m mode) time.Duration {
	p := makePlan(seed, m)
	t.Logf("plan: profile %+v; partitions %+v; replica restarts before mutation %v; server restarts %+v; disk faults %+v; server disk full %+v; shared transport %v",
		p.profile, p.partitions, p.restartAt, p.serverRestarts, p.diskFaults, p.serverFull, p.sharedTransport)
	c := &cluster{t: t, seed: seed, plan: p, reg: registry(t), dir: t.TempDir(), logs: newRing(300)}
	c.childLog = c.logs
	c.log = slog.New(slog.NewTextHandler(c.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("seed %d failed; the last log lines:\n%s", seed, c.logs.String())
		}
	})
	ctx := context.Background()
	c.serverDir = filepath.Join(c.dir, "server")
	if p.serverFull.long > 0 {
		if disk, err := smallDisk(t, "64m"); err != nil {
			t.Logf("the server's disk will not fill: %v", err)
		} else {
			c.serverDisk = disk
			c.serverDir = filepath.Join(disk, "server")
		}
	}

	if err := c.startServer(ctx, "127.0.0.1:0", true); err != nil {
		t.Fatal(err)
	}
	relay, err := faultnet.Listen(faultnet.Config{Target: c.srvAddr, Seed: seed, Logger: c.log})
	if err != nil {
		t.Fatal(err)
	}
	c.relay = relay
	t.Cleanup(func() { relay.Close() })
	if p.sharedTransport {
		c.tr = replica.NewTransport(replica.TransportOptions{Logger: c.log})
	}

	// Connect every replica over a clean network first, so that the
	// relay numbers them 1..n as the plan's partitions expect.
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
		c.stopServer()
	})

	// Faults on, then the run.
	base := relay.Elapsed()
	prof := p.profile
	for _, q := range p.partitions {
		q.From += base
		q.Until += base
		prof.Partitions = append(prof.Partitions, q)
	}
	if err := relay.SetProfile(prof); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for _, w := range c.reps {
		wg.Add(1)
		go func() { defer wg.Done(); w.run(ctx) }()
	}
	c.diskFaults(&wg, func() time.Duration { return relay.Elapsed() - base })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, rs := range p.serverRestarts {
			time.Sleep(rs.at - (relay.Elapsed() - base))
			c.restartServer(ctx, rs.down, rs.child)
		}
	}()
	c.boundedWait("the run", 10*m.runFor+60*time.Second, &wg)
	if t.Failed() {
		t.FailNow()
	}
	// The checks need the server in this process: a life in a child
	// process ends with one more crash.
	if c.hasChild() {
		c.restartServer(ctx, 0, false)
	}
	// Let the last partition end. Then the final cut: every client loses
	// the server both ways while each replica mutates, and the cut heals
	// with every fault gone; the time until every replica has synced is
	// what the suite measures.
	for _, q := range prof.Partitions {
		if d := q.Until - relay.Elapsed(); d > 0 {
			time.Sleep(d)
		}
	}
	cut := p.finalCut
	converged := c.finalCut(ctx, m, []*faultnet.Relay{relay})
	c.check(ctx)
	// The faults happened, to these clients: the relay was in the path.
	st := relay.Stats()
	lives := 0
	for i, at := range p.restartAt {
		switch {
		case p.sharedTransport && i == 0:
			lives++ // the shared Transport's one socket
		case p.sharedTransport && i == 1:
		default:
			lives += 1 + len(at)
		}
	}
	if st.Clients != lives {
		t.Errorf("the relay saw %d client addresses, want one per replica life or shared Transport (%d)", st.Clients, lives)
	}
	if p.profile.Loss > 0.02 && st.Lost[0]+st.Lost[1] == 0 {
		t.Errorf("loss %.3f, yet the relay lost no packet: %+v", p.profile.Loss, st)
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
	var faultErrs []int
	for _, w := range c.reps {
		w.mu.Lock()
		faultErrs = append(faultErrs, w.faultErrs)
		w.mu.Unlock()
	}
	t.Logf("in sync %v after a %v cut healed (%d mutations made offline by each replica); calls failed by disk faults per replica %v; relay: %+v", converged.Round(time.Millisecond), cut, m.backlog, faultErrs, st)
	return converged
}

// finalCut cuts every client off from every server both ways, on every
// relay, while each replica makes its backlog offline; then heals the cut
// with every fault gone and returns the time until every replica synced.
func (c *cluster) finalCut(ctx context.Context, m mode, relays []*faultnet.Relay) time.Duration {
	t := c.t
	cut := c.plan.finalCut
	for _, relay := range relays {
		if err := relay.SetProfile(faultnet.Profile{Partitions: []faultnet.Partition{{Until: time.Duration(math.MaxInt64), Dir: faultnet.Both}}}); err != nil {
			t.Fatal(err)
		}
	}
	cutStart := time.Now()
	// Each replica makes a backlog offline, which it must drain once the
	// cut heals.
	var offline sync.WaitGroup
	for _, w := range c.reps {
		offline.Add(1)
		go func() {
			defer offline.Done()
			for j := range m.backlog {
				w.mutate(ctx, []kind{own, toShared}[j%2])
			}
		}()
	}
	c.boundedWait("the offline backlog", 120*time.Second, &offline)
	time.Sleep(cut - time.Since(cutStart))
	for _, relay := range relays {
		if err := relay.SetProfile(faultnet.Profile{}); err != nil {
			t.Fatal(err)
		}
	}
	healed := time.Now()
	var syncs sync.WaitGroup
	for _, w := range c.reps {
		syncs.Add(1)
		go func() {
			defer syncs.Done()
			c.bounded(fmt.Sprintf("replica %d Sync after the faults", w.i), 90*time.Second, w.r.Sync)
		}()
	}
	c.boundedWait("the Syncs", 100*time.Second, &syncs)
	converged := time.Since(healed)
	if t.Failed() {
		t.FailNow()
	}
	return converged
}

// diskFaults starts the plan's disk faults, each on a goroutine of its own
// in wg, at their times on the run's clock (elapsed): the replicas' (a real
// full disk on a tmpfs, or the hook under their files) and the server's
// full disk (on serverDisk, if mounted).
func (c *cluster) diskFaults(wg *sync.WaitGroup, elapsed func() time.Duration) {
	t := c.t
	for _, df := range c.plan.diskFaults {
		if w := c.reps[df.replica]; w.disk != "" {
			wg.Add(1)
			go func() {
				defer wg.Done()
				time.Sleep(df.at - elapsed())
				filler := filepath.Join(w.disk, "filler")
				n, err := fill(filler)
				t.Logf("replica %d's disk is full (%d bytes of filler; %v) for %v", w.i, n, err, df.long.Round(time.Millisecond))
				time.Sleep(df.long)
				if err := os.Remove(filler); err != nil {
					t.Errorf("free replica %d's disk: %v", w.i, err)
				}
			}()
			continue
		}
		if !fileFaultsHooked {
			t.Logf("disk fault %+v not made: no hook under the replica's files in this build", df)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f := c.reps[df.replica].faults
			time.Sleep(df.at - elapsed())
			c.log.Info("chaos: disk faults", "replica", df.replica, "fault", fmt.Sprintf("%+v", df))
			if df.full {
				f.DiskFull()
			} else {
				f.FailRandom(df.prob, vfs.OpAll, false)
			}
			time.Sleep(df.long)
			fired := f.Fired()
			f.Clear()
			c.t.Logf("replica %d: disk faults %+v injected %d failures", df.replica, df, fired)
		}()
	}
	if c.serverDisk != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(c.plan.serverFull.at - elapsed())
			filler := filepath.Join(c.serverDisk, "filler")
			n, err := fill(filler)
			t.Logf("the server's disk is full (%d bytes of filler; %v) for %v", n, err, c.plan.serverFull.long.Round(time.Millisecond))
			time.Sleep(c.plan.serverFull.long)
			if err := os.Remove(filler); err != nil {
				t.Errorf("free the server's disk: %v", err)
			}
		}()
	}
}

// startServer opens the server on c.dir and serves it on addr (retrying
// while the port is still taken by the previous life).
func (c *cluster) startServer(ctx context.Context, addr string, first bool) error {
	srv, err := server.Open(ctx, server.Config{
		Dir: c.serverDir, Mutators: c.reg, Logger: c.log,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		},
	})
	if err != nil {
		return fmt.Errorf("server open: %w", err)
	}
	if first {
		if err := srv.AddDatabase(ctx, dbName, secret); err != nil {
			srv.Close()
			return err
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		a, err := srv.Listen(ctx, addr)
		if err == nil {
			c.srvMu.Lock()
			c.srv, c.srvAddr, c.fp = srv, a, srv.Fingerprint()
			c.srvMu.Unlock()
			return nil
		}
		if time.Now().After(deadline) {
			srv.Close()
			return fmt.Errorf("server listen %s: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stopServer ends the server's life: Close in this process, SIGKILL in a
// child.
func (c *cluster) stopServer() {
	c.srvMu.Lock()
	srv, ch := c.srv, c.child
	c.srv, c.child = nil, nil
	c.srvMu.Unlock()
	if srv != nil {
		if err := srv.Close(); err != nil {
			c.t.Errorf("server close: %v", err)
		}
	}
	if ch != nil {
		ch.kill()
	}
}

func (c *cluster) restartServer(ctx context.Context, down time.Duration, child bool) {
	c.t.Logf("server restarts at %v: crash %v, down %v, next life in a child process %v", c.relay.Elapsed().Round(time.Millisecond), c.hasChild(), down.Round(time.Millisecond), child)
	c.stopServer()
	time.Sleep(down)
	// As a supervisor would, start it again until it works: on a full
	// disk it may not open (it must say why), and does once space returns.
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if child {
			err = c.startChild(c.srvAddr)
		} else {
			err = c.startServer(ctx, c.srvAddr, false)
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Errorf("the server did not start again in 30 s: %v", err)
			return
		}
		c.t.Logf("the server did not start (will retry): %v", err)
		if msg := err.Error(); strings.Contains(msg, "disk I/O error") && !strings.Contains(msg, "no space left on device") && !knownServerOpenVague {
			c.t.Errorf("the server's start failed on a full disk without saying so: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *cluster) hasChild() bool {
	c.srvMu.Lock()
	defer c.srvMu.Unlock()
	return c.child != nil
}

// childEnv tells the test binary to run as a child server: its value is a
// childConfig in JSON.
const childEnv = "SQLREBASE_CHAOS_CHILD_SERVER"

type childConfig struct {
	Dir, Addr string
	// NATS, if set, makes the child a cluster node (cluster_test.go): its
	// Owner on this NATS URL (the streams replicated Replicas times),
	// named Node, with the certificate in CertDir.
	NATS, Node, CertDir string
	Replicas            int
}

func TestMain(m *testing.M) {
	if cfg := os.Getenv(childEnv); cfg != "" {
		os.Exit(runChild(cfg))
	}
	os.Exit(m.Run())
}

// runChild serves the test app's server on the given directory and
// address until its stdin closes (the test ends it, or died) or it is
// killed. It says "ready" on stdout once it listens; it logs to stderr.
func runChild(cfgJSON string) int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	if cfg.NATS != "" {
		return runClusterChild(cfg)
	}
	reg, err := newRegistry()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	ctx := context.Background()
	srv, err := server.Open(ctx, server.Config{Dir: cfg.Dir, Mutators: reg,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)).With("server", "child")})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := srv.Listen(ctx, cfg.Addr)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "child:", err)
			return 1
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	srv.Close()
	return 0
}

// child is a server life in a child process.
type child struct {
	cmd   *exec.Cmd
	stdin io.Closer
}

// startChild starts a server life in a child process and waits until it
// listens.
func (c *cluster) startChild(addr string) error {
	ch, err := c.spawnChild(childConfig{Dir: c.serverDir, Addr: addr})
	if err != nil {
		return err
	}
	c.srvMu.Lock()
	c.child = ch
	c.srvMu.Unlock()
	return nil
}

// spawnChild starts a child process that serves as cfg says, and waits
// until it listens; it logs to the cluster's log.
func (c *cluster) spawnChild(cfgv childConfig) (*child, error) {
	cfg, _ := json.Marshal(cfgv)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(cfg))
	cmd.Stderr = c.childLog
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("child server: %w", err)
	}
	ch := &child{cmd: cmd, stdin: stdin}
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("said %q", line)
		}
		ready <- err
		io.Copy(io.Discard, stdout)
	}()
	select {
	case err = <-ready:
	case <-time.After(30 * time.Second):
		err = errors.New("not ready in 30 s")
	}
	if err != nil {
		ch.kill()
		return nil, fmt.Errorf("child server: %w", err)
	}
	return ch, nil
}

// kill ends the child with SIGKILL and reaps it.
func (ch *child) kill() {
	ch.cmd.Process.Kill()
	ch.stdin.Close()
	ch.cmd.Wait()
}

func (c *cluster) server() *server.Server {
	c.srvMu.Lock()
	defer c.srvMu.Unlock()
	return c.srv
}

// remoteOf is the Remote replica w connects through: the one server's,
// through the relay, unless c.remote says otherwise.
func (c *cluster) remoteOf(w *worker, fp string) *replica.Remote {
	if c.remote != nil {
		return c.remote(w)
	}
	return &replica.Remote{Addr: c.relay.Addr(), Database: dbName, Credential: secret, Fingerprint: fp}
}

func (w *worker) open(ctx context.Context) {
	c := w.c
	c.srvMu.Lock()
	fp := c.fp // the same in every life of the server: its certificate is in its directory
	c.srvMu.Unlock()
	opts := withFileFaults(replica.Options{
		Mutators: c.reg, Logger: c.log.With("replica", w.i),
		// One replica fsyncs everything, the others the default.
		Durability: []replica.Durability{replica.Normal, replica.Full}[w.i%2],
		Remote:     c.remoteOf(w, fp),
	}, w.faults)
	if w.i < 2 && c.tr != nil {
		opts.Remote.Transport = c.tr
	}
	var r *replica.Replica
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		r, err = replica.Open(ctx, w.path, opts)
		if err == nil {
			break
		}
		// A failing disk may fail an Open; it must say why, and the next
		// one, once the disk is sound, must work.
		if !w.faultErr("Open", err) || time.Now().After(deadline) {
			c.t.Errorf("replica %d open (life %d): %v", w.i, w.life+1, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.r = r
	w.life++
	// The handles of the previous life ended with ErrClosed; the
	// mutations still pending have new ones. One unsettled at Close and
	// not pending now must be one this Open settled (rec.atOpen): the
	// server's acknowledgement of it is in the confirmed state. One
	// neither pending nor acknowledged would be lost to the app.
	var lmid uint64
	var lmidErr error
	read, atOpen := false, 0
	for _, m := range w.recs {
		if m.atOpen {
			continue
		}
		if h := r.Handle(m.id); h != nil {
			m.h = h
			continue
		}
		select {
		case <-m.h.Done():
			if !errors.Is(m.h.Wait(ctx), replica.ErrClosed) {
				continue // settled in its life
			}
			if !read {
				lmid, lmidErr = mutators.LastMutationID(ctx, r.DB(), r.ClientID())
				read = true
			}
			switch {
			case lmidErr != nil && (errors.Is(lmidErr, vfs.ErrPoisoned) || errors.Is(lmidErr, vfs.ErrInjected) || errors.Is(lmidErr, vfs.ErrDiskFull)):
				// The disk faults go on (w.mu is held: no faultErr);
				// settled reads the acknowledgement at the end.
				c.log.Info("chaos: a disk fault failed the read of the last mutation id after reopen", "replica", w.i, "err", lmidErr)
			case lmidErr != nil:
				c.t.Errorf("replica %d: read the last mutation id after reopen: %v", w.i, lmidErr)
			case lmid < m.id:
				c.t.Errorf("replica %d: mutation %d was unsettled at Close, yet is neither pending nor acknowledged (last mutation id %d) after reopen: lost", w.i, m.id, lmid)
			}
			m.h, m.atOpen = nil, true
			atOpen++
		default:
			c.t.Errorf("replica %d: mutation %d: the handle of a closed replica is not done", w.i, m.id)
		}
	}
	if atOpen > 0 {
		c.t.Logf("replica %d: life %d's Open settled %d mutation(s) unsettled at the last Close (acknowledged in a version journaled before a disk fault poisoned its apply)", w.i, w.life, atOpen)
	}
}

// outcome is what the server made of mutation id, read from the replica's
// confirmed state: nil (applied) or a *replica.RejectedError. An error if
// the server has not settled it.
func outcome(ctx context.Context, r *replica.Replica, id uint64) (result, err error) {
	lmid, err := mutators.LastMutationID(ctx, r.DB(), r.ClientID())
	if err != nil {
		return nil, err
	}
	if lmid < id {
		return nil, fmt.Errorf("not acknowledged: the last mutation id is %d", lmid)
	}
	rej, err := mutators.Rejections(ctx, r.DB(), r.ClientID(), id-1, id)
	if err != nil {
		return nil, err
	}
	if msg, ok := rej[id]; ok {
		return &replica.RejectedError{ID: id, Message: msg}, nil
	}
	return nil, nil
}

func (w *worker) close() {
	w.mu.Lock()
	r := w.r
	w.r = nil
	w.mu.Unlock()
	if r != nil {
		if err := r.Close(); err != nil && !w.faultErr("Close", err) {
			w.c.t.Errorf("replica %d close: %v", w.i, err)
		}
	}
}

// faultErr says whether err is one a disk fault explains, and counts it;
// one that says "full" must say "no space left on device".
func (w *worker) faultErr(what string, err error) bool {
	if knownReplayVague && w.disk != "" && errors.Is(err, replica.ErrPendingHidden) && strings.Contains(err.Error(), "disk I/O error") {
		w.c.log.Info("chaos: a known vague replay error on a full disk failed a call (known_test.go)", "replica", w.i, "call", what, "err", err)
		w.mu.Lock()
		w.faultErrs++
		w.mu.Unlock()
		return true
	}
	if !errors.Is(err, vfs.ErrDiskFull) && !errors.Is(err, vfs.ErrPoisoned) && !errors.Is(err, vfs.ErrInjected) &&
		!strings.Contains(err.Error(), "no space left on device") {
		return false
	}
	if errors.Is(err, vfs.ErrDiskFull) && !strings.Contains(err.Error(), "no space left on device") {
		w.c.t.Errorf("replica %d: %s failed on a full disk without saying so: %v", w.i, what, err)
	}
	w.mu.Lock()
	w.faultErrs++
	w.mu.Unlock()
	w.c.log.Info("chaos: a disk fault failed a call", "replica", w.i, "call", what, "err", err)
	return true
}

// run makes the replica's planned mutations, restarting it where planned.
func (w *worker) run(ctx context.Context) {
	c := w.c
	rng := rand.New(rand.NewPCG(c.seed, uint64(w.i)))
	for j, k := range c.plan.kinds[w.i] {
		if slices.Contains(c.plan.restartAt[w.i], j) {
			c.log.Info("chaos: replica restarts", "replica", w.i)
			w.close()
			w.open(ctx)
		}
		if !w.mutate(ctx, k) {
			return
		}
		time.Sleep(time.Duration(float64(c.plan.pause) * (0.5 + rng.Float64())))
	}
}

// mutate makes one mutation of kind k and records it; false if it failed.
func (w *worker) mutate(ctx context.Context, k kind) bool {
	c := w.c
	w.mu.Lock()
	r := w.r
	w.mu.Unlock()
	if r == nil {
		return false // open failed, and said so
	}
	var h *replica.Handle
	var err error
	switch k {
	case own:
		h, err = r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(fmt.Sprintf("r%d", w.i), 1))
	case toShared:
		h, err = r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(shared, 1))
	case toCapped:
		h, err = r.Mutate(ctx, capName, json.RawMessage("{}"))
	}
	if err != nil {
		if w.faultErr("Mutate", err) {
			return true // nothing recorded: the mutation was not made
		}
		c.t.Errorf("replica %d: Mutate %v: %v", w.i, k, err)
		return false
	}
	w.mu.Lock()
	w.recs = append(w.recs, &rec{id: h.ID, kind: k, h: h})
	w.mu.Unlock()
	return true
}

// check verifies the invariants once every replica has synced.
func (c *cluster) check(ctx context.Context) {
	t := c.t
	srv := c.server()
	if srv == nil {
		t.Fatal("no server")
	}
	auth := srv.Authority(dbName)
	want := c.settled(ctx)

	// Every replica at the server's version, checksum and rows. A replica
	// whose Sync returned early may still apply another's last version.
	srvRows := rows(t, "server", func(q string) (*sql.Rows, error) { return auth.Query(ctx, q) })
	if got, wantS := srvRows, format(want); got != wantS {
		t.Errorf("server rows %s, want %s (exact counts of the confirmed mutations)", got, wantS)
	}
	deadline := time.Now().Add(20 * time.Second)
	for _, w := range c.reps {
		for {
			st := w.r.Status()
			if st.Version == auth.Version() && st.Checksum == auth.Checksum() && st.Pending == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("replica %d at %+v; server at version %d checksum %016x", w.i, st, auth.Version(), auth.Checksum())
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		got := rows(t, fmt.Sprintf("replica %d", w.i), func(q string) (*sql.Rows, error) { return w.r.DB().QueryContext(ctx, q) })
		if got != srvRows {
			t.Errorf("replica %d rows %s, server's %s", w.i, got, srvRows)
		}
	}

	// The server's file, read by the stock sqlite3 CLI after the server
	// closed: intact, the same rows, and the checksum the server reported.
	sum := auth.Checksum()
	for _, w := range c.reps {
		w.close()
	}
	c.stopServer()
	file := filepath.Join(c.serverDir, "dbs", dbName, "db.sqlite")
	out, err := exec.Command("sqlite3", file, "PRAGMA integrity_check",
		"SELECT group_concat(name || '=' || count, ',') FROM (SELECT name, count FROM Categories ORDER BY name)").CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3: %v\n%s", err, out)
	}
	if got, w := strings.TrimSpace(string(out)), "ok\n"+format(want); got != w {
		t.Errorf("the sqlite3 CLI reads the server's file as\n%s\nwant\n%s", got, w)
	}
	if fs := fileChecksum(t, file); fs != sum {
		t.Errorf("the server's file (checkpointed by the CLI) has checksum %016x; the server reported %016x", fs, sum)
	}
}

// settled checks that every mutation the replicas made settled, with the
// outcome its kind allows, and returns the rows they make: the exact count
// of each row's confirmed mutations.
func (c *cluster) settled(ctx context.Context) map[string]int64 {
	t := c.t
	want := map[string]int64{}
	capTried, capApplied := 0, 0
	for _, w := range c.reps {
		w.mu.Lock()
		recs := slices.Clone(w.recs)
		r := w.r
		w.mu.Unlock()
		for _, m := range recs {
			var err error
			if m.atOpen {
				var oerr error
				if err, oerr = outcome(ctx, r, m.id); oerr != nil {
					t.Errorf("replica %d: mutation %d (%v), settled at an Open: %v", w.i, m.id, m.kind, oerr)
					continue
				}
			} else {
				select {
				case <-m.h.Done():
					err = m.h.Wait(ctx)
				default:
					t.Errorf("replica %d: mutation %d (%v) not settled after Sync", w.i, m.id, m.kind)
					continue
				}
			}
			var rej *replica.RejectedError
			switch {
			case m.kind == toCapped && err == nil:
				capTried++
				capApplied++
			case m.kind == toCapped && errors.As(err, &rej) && strings.Contains(rej.Message, errCapFull.Error()):
				capTried++
			case err != nil:
				t.Errorf("replica %d: mutation %d (%v): %v", w.i, m.id, m.kind, err)
			case m.kind == own:
				want[fmt.Sprintf("r%d", w.i)]++
			case m.kind == toShared:
				want[shared]++
			}
		}
	}
	if capApplied > 0 {
		want[capRow] = int64(capApplied)
	}
	if wantCap := min(capTried, capLimit); capApplied != wantCap {
		t.Errorf("capped: %d of %d applied, want %d", capApplied, capTried, wantCap)
	}
	return want
}

// smallDisk mounts a tmpfs of the given size on a temporary directory
// (root only) and unmounts it at the end of the test.
func smallDisk(t *testing.T, size string) (string, error) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		return "", fmt.Errorf("mount tmpfs: %v %s", err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir, nil
}

// fill writes path until the disk is full, and returns how much it wrote
// and the error that stopped it (ENOSPC, normally).
func fill(path string) (int64, error) {
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n int64
	for _, size := range []int{1 << 20, 4 << 10, 512} {
		chunk := make([]byte, size)
		for {
			k, err := f.Write(chunk)
			n += int64(k)
			if err != nil {
				if size == 512 {
					return n, err
				}
				break
			}
		}
	}
	return n, nil
}

// rows lists Categories as "name=count,..." by name.
func rows(t *testing.T, who string, query func(string) (*sql.Rows, error)) string {
	rs, err := query(`SELECT name, count FROM Categories ORDER BY name`)
	if err != nil {
		t.Errorf("%s: %v", who, err)
		return ""
	}
	defer rs.Close()
	m := map[string]int64{}
	for rs.Next() {
		var n string
		var v int64
		if err := rs.Scan(&n, &v); err != nil {
			t.Errorf("%s: %v", who, err)
			return ""
		}
		m[n] = v
	}
	if err := rs.Err(); err != nil {
		t.Errorf("%s: %v", who, err)
	}
	return format(m)
}

func format(m map[string]int64) string {
	var names []string
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	var b strings.Builder
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%d", n, m[n])
	}
	return b.String()
}

// fileChecksum is the whole-database checksum of a database file, as the
// server and replicas compute it: wal.PageChecksum over every page.
func fileChecksum(t *testing.T, path string) uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 100 {
		t.Fatalf("%s: %d bytes", path, len(b))
	}
	ps := uint32(b[16])<<8 | uint32(b[17])
	if ps == 1 {
		ps = 65536
	}
	if !wal.ValidPageSize(ps) || len(b)%int(ps) != 0 {
		t.Fatalf("%s: page size %d, %d bytes", path, ps, len(b))
	}
	n := uint32(len(b) / int(ps))
	sums := wal.NewChecksumTable(ps)
	sums.Resize(n)
	for i := uint32(0); i < n; i++ {
		sums.Set(i+1, wal.PageChecksum(i+1, b[i*ps:(i+1)*ps]))
	}
	return sums.Sum()
}

// bounded runs fn under a deadline and fails the test with the cluster's
// state if it does not return nil in time.
func (c *cluster) bounded(what string, d time.Duration, fn func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := fn(ctx); err != nil {
		c.t.Errorf("%s: %v (after %v)\n%s", what, err, d, c.state())
	}
}

// boundedWait waits for wg, at most d; past it, it fails the test with the
// cluster's state and every goroutine's stack.
func (c *cluster) boundedWait(what string, d time.Duration, wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		buf := make([]byte, 4<<20)
		c.t.Fatalf("%s did not end in %v\n%s\ngoroutines:\n%s", what, d, c.state(), buf[:runtime.Stack(buf, true)])
	}
}

// state describes the cluster for a failure message.
func (c *cluster) state() string {
	var b strings.Builder
	if c.describe != nil {
		b.WriteString(c.describe())
	} else if srv := c.server(); srv != nil {
		a := srv.Authority(dbName)
		fmt.Fprintf(&b, "server: version %d checksum %016x\n", a.Version(), a.Checksum())
	} else if c.hasChild() {
		b.WriteString("server: in a child process\n")
	} else {
		b.WriteString("server: down\n")
	}
	for _, w := range c.reps {
		w.mu.Lock()
		r, life := w.r, w.life
		w.mu.Unlock()
		if r != nil {
			fmt.Fprintf(&b, "replica %d (life %d): %+v\n", w.i, life, r.Status())
		}
	}
	if c.relay != nil {
		fmt.Fprintf(&b, "relay at %v: %+v\n", c.relay.Elapsed(), c.relay.Stats())
	}
	return b.String()
}

func (k kind) String() string {
	return [...]string{"own", "shared", "capped"}[k]
}

// ring keeps the last lines written to it, to show with a failure.
type ring struct {
	mu    sync.Mutex
	lines []string
	next  int
	full  bool
	// noSpace counts lines that say "no space left on device"; vague
	// keeps lines that say "disk I/O error" without it (a full disk said
	// vaguely).
	noSpace int
	vague   []string
}

func newRing(n int) *ring { return &ring{lines: make([]string, n)} }

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		switch {
		case strings.Contains(l, "no space left on device"):
			r.noSpace++
		case strings.Contains(l, "disk I/O error") && knownServerOpenVague && strings.Contains(l, "open database"):
			// The known vague server.Open (known_test.go).
		case strings.Contains(l, "disk I/O error") && knownReplayVague && strings.Contains(l, "replay"):
			// The known vague replay on a full disk (known_test.go).
		case strings.Contains(l, "disk I/O error") && len(r.vague) < 10:
			r.vague = append(r.vague, l)
		}
		r.lines[r.next] = l
		r.next = (r.next + 1) % len(r.lines)
		if r.next == 0 {
			r.full = true
		}
	}
	return len(p), nil
}

func (r *ring) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	if r.full {
		out = append(out, r.lines[r.next:]...)
	}
	out = append(out, r.lines[:r.next]...)
	return strings.Join(out, "\n")
}
