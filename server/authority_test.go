package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/wal"
)

var errFail = errors.New("the mutator refused")

// testRegistry is the demo registry plus a mutator that always fails after
// writing, so a test sees whether its write is rolled back.
func testRegistry(t testing.TB) *mutators.Registry {
	t.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	reg.MustRegister("fail", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		if _, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES ('from-fail', 1)`); err != nil {
			return err
		}
		return errFail
	})
	// exec runs the statements of its args (a JSON array of strings), for
	// tests of what a mutator may and may not do.
	reg.MustRegister("exec", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var stmts []string
		if err := json.Unmarshal(args, &stmts); err != nil {
			return err
		}
		for _, s := range stmts {
			if _, err := tx.Exec(s); err != nil {
				return err
			}
		}
		return nil
	})
	// query runs one query and reads all its rows, for the time limit.
	reg.MustRegister("query", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var q string
		if err := json.Unmarshal(args, &q); err != nil {
			return err
		}
		rows, err := tx.Query(q)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
		}
		return rows.Err()
	})
	return reg
}

func demoSetup(ctx context.Context, tx mutators.Tx) error {
	_, err := tx.Exec(mutators.DemoSchema)
	return err
}

func openAuthority(t *testing.T, path string) *Authority {
	t.Helper()
	a, err := OpenAuthority(context.Background(), path, testRegistry(t), demoSetup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func newAuthority(t *testing.T) *Authority {
	t.Helper()
	return openAuthority(t, filepath.Join(t.TempDir(), "server.db"))
}

func upsert(client string, id uint64, name string, delta int64) Mutation {
	return Mutation{ClientID: client, ID: id, Name: mutators.CreateCategoryOrIncrementIfExists, Args: mutators.CategoryArgs(name, delta)}
}

func push(t *testing.T, a *Authority, batch ...Mutation) (*wal.PageSet, []Result) {
	t.Helper()
	ps, res, err := a.Push(context.Background(), batch)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != len(batch) {
		t.Fatalf("%d results for %d mutations", len(res), len(batch))
	}
	return ps, res
}

func count(t *testing.T, a *Authority, name string) int64 {
	t.Helper()
	rows, err := a.Query(context.Background(), "SELECT count FROM Categories WHERE name = ?", name)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var n int64
	if rows.Next() {
		if err := rows.Scan(&n); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

func lastID(t *testing.T, a *Authority, client string) uint64 {
	t.Helper()
	id, err := mutators.LastMutationID(context.Background(), a.db, client)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestPushApplied(t *testing.T) {
	a := newAuthority(t)
	if a.Version() != 1 {
		t.Fatalf("a new authority is at version %d, want 1 (the setup)", a.Version())
	}
	ps, res := push(t, a, upsert("c1", 1, "Food", 1), upsert("c2", 1, "Food", 2), upsert("c1", 2, "Rent", 5))
	for i, r := range res {
		if r.Outcome != Applied {
			t.Fatalf("mutation %d: outcome %d (%s), want Applied", i, r.Outcome, r.Err)
		}
	}
	if ps == nil || ps.Version != 2 || a.Version() != 2 {
		t.Fatalf("page set %+v, authority at %d; want version 2", ps, a.Version())
	}
	if ps.PostChecksum != a.Checksum() {
		t.Fatal("the page set's post checksum is not the authority's checksum")
	}
	if got := count(t, a, "Food"); got != 3 {
		t.Fatalf("Food = %d, want 3", got)
	}
	if lastID(t, a, "c1") != 2 || lastID(t, a, "c2") != 1 {
		t.Fatalf("last ids c1=%d c2=%d, want 2 1", lastID(t, a, "c1"), lastID(t, a, "c2"))
	}
}

func TestPushDuplicate(t *testing.T) {
	a := newAuthority(t)
	push(t, a, upsert("c1", 1, "Food", 1), upsert("c1", 2, "Food", 1))
	version, sum := a.Version(), a.Checksum()
	ps, res := push(t, a, upsert("c1", 1, "Food", 10), upsert("c1", 2, "Food", 10))
	for i, r := range res {
		if r.Outcome != Duplicate {
			t.Fatalf("mutation %d: outcome %d, want Duplicate", i, r.Outcome)
		}
	}
	if ps != nil || a.Version() != version || a.Checksum() != sum {
		t.Fatalf("a batch of duplicates made a version: %+v, at %d", ps, a.Version())
	}
	if got := count(t, a, "Food"); got != 2 {
		t.Fatalf("Food = %d, want 2", got)
	}
	// A duplicate next to a new mutation: only the new one runs.
	ps, res = push(t, a, upsert("c1", 2, "Food", 10), upsert("c1", 3, "Food", 100))
	if res[0].Outcome != Duplicate || res[1].Outcome != Applied || ps == nil {
		t.Fatalf("outcomes %d %d, page set %v", res[0].Outcome, res[1].Outcome, ps)
	}
	if got := count(t, a, "Food"); got != 102 {
		t.Fatalf("Food = %d, want 102", got)
	}
}

func TestPushGap(t *testing.T) {
	a := newAuthority(t)
	push(t, a, upsert("c1", 1, "Food", 1))
	version, sum := a.Version(), a.Checksum()
	ps, res := push(t, a, upsert("c1", 3, "Food", 10), upsert("c1", 4, "Food", 10))
	for i, r := range res {
		if r.Outcome != Refused || !strings.Contains(r.Err, ErrGap.Error()) {
			t.Fatalf("mutation %d: outcome %d %q, want Refused with %q", i, r.Outcome, r.Err, ErrGap)
		}
	}
	if ps != nil || a.Version() != version || a.Checksum() != sum {
		t.Fatal("a refused batch changed the database")
	}
	if got := count(t, a, "Food"); got != 1 {
		t.Fatalf("Food = %d, want 1", got)
	}
	if lastID(t, a, "c1") != 1 {
		t.Fatalf("last id %d, want 1", lastID(t, a, "c1"))
	}
}

func TestPushRejected(t *testing.T) {
	ctx := context.Background()
	a := newAuthority(t)
	ps, res := push(t, a,
		upsert("c1", 1, "Food", 1),
		Mutation{ClientID: "c1", ID: 2, Name: "fail", Args: json.RawMessage("null")},
		upsert("c1", 3, "Food", 1),
		upsert("c1", 4, "", 1), // the demo mutator's own error
		upsert("c1", 5, "Food", 1),
	)
	want := []Outcome{Applied, Rejected, Applied, Rejected, Applied}
	for i, r := range res {
		if r.Outcome != want[i] {
			t.Fatalf("mutation %d: outcome %d (%s), want %d", i+1, r.Outcome, r.Err, want[i])
		}
	}
	if ps == nil {
		t.Fatal("no version")
	}
	if !strings.Contains(res[1].Err, errFail.Error()) || !strings.Contains(res[3].Err, mutators.ErrEmptyCategory.Error()) {
		t.Fatalf("errors %q %q", res[1].Err, res[3].Err)
	}
	if got := count(t, a, "Food"); got != 3 {
		t.Fatalf("Food = %d, want 3", got)
	}
	if got := count(t, a, "from-fail"); got != 0 {
		t.Fatal("the failed mutator's write survived")
	}
	if lastID(t, a, "c1") != 5 {
		t.Fatalf("last id %d, want 5", lastID(t, a, "c1"))
	}
	rej, err := mutators.Rejections(ctx, a.db, "c1", 0, 5)
	if err != nil {
		t.Fatal(err)
	}
	if len(rej) != 2 || rej[2] != res[1].Err || rej[4] != res[3].Err {
		t.Fatalf("stored rejections %v, want ids 2 and 4 with the results' messages", rej)
	}
	// A rejected mutation counts as processed: pushing it again is a
	// duplicate, not a second run.
	_, res = push(t, a, Mutation{ClientID: "c1", ID: 2, Name: "fail", Args: json.RawMessage("null")})
	if res[0].Outcome != Duplicate {
		t.Fatalf("re-pushed rejection: outcome %d, want Duplicate", res[0].Outcome)
	}
}

// TestPushRunsAgainOnce: a batch runs without a savepoint per mutation
// until a mutator fails; then it runs once more, with the failed mutation
// rejected up front and a savepoint around each of the others, so that a
// batch with two failures costs two attempts, not three. The batch after
// one with a rejection starts with the savepoints; the one after a clean
// batch does not.
func TestPushRunsAgainOnce(t *testing.T) {
	reg := testRegistry(t)
	var mu sync.Mutex
	runs := map[uint64]int{} // runs of the "counted" mutator, by its args
	reg.MustRegister("counted", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var n uint64
		if err := json.Unmarshal(args, &n); err != nil {
			return err
		}
		mu.Lock()
		runs[n]++
		mu.Unlock()
		_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES ('counted', 1)
			ON CONFLICT(name) DO UPDATE SET count = count + 1`)
		return err
	})
	a, err := OpenAuthority(context.Background(), filepath.Join(t.TempDir(), "server.db"), reg, demoSetup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	counted := func(id uint64) Mutation {
		return Mutation{ClientID: "c", ID: id, Name: "counted", Args: json.RawMessage(fmt.Sprint(id))}
	}
	fail := func(id uint64) Mutation {
		return Mutation{ClientID: "c", ID: id, Name: "fail", Args: json.RawMessage("null")}
	}
	_, res := push(t, a, counted(1), fail(2), counted(3), fail(4), counted(5))
	want := []Outcome{Applied, Rejected, Applied, Rejected, Applied}
	for i, r := range res {
		if r.Outcome != want[i] {
			t.Fatalf("mutation %d: outcome %d (%s), want %d", i+1, r.Outcome, r.Err, want[i])
		}
	}
	if runs[1] != 2 || runs[3] != 1 || runs[5] != 1 {
		t.Fatalf("runs %v, want 1: 2 (before and after the first failure), 3: 1, 5: 1", runs)
	}
	if !a.guardNext {
		t.Fatal("the batch after one with rejections starts without savepoints")
	}
	push(t, a, counted(6), counted(7))
	if runs[6] != 1 || runs[7] != 1 || a.guardNext {
		t.Fatalf("a clean guarded batch: runs %v, guard next %v; want one run each, and no guard next", runs, a.guardNext)
	}
	if got := count(t, a, "counted"); got != 5 {
		t.Fatalf("counted = %d, want 5: the first attempt's writes must be gone", got)
	}
	if got := count(t, a, "from-fail"); got != 0 {
		t.Fatal("a failed mutator's write survived")
	}
}

// TestWALPresized: the authority opens with its WAL written full length
// (zeros) and keeps that length through commits, a checkpoint's restart, a
// snapshot and a reopen, so that commits write over the file in place; the
// self-check (which reads the WAL as SQLite does) agrees throughout.
func TestWALPresized(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "server.db")
	a, err := OpenAuthorityWith(ctx, path, testRegistry(t), demoSetup, AuthorityOptions{SelfCheck: true})
	if err != nil {
		t.Fatal(err)
	}
	want := int64(wal.HeaderSize) + presizeWALFrames*int64(wal.FrameHeaderSize+wal.DefaultPageSize)
	size := func(when string) {
		t.Helper()
		st, err := os.Stat(path + "-wal")
		if err != nil || st.Size() != want {
			t.Fatalf("%s: WAL %v (%v), want %d bytes", when, st, err, want)
		}
	}
	size("after open")
	id := uint64(0)
	for a.checkpoints == 0 {
		id++
		push(t, a, upsert("c", id, "Food", 1))
	}
	push(t, a, upsert("c", id+1, "Food", 1)) // the first commit of the restarted WAL
	size("after a checkpoint")
	r, err := a.OpenSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	size("after a snapshot's checkpoint")
	push(t, a, upsert("c", id+2, "Food", 1))
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	push(t, a, upsert("c", id+3, "Food", 1))
	size("after commits past the snapshot")
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	a = openAuthority(t, path)
	size("after a reopen")
	if err := a.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	if got := count(t, a, "Food"); got != int64(id+3) {
		t.Fatalf("Food = %d, want %d", got, id+3)
	}
}

func TestPageSetChain(t *testing.T) {
	a := newAuthority(t)
	for i := uint64(1); i <= 5; i++ {
		push(t, a, upsert("c1", i, "Food", 1))
	}
	sets, err := a.Since(0)
	if err != nil {
		t.Fatal(err)
	}
	if len(sets) != 6 {
		t.Fatalf("%d sets since 0, want 6", len(sets))
	}
	t0 := wal.NewChecksumTable(wal.DefaultPageSize)
	t0.Apply(&wal.PageSet{Version: 1, Flags: wal.FlagSnapshot, PageSize: wal.DefaultPageSize, DBSize: 1,
		Pages: []wal.Page{{Pgno: 1, Data: wal.EmptyDatabase(wal.DefaultPageSize)}}})
	prev := t0.Sum()
	for i, ps := range sets {
		if err := ps.Validate(); err != nil {
			t.Fatal(err)
		}
		if ps.Version != uint64(i+1) {
			t.Fatalf("set %d has version %d", i, ps.Version)
		}
		if ps.PreChecksum != prev {
			t.Fatalf("version %d: pre checksum %016x, the previous post checksum %016x", ps.Version, ps.PreChecksum, prev)
		}
		if got := t0.Preview(ps); got != ps.PostChecksum {
			t.Fatalf("version %d: pages give %016x, post checksum says %016x", ps.Version, got, ps.PostChecksum)
		}
		t0.Apply(ps)
		prev = ps.PostChecksum
	}
	if prev != a.Checksum() {
		t.Fatal("the last post checksum is not the authority's checksum")
	}
}

func TestSince(t *testing.T) {
	a := newAuthority(t)
	for i := uint64(1); i <= 3; i++ {
		push(t, a, upsert("c1", i, "Food", 1))
	}
	v := a.Version()
	for from := uint64(0); from <= v; from++ {
		sets, err := a.Since(from)
		if err != nil {
			t.Fatalf("Since(%d): %v", from, err)
		}
		if uint64(len(sets)) != v-from {
			t.Fatalf("Since(%d): %d sets, want %d", from, len(sets), v-from)
		}
		if len(sets) > 0 && (sets[0].Version != from+1 || sets[len(sets)-1].Version != v) {
			t.Fatalf("Since(%d): versions %d..%d", from, sets[0].Version, sets[len(sets)-1].Version)
		}
	}
	if _, err := a.Since(v + 1); err == nil {
		t.Fatal("Since a version ahead of the server succeeded")
	}
	// The returned slice is a copy: a caller cannot damage the log.
	sets, _ := a.Since(0)
	sets[0] = nil
	if again, _ := a.Since(0); again[0] == nil {
		t.Fatal("Since returned the log itself")
	}
}

func TestReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "server.db")
	a, err := OpenAuthority(ctx, path, testRegistry(t), demoSetup)
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 3; i++ {
		push(t, a, upsert("c1", i, "Food", 1))
	}
	version, sum := a.Version(), a.Checksum()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	a = openAuthority(t, path)
	if a.Version() != version || a.Checksum() != sum {
		t.Fatalf("reopened at %d/%016x, closed at %d/%016x", a.Version(), a.Checksum(), version, sum)
	}
	// The change log starts at the reopen: older versions need a snapshot.
	if _, err := a.Since(version - 1); err == nil {
		t.Fatal("Since a version before the reopen succeeded")
	}
	if sets, err := a.Since(version); err != nil || len(sets) != 0 {
		t.Fatalf("Since(%d) = %d sets, %v", version, len(sets), err)
	}
	// And it carries on from there, chained to the old state.
	ps, res := push(t, a, upsert("c1", 4, "Food", 1))
	if res[0].Outcome != Applied || ps.Version != version+1 || ps.PreChecksum != sum {
		t.Fatalf("after reopen: outcome %d, set %d pre %016x; want version %d pre %016x",
			res[0].Outcome, ps.Version, ps.PreChecksum, version+1, sum)
	}
	if got := count(t, a, "Food"); got != 4 {
		t.Fatalf("Food = %d, want 4", got)
	}
}

func TestSnapshot(t *testing.T) {
	a := newAuthority(t)
	for i := uint64(1); i <= 3; i++ {
		push(t, a, upsert("c1", i, strings.Repeat("x", 1000)+string(rune('a'+i)), 1))
	}
	snap, err := a.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if snap.Flags&wal.FlagSnapshot == 0 || snap.Version != a.Version() {
		t.Fatalf("snapshot flags %#x version %d, want FlagSnapshot at %d", snap.Flags, snap.Version, a.Version())
	}
	if err := snap.Validate(); err != nil {
		t.Fatal(err) // Validate demands exactly pages 1..DBSize of a snapshot
	}
	if snap.DBSize < 2 {
		t.Fatalf("snapshot of %d pages", snap.DBSize)
	}
	tbl := wal.NewChecksumTable(snap.PageSize)
	tbl.Apply(snap)
	if tbl.Sum() != snap.PostChecksum || snap.PostChecksum != a.Checksum() {
		t.Fatalf("snapshot pages give %016x, it says %016x, the authority %016x", tbl.Sum(), snap.PostChecksum, a.Checksum())
	}
	// Pushing after a snapshot (which checkpointed and truncated the WAL)
	// still produces a set that chains on.
	ps, _ := push(t, a, upsert("c1", 4, "Food", 1))
	if ps.PreChecksum != snap.PostChecksum {
		t.Fatal("the version after a snapshot does not chain on")
	}
	tbl.Apply(ps)
	if tbl.Sum() != ps.PostChecksum || ps.PostChecksum != a.Checksum() {
		t.Fatal("the version after a snapshot has the wrong checksum")
	}
}

// Snapshots run TRUNCATE checkpoints; two in a row must not make the capture
// think a generation of commits was lost.
func TestSnapshotTwiceThenCommit(t *testing.T) {
	ctx := context.Background()
	a := newAuthority(t)
	for i := 0; i < 2; i++ {
		if _, err := a.Snapshot(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ps, err := a.Exec(ctx, func(tx mutators.Tx) error {
		_, err := tx.Exec("INSERT INTO Categories(name, count) VALUES ('z', 1)")
		return err
	})
	if err != nil || ps == nil || ps.Version != 2 {
		t.Fatalf("commit after two snapshots: %v %v", ps, err)
	}
	sets, err := a.Since(1)
	if err != nil || len(sets) != 1 {
		t.Fatalf("since 1: %d sets, %v", len(sets), err)
	}
}

// TestCheckpointCadence: the authority checkpoints its own database about
// every checkpointFrames frames, not after every commit once the WAL file
// has grown (SQLite reuses a restarted WAL file at its old length), and
// its WAL stays bounded.
func TestCheckpointCadence(t *testing.T) {
	a := newAuthority(t)
	const versions = 2000
	for i := uint64(1); i <= versions; i++ {
		push(t, a, upsert("c", i, fmt.Sprintf("cat-%d", i%50), 1))
	}
	a.mu.Lock()
	n := a.checkpoints
	a.mu.Unlock()
	if n == 0 || n > versions/50 {
		t.Fatalf("%d checkpoints in %d versions", n, versions)
	}
	st, err := os.Stat(a.path + "-wal")
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 3*checkpointFrames*int64(wal.FrameHeaderSize+wal.DefaultPageSize) {
		t.Fatalf("WAL grew to %d bytes", st.Size())
	}
	t.Logf("%d checkpoints in %d versions, WAL %d KiB", n, versions, st.Size()>>10)
}
