package replica

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// The kill -9 test of the durability invariants. A child process (this test
// binary, re-executed) owns a replica and an authority in one directory and
// mutates, pushes and rebases until it is killed: by the parent at a random
// moment, or by itself inside crashHook at a named point. The parent then
// reopens both and checks invariant 1 (the main file is the server's database
// at the replica's version), invariant 3 (every mutation whose Mutate
// returned is pending or was applied by the server exactly once) and the
// integrity of the files. The next child continues on the same files, so
// state, and damage if any, accumulates across crashes.

// Environment of the child; crashEnvDir set means "be the child".
const (
	crashEnvDir   = "SQLREBASE_CRASH_DIR"
	crashEnvPoint = "SQLREBASE_CRASH_POINT" // empty: run until the parent kills us
	crashEnvHit   = "SQLREBASE_CRASH_HIT"   // die at this hit of the point
	crashEnvFull  = "SQLREBASE_CRASH_FULL"  // "1": Durability Full
	crashEnvBase  = "SQLREBASE_CRASH_BASE"  // first mark number of this child
	crashEnvSeed  = "SQLREBASE_CRASH_SEED"
)

// crashPoints are all the points where Replica calls crashHook.
var crashPoints = []string{
	"mutate-before-queue", "mutate-after-queue", "mutate-after-run",
	"rebase-before-apply", "rebase-after-apply", "settle-before-queue",
	"replay-middle",
}

// crashChildSteps bounds a child that never reaches its crash point, so that
// a point that is not hit shows up as missing coverage rather than a hang.
const crashChildSteps = 250

// crashRegistry adds "mark": each mutation inserts one row with a number that
// is unique to it. marks.n is UNIQUE, so a mutation applied twice by the
// server fails there and is recorded as a rejection; the padding makes the
// database grow over many pages so that page sets and truncations are real.
func crashRegistry(t testing.TB) *mutators.Registry {
	reg := testRegistry(t)
	reg.MustRegister("mark", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var a struct{ N int64 }
		if err := json.Unmarshal(args, &a); err != nil {
			return err
		}
		_, err := tx.Exec("INSERT INTO marks(n, pad) VALUES (?, printf('%.*c', 300 + ? % 500, 'x'))", a.N, a.N)
		return err
	})
	return reg
}

func crashSetup(ctx context.Context, tx mutators.Tx) error {
	if err := demoSetup(ctx, tx); err != nil {
		return err
	}
	_, err := tx.Exec("CREATE TABLE marks(n INTEGER NOT NULL UNIQUE, pad TEXT)")
	return err
}

func markArgs(n int64) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{"n":%d}`, n))
}

// crashCatchUp rebases r onto everything a has: the change log if it reaches
// back to r's version, else a snapshot (a reopened authority keeps no log of
// the versions before its open).
func crashCatchUp(ctx context.Context, a *server.Authority, r *Replica) error {
	v := r.Status().Version
	if v > a.Version() {
		return fmt.Errorf("replica at version %d is ahead of the authority's %d", v, a.Version())
	}
	sets, err := a.Since(v)
	if err != nil {
		snap, serr := a.Snapshot(ctx)
		if serr != nil {
			return errors.Join(err, serr)
		}
		sets = []*wal.PageSet{snap}
	}
	return r.Rebase(ctx, sets...)
}

// say writes one protocol line straight to the stdout file: the parent must
// have every line written before the kill, so nothing may sit in a buffer.
func say(format string, args ...any) {
	fmt.Fprintf(os.Stdout, format+"\n", args...)
}

func childDie(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "child: "+format+"\n", args...)
	os.Exit(2)
}

// TestCrashChild is the child of TestCrash; on its own it does nothing.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashEnvDir)
	if dir == "" {
		t.Skip("only runs as the child of TestCrash")
	}
	ctx := context.Background()
	point := os.Getenv(crashEnvPoint)
	hit, _ := strconv.Atoi(os.Getenv(crashEnvHit))
	base, _ := strconv.ParseInt(os.Getenv(crashEnvBase), 10, 64)
	seed, _ := strconv.ParseUint(os.Getenv(crashEnvSeed), 10, 64)
	rng := rand.New(rand.NewPCG(seed, 1))
	reg := crashRegistry(t)

	a, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg, crashSetup)
	if err != nil {
		childDie("open authority: %v", err)
	}
	// Every version the replica can reach is announced before it can
	// reach it: this one now, later ones as Push returns them.
	say("v %d %d", a.Version(), a.Checksum())

	hits := 0
	opts := Options{Mutators: reg, crashHook: func(p string) {
		if p != point {
			return
		}
		if hits++; hits == hit {
			say("crash %s", p)
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			// Nothing may run after the kill, however late it lands.
			time.Sleep(time.Hour)
		}
	}}
	if os.Getenv(crashEnvFull) == "1" {
		opts.Durability = Full
	}
	r, err := Open(ctx, filepath.Join(dir, "replica.db"), opts)
	if err != nil {
		childDie("open replica: %v", err)
	}
	// Small enough that settling often rewrites the queue file, so that
	// kills land in rewrites too.
	r.queue.compactMin = 2048
	say("ready")

	catchUp := func() {
		if err := crashCatchUp(ctx, a, r); err != nil {
			childDie("catch up: %v", err)
		}
	}
	pushSome := func() {
		// Leave up to two mutations pending so that rebases replay some.
		pending := r.Pending()
		batch := make([]server.Mutation, 0, len(pending))
		for _, m := range pending[:len(pending)-min(len(pending), rng.IntN(3))] {
			batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
		}
		if len(batch) == 0 {
			return
		}
		ps, results, err := a.Push(ctx, batch)
		if err != nil {
			childDie("push: %v", err)
		}
		for _, res := range results {
			if res.Outcome == server.Rejected || res.Outcome == server.Refused {
				childDie("push: mutation %d (%s): outcome %d: %s", res.Mutation.ID, res.Mutation.Args, res.Outcome, res.Err)
			}
		}
		if ps != nil {
			say("v %d %d", ps.Version, ps.PostChecksum)
		}
	}

	// The first child's replica is at version 0, without the schema, where
	// marks would fail locally; after this, a local failure is a bug.
	catchUp()
	for k := int64(0); k < crashChildSteps; k++ {
		n := base + k
		say("try %d", n)
		h, err := r.Mutate(ctx, "mark", markArgs(n))
		if err != nil {
			childDie("mutate %d: %v", n, err)
		}
		if err := h.LocalErr(); err != nil {
			childDie("mutate %d: local run: %v", n, err)
		}
		say("ok %d %d", h.ID, n)
		switch rng.IntN(6) {
		case 0, 1:
			pushSome()
			catchUp()
		case 2:
			// Push without rebasing: the next rebase applies several
			// versions at once, or the crash leaves the replica behind.
			pushSome()
		case 3:
			// A rebase with nothing new only drops and replays.
			catchUp()
		}
	}
	say("done")
	r.Close()
	a.Close()
}

// crashState is what the parent learned from all children so far.
type crashState struct {
	dir      string
	full     bool
	clientID string
	sums     map[uint64]uint64 // version -> checksum, as announced
	okN      map[uint64]int64  // mutation id -> mark number, for every Mutate that returned
	tried    map[int64]bool    // every mark number a child passed to Mutate
	nextBase int64
	fired    map[string]int
}

func TestCrash(t *testing.T) {
	if os.Getenv(crashEnvDir) != "" {
		t.Skip("child")
	}
	normal, full := 56, 14
	if testing.Short() {
		normal, full = 8, 3
	}
	t.Run("normal", func(t *testing.T) { runCrash(t, false, normal) })
	t.Run("full", func(t *testing.T) { runCrash(t, true, full) })
}

func runCrash(t *testing.T, full bool, iterations int) {
	ctx := context.Background()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SQLREBASE_CRASH_TEST_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (set SQLREBASE_CRASH_TEST_SEED to repeat)", seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	st := &crashState{
		dir: t.TempDir(), full: full,
		sums: map[uint64]uint64{}, okN: map[uint64]int64{}, tried: map[int64]bool{},
		nextBase: 1, fired: map[string]int{},
	}
	reg := crashRegistry(t)
	// Version 1 (the schema) is made here, so the first child's replica,
	// at version 0, is behind the reopened authority's log: the snapshot
	// path is exercised from the start.
	a, err := server.OpenAuthority(ctx, filepath.Join(st.dir, "server.db"), reg, crashSetup)
	if err != nil {
		t.Fatal(err)
	}
	st.sums[a.Version()] = a.Checksum()
	a.Close()

	// Modes: every named point, and as many kills by the parent at a
	// random moment, which alone can land inside a write.
	modes := append([]string(nil), crashPoints...)
	for range crashPoints {
		modes = append(modes, "")
	}
	for i := 0; i < iterations; i++ {
		mode := modes[i%len(modes)]
		// Later hits reach deeper states: longer queues, bigger page sets.
		hit := 1 + rng.IntN(12)
		desc := fmt.Sprintf("iteration %d (point %q, hit %d)", i, mode, hit)
		if mode == "" {
			desc = fmt.Sprintf("iteration %d (killed by the parent)", i)
		}
		out := runCrashChild(t, st, mode, hit, rng)
		if rng.IntN(2) == 0 {
			out += "; " + tearApply(t, filepath.Join(st.dir, "replica.db"), rng)
		}
		t.Logf("%s: %s", desc, out)
		// Leave the queue pending across a crash every other time, so that
		// children open with mutations to replay.
		checkAfterCrash(t, st, reg, desc, i%2 == 1 || i == iterations-1)
	}
	if !testing.Short() {
		for _, p := range crashPoints {
			if st.fired[p] == 0 {
				t.Errorf("crash point %s was never reached", p)
			}
		}
	}
	t.Logf("crash points reached: %v", st.fired)
}

// runCrashChild runs one child to its death (or to the end of its steps) and
// records what it printed.
func runCrashChild(t *testing.T, st *crashState, point string, hit int, rng *rand.Rand) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	fullEnv := "0"
	if st.full {
		fullEnv = "1"
	}
	base := st.nextBase
	// Mark numbers are never reused, even for a mutation the child queued
	// but did not live to report: a reused number would look like a
	// duplicate application.
	st.nextBase += crashChildSteps + 1
	cmd.Env = append(os.Environ(),
		crashEnvDir+"="+st.dir,
		crashEnvPoint+"="+point,
		crashEnvHit+"="+strconv.Itoa(hit),
		crashEnvFull+"="+fullEnv,
		crashEnvBase+"="+strconv.FormatInt(base, 10),
		crashEnvSeed+"="+strconv.FormatUint(rng.Uint64(), 10),
	)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	delay := time.Duration(rng.IntN(300)) * time.Millisecond
	ready := make(chan struct{})
	finished := make(chan struct{})
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		// The parent's kill: a random moment after the child is up. For a
		// child that kills itself this only bounds a run gone wrong.
		wait := 60 * time.Second
		switch {
		case point == "" && delay < 30*time.Millisecond:
			// Sometimes from the start, to land in Open's recovery and
			// replay too.
			wait = delay
		case point == "":
			select {
			case <-ready:
				wait = delay
			case <-finished:
				return
			}
		}
		select {
		case <-time.After(wait):
			cmd.Process.Signal(syscall.SIGKILL)
		case <-finished:
		}
	}()
	// Failures wait for the child's end: a Fatal now would leave it running.
	var protoErr error
	var oks, tries int
	var crashed, done bool
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 1 && f[0] == "ready":
			select {
			case <-ready:
			default:
				close(ready)
			}
		case len(f) == 1 && f[0] == "done":
			done = true
		case len(f) == 2 && f[0] == "crash":
			crashed = true
			st.fired[f[1]]++
		case len(f) == 2 && f[0] == "try":
			n, _ := strconv.ParseInt(f[1], 10, 64)
			st.tried[n] = true
			tries++
		case len(f) == 3 && f[0] == "ok":
			id, _ := strconv.ParseUint(f[1], 10, 64)
			n, _ := strconv.ParseInt(f[2], 10, 64)
			if prev, ok := st.okN[id]; ok && protoErr == nil {
				protoErr = fmt.Errorf("mutation id %d returned twice: mark %d, then mark %d", id, prev, n)
			}
			st.okN[id] = n
			oks++
		case len(f) == 3 && f[0] == "v":
			v, _ := strconv.ParseUint(f[1], 10, 64)
			sum, _ := strconv.ParseUint(f[2], 10, 64)
			if prev, ok := st.sums[v]; ok && prev != sum && protoErr == nil {
				protoErr = fmt.Errorf("version %d announced with checksum %016x, earlier %016x", v, sum, prev)
			}
			st.sums[v] = sum
		}
	}
	io.Copy(io.Discard, stdout)
	werr := cmd.Wait()
	close(finished)
	<-killerDone
	if protoErr != nil {
		t.Fatalf("point %q, hit %d: %v", point, hit, protoErr)
	}
	if strings.Contains(stderr.String(), "child:") {
		t.Fatalf("child failed (point %q, hit %d): %s", point, hit, stderr.String())
	}
	if !crashed && !done && point != "" {
		t.Fatalf("child died without reaching %s (%v): %s", point, werr, stderr.String())
	}
	how := "killed"
	if done {
		how = "finished without reaching its point"
	}
	return fmt.Sprintf("%s after %d tries, %d returned (%v)", how, tries, oks, werr)
}

// checkAfterCrash reopens the dead child's replica and authority and checks
// the invariants. With settleAll it also pushes every pending mutation, so
// that each returned mutation must now be in the server's database.
func checkAfterCrash(t *testing.T, st *crashState, reg *mutators.Registry, desc string, settleAll bool) {
	t.Helper()
	ctx := context.Background()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%s: %s", desc, fmt.Sprintf(format, args...))
	}
	a, err := server.OpenAuthority(ctx, filepath.Join(st.dir, "server.db"), reg, crashSetup)
	if err != nil {
		fail("reopen authority: %v", err)
	}
	defer a.Close()
	if want, ok := st.sums[a.Version()]; ok && want != a.Checksum() {
		fail("authority at version %d has checksum %016x, it announced %016x", a.Version(), a.Checksum(), want)
	}
	st.sums[a.Version()] = a.Checksum()

	opts := Options{Mutators: reg}
	if st.full {
		opts.Durability = Full
	}
	path := filepath.Join(st.dir, "replica.db")
	r, err := Open(ctx, path, opts)
	if err != nil {
		fail("reopen replica: %v", err)
	}
	defer r.Close()
	if st.clientID == "" {
		st.clientID = r.ClientID()
	} else if r.ClientID() != st.clientID {
		fail("client id changed from %s to %s", st.clientID, r.ClientID())
	}
	var ic string
	if err := r.DB().QueryRowContext(ctx, "PRAGMA integrity_check").Scan(&ic); err != nil || ic != "ok" {
		fail("integrity_check of the replica: %q, %v", ic, err)
	}

	// Invariant 1: the main file is the server's database at the replica's
	// version. Open has just scanned the main file, so Checksum is the
	// file's own.
	rs := r.Status()
	want, ok := st.sums[rs.Version]
	switch {
	case rs.Version == 0:
		if rs.Checksum != wal.PageChecksum(1, wal.EmptyDatabase(wal.DefaultPageSize)) {
			fail("replica at version 0 is not the empty database")
		}
	case !ok:
		fail("replica at version %d, which the authority never published (latest %d)", rs.Version, a.Version())
	case want != rs.Checksum:
		fail("invariant 1: replica at version %d has checksum %016x, the server's is %016x", rs.Version, rs.Checksum, want)
	}
	if rs.Version > a.Version() {
		fail("replica at version %d is ahead of the authority's %d", rs.Version, a.Version())
	}
	checkMainFileAlone(t, path, rs.Version, fail)

	// Invariant 3, locally: every returned mutation is acknowledged by the
	// state the replica holds, or still pending, with its own args, and
	// replays without error.
	lmid, err := mutators.LastMutationID(ctx, r.DB(), r.ClientID())
	if err != nil {
		fail("read last mutation id: %v", err)
	}
	checkPendingQueue(t, st, r, lmid, fail)

	// Catch up with the authority: now the replica must be it exactly.
	if err := crashCatchUp(ctx, a, r); err != nil {
		fail("catch up: %v", err)
	}
	if rs := r.Status(); rs.Version != a.Version() || rs.Checksum != a.Checksum() {
		fail("after catch-up: replica v%d %016x, authority v%d %016x", rs.Version, rs.Checksum, a.Version(), a.Checksum())
	}
	if settleAll {
		var batch []server.Mutation
		for _, m := range r.Pending() {
			batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
		}
		if len(batch) > 0 {
			ps, results, err := a.Push(ctx, batch)
			if err != nil {
				fail("push: %v", err)
			}
			for _, res := range results {
				if res.Outcome != server.Applied && res.Outcome != server.Duplicate {
					fail("push: mutation %d (%s): outcome %d: %s", res.Mutation.ID, res.Mutation.Args, res.Outcome, res.Err)
				}
			}
			if ps != nil {
				st.sums[ps.Version] = ps.PostChecksum
			}
			if err := crashCatchUp(ctx, a, r); err != nil {
				fail("rebase after push: %v", err)
			}
		}
		if rs := r.Status(); rs.Pending != 0 || rs.Version != a.Version() || rs.Checksum != a.Checksum() {
			fail("after settling all: replica %+v, authority v%d %016x", rs, a.Version(), a.Checksum())
		}
	}
	lmid, err = mutators.LastMutationID(ctx, r.DB(), r.ClientID())
	if err != nil {
		fail("read last mutation id: %v", err)
	}
	checkPendingQueue(t, st, r, lmid, fail)
	checkServerMarks(t, st, a, lmid, fail)

	if err := r.Close(); err != nil {
		fail("close replica: %v", err)
	}
	if err := a.Close(); err != nil {
		fail("close authority: %v", err)
	}
	checkAuthorityFile(t, filepath.Join(st.dir, "server.db"), fail)
}

// checkPendingQueue checks that the queue holds exactly the ids after lmid,
// gap-free, that a returned mutation is among them or acknowledged, and that
// the replica's optimistic state has one mark per acknowledged or pending
// mutation.
func checkPendingQueue(t *testing.T, st *crashState, r *Replica, lmid uint64, fail func(string, ...any)) {
	t.Helper()
	ctx := context.Background()
	pending := r.Pending()
	have := map[uint64]bool{}
	for i, m := range pending {
		if m.ID != lmid+1+uint64(i) {
			fail("pending ids %v do not follow the acknowledged id %d", pendingIDs(pending), lmid)
		}
		have[m.ID] = true
		var a struct{ N int64 }
		if err := json.Unmarshal(m.Args, &a); err != nil || m.Name != "mark" {
			fail("pending mutation %d is %s %s", m.ID, m.Name, m.Args)
		}
		if n, ok := st.okN[m.ID]; ok && n != a.N {
			fail("pending mutation %d marks %d, Mutate returned it for mark %d", m.ID, a.N, n)
		}
		if !st.tried[a.N] {
			fail("pending mutation %d marks %d, which no child tried", m.ID, a.N)
		}
		if h := r.Handle(m.ID); h == nil {
			fail("pending mutation %d has no handle", m.ID)
		} else if err := h.LocalErr(); err != nil {
			fail("pending mutation %d: replay error %v", m.ID, err)
		}
	}
	for id, n := range st.okN {
		if id > lmid && !have[id] {
			fail("invariant 3: mutation %d (mark %d) returned from Mutate but is neither acknowledged (up to %d) nor pending %v",
				id, n, lmid, pendingIDs(pending))
		}
	}
	var rows int64
	if err := r.DB().QueryRowContext(ctx, "SELECT count(*) FROM marks").Scan(&rows); err != nil {
		fail("count marks on the replica: %v", err)
	}
	if want := int64(lmid) + int64(len(pending)); rows != want {
		fail("replica shows %d marks, want %d acknowledged + %d pending", rows, lmid, len(pending))
	}
}

func pendingIDs(ms []Mutation) []uint64 {
	out := make([]uint64, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// checkServerMarks checks exactly-once on the authority: every mutation up to
// lmid left one row (so none twice, none lost) and no rejection.
func checkServerMarks(t *testing.T, st *crashState, a *server.Authority, lmid uint64, fail func(string, ...any)) {
	t.Helper()
	ctx := context.Background()
	rej, err := a.Query(ctx, "SELECT mutation_id, error FROM "+mutators.TableRejections)
	if err != nil {
		fail("read rejections: %v", err)
	}
	var rejected []string
	for rej.Next() {
		var id uint64
		var msg string
		if err := rej.Scan(&id, &msg); err != nil {
			rej.Close()
			fail("read rejections: %v", err)
		}
		rejected = append(rejected, fmt.Sprintf("%d (mark %d): %s", id, st.okN[id], msg))
	}
	rej.Close()
	if len(rejected) > 0 {
		fail("the server rejected mutations (a mark applied twice fails UNIQUE): %s", strings.Join(rejected, "; "))
	}
	rows, err := a.Query(ctx, "SELECT n FROM marks")
	if err != nil {
		fail("read marks: %v", err)
	}
	marks := map[int64]bool{}
	for rows.Next() {
		var n int64
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			fail("read marks: %v", err)
		}
		if !st.tried[n] {
			rows.Close()
			fail("the server has mark %d, which no child tried", n)
		}
		marks[n] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		fail("read marks: %v", err)
	}
	if uint64(len(marks)) != lmid {
		fail("the server acknowledged %d mutations but holds %d marks", lmid, len(marks))
	}
	for id, n := range st.okN {
		if id <= lmid && !marks[n] {
			fail("invariant 3: mutation %d (mark %d) is acknowledged but its mark is not on the server", id, n)
		}
	}
}

// checkMainFileAlone runs the stock sqlite3 shell on a copy of the replica's
// main file without its WAL: the main file must be a complete, sound database
// by itself, at the replica's version, since it is the server's truth.
func checkMainFileAlone(t *testing.T, path string, version uint64, fail func(string, ...any)) {
	t.Helper()
	cli, err := exec.LookPath("sqlite3")
	if err != nil {
		return
	}
	cp := filepath.Join(t.TempDir(), "main-alone.db")
	copyFile(t, path, cp, fail)
	if got := sqliteShell(t, cli, cp, "PRAGMA integrity_check", fail); got != "ok" {
		fail("sqlite3 integrity_check of the main file alone: %s", got)
	}
	if version == 0 {
		return
	}
	got := sqliteShell(t, cli, cp, "SELECT value FROM "+mutators.TableMeta+" WHERE key = 'version'", fail)
	if got != strconv.FormatUint(version, 10) {
		fail("the main file alone is at version %q, the replica says %d", got, version)
	}
}

// checkAuthorityFile runs the sqlite3 shell's integrity_check on a copy of
// the closed authority's database (with its WAL, if any: it is an ordinary
// SQLite database).
func checkAuthorityFile(t *testing.T, path string, fail func(string, ...any)) {
	t.Helper()
	cli, err := exec.LookPath("sqlite3")
	if err != nil {
		return
	}
	dir := t.TempDir()
	cp := filepath.Join(dir, "server.db")
	copyFile(t, path, cp, fail)
	if _, err := os.Stat(path + "-wal"); err == nil {
		copyFile(t, path+"-wal", cp+"-wal", fail)
	}
	if got := sqliteShell(t, cli, cp, "PRAGMA integrity_check", fail); got != "ok" {
		fail("sqlite3 integrity_check of the authority: %s", got)
	}
}

func copyFile(t *testing.T, from, to string, fail func(string, ...any)) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		fail("copy %s: %v", from, err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		fail("copy %s: %v", from, err)
	}
}

func sqliteShell(t *testing.T, cli, db, query string, fail func(string, ...any)) string {
	t.Helper()
	out, err := exec.Command(cli, db, query).CombinedOutput()
	if err != nil {
		fail("sqlite3 %s %q: %v: %s", db, query, err, out)
	}
	return strings.TrimSpace(string(out))
}

// tearApply makes the main file look as if the kill had landed in the middle
// of applying the journaled page set: any page of the set may hold anything,
// the file may not yet have grown to the set's size, or not yet have shrunk
// to it. Open must repair all of that from the journal, since it re-applies
// the journal whatever the state of the file.
func tearApply(t *testing.T, path string, rng *rand.Rand) string {
	t.Helper()
	b, err := os.ReadFile(path + "-apply")
	if errors.Is(err, os.ErrNotExist) {
		return "no apply journal to tear"
	}
	if err != nil {
		t.Fatal(err)
	}
	ps, err := wal.DecodePageSet(b, wal.Limits{MaxBytes: len(b)})
	if err != nil {
		t.Fatalf("apply journal left by a kill -9 does not decode: %v", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := int64(ps.PageSize)
	torn := 0
	garbage := make([]byte, ps.PageSize)
	for _, p := range ps.Pages {
		if rng.IntN(2) == 0 {
			continue
		}
		for i := range garbage {
			garbage[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(garbage, int64(p.Pgno-1)*size); err != nil {
			t.Fatal(err)
		}
		torn++
	}
	// The highest page not in the set: the file cannot be cut below it.
	inSet := map[uint32]bool{}
	for _, p := range ps.Pages {
		inSet[p.Pgno] = true
	}
	keep := ps.DBSize
	for keep > 0 && inSet[keep] {
		keep--
	}
	pages := ps.DBSize
	switch rng.IntN(3) {
	case 0: // not yet grown
		pages = keep + uint32(rng.IntN(int(ps.DBSize-keep)+1))
	case 1: // not yet shrunk
		pages = ps.DBSize + uint32(rng.IntN(4))
	}
	if err := f.Truncate(int64(pages) * size); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("tore %d of the %d pages of journaled version %d, %d pages of %d", torn, len(ps.Pages), ps.Version, pages, ps.DBSize)
}
