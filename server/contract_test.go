package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/internal/policytest"
	"github.com/sqlrebase/sqlrebase/mutators"
)

func execMutation(client string, id uint64, stmts ...string) Mutation {
	args, _ := json.Marshal(stmts)
	return Mutation{ClientID: client, ID: id, Name: "exec", Args: args}
}

func openChecked(t *testing.T, opts AuthorityOptions) *Authority {
	t.Helper()
	opts.SelfCheck = true
	a, err := OpenAuthorityWith(context.Background(), filepath.Join(t.TempDir(), "server.db"), testRegistry(t), demoSetup, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// withDeadline runs fn and fails the test (with a goroutine dump) if it has
// not returned within d: a wedged authority must fail, not hang. It panics
// rather than t.Fatal, because the wedged goroutine holds the connection
// that the test's cleanup would wait for.
func withDeadline(t *testing.T, d time.Duration, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		// No runtime.Stack(all): it stops the world, which waits for a
		// goroutine stuck in SQLite's compiled code; the panic's own
		// traceback shows the goroutines as far as it can.
		panic(fmt.Sprintf("%s: still running after %v", t.Name(), d))
	}
}

// TestServerEnforcesMutatorContract runs, for every statement the contract
// forbids, a batch with that statement in a mutator between two good
// mutations of other clients: the bad one is rejected with a reason naming
// the statement, the others are applied, nothing else is committed, the
// file matches the checksum, and the next mutation of every client runs.
func TestServerEnforcesMutatorContract(t *testing.T) {
	a := openChecked(t, AuthorityOptions{})
	ctx := context.Background()
	for i, c := range policytest.Forbidden {
		id := uint64(i + 1)
		_, res := push(t, a,
			upsert("good", 2*id-1, "Food", 1),
			execMutation("bad", id, "INSERT INTO Categories(name, count) VALUES('bad', 1)", c.SQL),
			upsert("victim", id, "Food", 1),
		)
		if res[0].Outcome != Applied || res[2].Outcome != Applied {
			t.Fatalf("%s: the other mutations of the batch: %+v %+v", c.SQL, res[0], res[2])
		}
		if res[1].Outcome != Rejected || !strings.Contains(res[1].Err, c.Why) || !strings.Contains(res[1].Err, ErrForbidden.Error()) {
			t.Fatalf("%s: outcome %d %q, want rejected with %q", c.SQL, res[1].Outcome, res[1].Err, c.Why)
		}
		// A second push in the next batch goes through: nothing is stuck,
		// and the victim's next id is neither skipped nor refused.
		_, res = push(t, a, upsert("good", 2*id, "Food", 1))
		if res[0].Outcome != Applied {
			t.Fatalf("%s: the next batch: %+v", c.SQL, res[0])
		}
		if err := a.Verify(ctx); err != nil {
			t.Fatalf("%s: %v", c.SQL, err)
		}
		if got, want := count(t, a, "Food"), int64(3*(i+1)); got != want {
			t.Fatalf("%s: Food = %d, want %d (a partial commit, or a lost mutation)", c.SQL, got, want)
		}
		if got := count(t, a, "bad"); got != 0 {
			t.Fatalf("%s: the rejected mutator's write is there", c.SQL)
		}
		if lastID(t, a, "victim") != id || lastID(t, a, "bad") != id {
			t.Fatalf("%s: last ids victim=%d bad=%d, want %d", c.SQL, lastID(t, a, "victim"), lastID(t, a, "bad"), id)
		}
	}
	rej, err := mutators.Rejections(ctx, a.db, "bad", 0, uint64(len(policytest.Forbidden)))
	if err != nil || len(rej) != len(policytest.Forbidden) {
		t.Fatalf("rejections recorded: %d (%v), want %d", len(rej), err, len(policytest.Forbidden))
	}
}

// TestServerMutatorMayUseSavepoints: its own savepoints are fine.
func TestServerMutatorMayUseSavepoints(t *testing.T) {
	a := openChecked(t, AuthorityOptions{})
	_, res := push(t, a, execMutation("c", 1,
		"INSERT INTO Categories(name, count) VALUES('a', 1)",
		"SAVEPOINT s1",
		"INSERT INTO Categories(name, count) VALUES('b', 1)",
		"ROLLBACK TO s1",
		"RELEASE s1",
	))
	if res[0].Outcome != Applied {
		t.Fatal(res[0].Err)
	}
	if count(t, a, "a") != 1 || count(t, a, "b") != 0 {
		t.Fatal("savepoints inside a mutator misbehave")
	}
}

const slowQuery = `WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 20000000) SELECT count(*) FROM c`

// TestServerMutatorTimeLimit: a mutator running a very slow query, or a
// very slow write (whose interruption makes SQLite roll back the whole
// transaction), is rejected with "time limit exceeded" naming the limit;
// the other mutations of its batch and the next batch are applied.
func TestServerMutatorTimeLimit(t *testing.T) {
	limit := 200 * time.Millisecond
	a := openChecked(t, AuthorityOptions{MutatorTimeout: limit})
	slowRead := func(client string, id uint64) Mutation {
		args, _ := json.Marshal(slowQuery)
		return Mutation{ClientID: client, ID: id, Name: "query", Args: args}
	}
	slowWrite := func(client string, id uint64) Mutation {
		return execMutation(client, id, `INSERT INTO Categories(name, count)
			WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 20000000) SELECT 'n' || x, x FROM c`)
	}
	for round, slow := range []func(string, uint64) Mutation{slowRead, slowWrite} {
		id := uint64(round + 1)
		var res []Result
		withDeadline(t, 20*time.Second, func() {
			_, res = push(t, a, upsert("c1", id, "Food", 1), slow("slow", id), upsert("c2", id, "Food", 1))
		})
		if res[1].Outcome != Rejected || !strings.Contains(res[1].Err, "time limit exceeded") || !strings.Contains(res[1].Err, limit.String()) {
			t.Fatalf("round %d: slow mutation %d %q, want rejected with time limit exceeded (%v)", round, res[1].Outcome, res[1].Err, limit)
		}
		if res[0].Outcome != Applied || res[2].Outcome != Applied {
			t.Fatalf("round %d: the others: %+v %+v", round, res[0], res[2])
		}
		if got, want := count(t, a, "Food"), int64(2*(round+1)); got != want {
			t.Fatalf("round %d: Food = %d, want %d", round, got, want)
		}
		if got := count(t, a, "n1"); got != 0 {
			t.Fatalf("round %d: the slow write's rows are there", round)
		}
		_, res = push(t, a, upsert("c3", id, "Food", 0))
		if res[0].Outcome != Applied {
			t.Fatalf("round %d: next batch: %+v", round, res[0])
		}
	}
}

// TestInMemoryLogBounded: an in-process authority keeps only the latest
// versions, and says so to a caller that asks for older ones.
func TestInMemoryLogBounded(t *testing.T) {
	a := openChecked(t, AuthorityOptions{LogVersions: 10})
	for i := uint64(1); i <= 50; i++ {
		push(t, a, upsert("c", i, "Food", 1))
	}
	if len(a.log) > 10 {
		t.Fatalf("the in-memory log holds %d versions, want at most 10", len(a.log))
	}
	if _, err := a.Since(a.Version() - 20); err == nil {
		t.Fatal("Since a version the log dropped did not fail")
	}
	sets, err := a.Since(a.Version() - 5)
	if err != nil || len(sets) != 5 || sets[4].Version != a.Version() {
		t.Fatalf("Since: %d sets, %v", len(sets), err)
	}
}

// TestOpenDoesNotReadTheWholeFile: opening an authority on a database of
// many MB allocates far less than its size (it used to os.ReadFile it).
func TestOpenDoesNotReadTheWholeFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "server.db")
	a, err := OpenAuthority(context.Background(), path, testRegistry(t), demoSetup)
	if err != nil {
		t.Fatal(err)
	}
	const size = 32 << 20
	if _, err := a.Exec(context.Background(), func(tx mutators.Tx) error {
		_, err := tx.Exec(`CREATE TABLE blob(b); INSERT INTO blob WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 32) SELECT zeroblob(1048576) FROM c`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	a, err = OpenAuthorityWith(context.Background(), path, testRegistry(t), demoSetup, AuthorityOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > size/4 {
		t.Fatalf("opening a %d MiB database allocated %d MiB", size>>20, got>>20)
	}
	if err := a.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestVerifyDetectsAMismatch(t *testing.T) {
	a := openChecked(t, AuthorityOptions{})
	push(t, a, upsert("c", 1, "Food", 1))
	if err := a.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Change the file behind the authority's back (as a mutator that
	// committed part of a batch once did).
	if _, err := a.conn.ExecContext(context.Background(), "UPDATE Categories SET count = 99"); err != nil {
		t.Fatal(err)
	}
	if err := a.Verify(context.Background()); !errors.Is(err, ErrSelfCheck) {
		t.Fatalf("Verify after a write behind its back: %v, want ErrSelfCheck", err)
	}
}

// TestMutatorTimeLimitUnderCancellableContext: a Push under a context of
// the caller's that can be cancelled takes the other path of runMutator (a
// deadline derived from that context); the limit holds there too, and many
// mutators in a row under the writer's own context reuse one deadline
// without one of them inheriting an earlier one's expiry.
func TestMutatorTimeLimitUnderCancellableContext(t *testing.T) {
	limit := 200 * time.Millisecond
	a := openChecked(t, AuthorityOptions{MutatorTimeout: limit})
	args, _ := json.Marshal(slowQuery)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var res []Result
	withDeadline(t, 20*time.Second, func() {
		var err error
		_, res, err = a.Push(ctx, []Mutation{upsert("c1", 1, "Food", 1), {ClientID: "slow", ID: 1, Name: "query", Args: args}})
		if err != nil {
			t.Error(err)
		}
	})
	if len(res) != 2 || res[0].Outcome != Applied || res[1].Outcome != Rejected || !strings.Contains(res[1].Err, "time limit exceeded") {
		t.Fatalf("results %+v", res)
	}
	// After a fired limit, fast mutators under the writer's context are
	// not rejected: each gets a fresh deadline.
	for i := uint64(2); i < 50; i++ {
		if _, res := push(t, a, upsert("c1", i, "Food", 1)); res[0].Outcome != Applied {
			t.Fatalf("mutation %d: %+v", i, res[0])
		}
	}
}

// TestServerCachedMutatorStatementAfterSchemaChange: the writer keeps the
// mutators' statements prepared (Authority.mq), and SQLite prepares a
// cached statement again after a schema change: under the mutator's role
// then too, since only mutators run the statements of that cache. A
// trigger that an administrative change adds, writing a reserved table,
// makes the demo's cached upsert a forbidden statement until the trigger
// goes; a new column is seen by the same cached statement.
func TestServerCachedMutatorStatementAfterSchemaChange(t *testing.T) {
	a := openChecked(t, AuthorityOptions{})
	ctx := context.Background()
	exec := func(stmt string) {
		t.Helper()
		if _, err := a.Exec(ctx, func(tx mutators.Tx) error { _, err := tx.Exec(stmt); return err }); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
	}
	if _, res := push(t, a, upsert("c", 1, "Food", 1)); res[0].Outcome != Applied {
		t.Fatal(res[0].Err)
	}
	if n := a.mq.Len(); n != 1 {
		t.Fatalf("%d statements in the mutators' cache, want the demo's upsert", n)
	}
	exec(`CREATE TRIGGER bump AFTER UPDATE ON Categories BEGIN UPDATE _sqlrebase_meta SET value = value WHERE 0; END`)
	_, res := push(t, a, upsert("c", 2, "Food", 1))
	if res[0].Outcome != Rejected || !strings.Contains(res[0].Err, ErrForbidden.Error()) || !strings.Contains(res[0].Err, `UPDATE on reserved table "_sqlrebase_meta"`) {
		t.Fatalf("the upsert with the trigger: outcome %d %q, want rejected as forbidden", res[0].Outcome, res[0].Err)
	}
	exec(`DROP TRIGGER bump`)
	exec(`ALTER TABLE Categories ADD COLUMN note TEXT DEFAULT 'n'`)
	if _, res := push(t, a, upsert("c", 3, "Food", 1), upsert("c", 4, "Drinks", 1)); res[0].Outcome != Applied || res[1].Outcome != Applied {
		t.Fatalf("after the trigger went: %+v", res)
	}
	if got := count(t, a, "Food"); got != 2 {
		t.Fatalf("Food = %d, want 2", got)
	}
	var note string
	if err := a.db.QueryRowContext(ctx, `SELECT note FROM Categories WHERE name = 'Drinks'`).Scan(&note); err != nil || note != "n" {
		t.Fatalf("note %q, %v", note, err)
	}
	if err := a.Verify(ctx); err != nil {
		t.Fatal(err)
	}
}
