package replica

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// liveSetup makes an authority whose schema has tables a, b and c.
func liveSetup(t testing.TB) (*server.Authority, *mutators.Registry) {
	reg := testRegistry(t)
	a, err := server.OpenAuthority(context.Background(), filepath.Join(t.TempDir(), "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec(`CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT);
			CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT);
			CREATE TABLE c (id INTEGER PRIMARY KEY, v TEXT)`)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a, reg
}

func next(t *testing.T, q *LiveQuery) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	res, err := q.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	return res
}

// noNext fails if q delivers within a short while (a delivery that should
// not exist; the wait only bounds how long the test looks).
func noNext(t *testing.T, q *LiveQuery) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if res, err := q.Next(ctx); err == nil {
		t.Fatalf("unexpected delivery %+v", res.Rows)
	}
}

// quiet gives q's goroutine time to handle a kick (a test that would miss
// a re-run only passes wrongly, never fails wrongly, if it is short).
func quiet(q *LiveQuery) { time.Sleep(100 * time.Millisecond) }

func TestWatchOnlyItsTables(t *testing.T) {
	ctx := context.Background()
	a, reg := liveSetup(t)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	qa, err := r.Watch(ctx, "SELECT id, v FROM a ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	defer qa.Close()
	qb, _ := r.Watch(ctx, "SELECT id, v FROM b ORDER BY id")
	defer qb.Close()
	if res := next(t, qa); len(res.Rows) != 0 {
		t.Fatalf("first result %v", res.Rows)
	}
	next(t, qb)
	// A rebase builds the page map (the first one with watchers re-runs all).
	catchUp(t, a, r)
	quiet(qa)
	runsB := qb.runs.Load()

	mustMutate(t, r, "exec", execArgs("INSERT INTO a VALUES (1, 'x')"))
	res := next(t, qa)
	if len(res.Rows) != 1 || len(res.Added) != 1 {
		t.Fatalf("after insert %+v", res)
	}
	// The server's version (written through the same mutation) changes a only.
	if err := r.Rebase(ctx, push(t, a, r)); err != nil {
		t.Fatal(err)
	}
	noNext(t, qa) // same rows: no repeat
	noNext(t, qb)
	quiet(qb)
	if got := qb.runs.Load(); got != runsB {
		t.Fatalf("the query on b re-ran %d times for changes to a", got-runsB)
	}
	// A server-side change to b, with nothing pending: from its pages alone.
	other := openReplica(t, filepath.Join(t.TempDir(), "o.db"), reg)
	catchUp(t, a, other)
	mustMutate(t, other, "exec", execArgs("UPDATE b SET v = 'y' WHERE id = 7", "INSERT INTO b VALUES (2, 'z')"))
	push(t, a, other)
	runsA := qa.runs.Load()
	catchUp(t, a, r)
	if res := next(t, qb); len(res.Rows) != 1 || len(res.Added) != 1 {
		t.Fatalf("b after server change %+v", res)
	}
	quiet(qa)
	if got := qa.runs.Load(); got != runsA {
		t.Fatalf("the query on a re-ran %d times for a server change to b", got-runsA)
	}
	if got := qb.Tables(); len(got) != 1 || got[0] != "b" {
		t.Fatalf("tables read %v", got)
	}
}

func TestChangeSaysSettledAndRejected(t *testing.T) {
	ctx := context.Background()
	a, reg := liveSetup(t)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	var got []Change
	cancel := r.OnChange(func(c Change) { got = append(got, c) })
	defer cancel()
	h1 := mustMutate(t, r, "exec", execArgs("INSERT INTO a VALUES (1, 'x')"))
	h2 := mustMutate(t, r, "fail", json.RawMessage(`"no"`))
	if len(got) != 2 || len(got[0].Tables) != 1 || got[0].Tables[0] != "a" {
		t.Fatalf("mutate changes %+v", got)
	}
	if err := r.Rebase(ctx, push(t, a, r)); err != nil {
		t.Fatal(err)
	}
	last := got[len(got)-1]
	if len(last.Settled) != 2 || len(last.Rejected) != 1 || last.Rejected[0].ID != h2.ID || last.Rejected[0].Name != "fail" {
		t.Fatalf("rebase change %+v (h1 %d, h2 %d)", last, h1.ID, h2.ID)
	}
}

func TestWatchEndsWhenTableDropped(t *testing.T) {
	ctx := context.Background()
	a, reg := liveSetup(t)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	q, _ := r.Watch(ctx, "SELECT id FROM c")
	defer q.Close()
	next(t, q)
	other := openReplica(t, filepath.Join(t.TempDir(), "o.db"), reg)
	catchUp(t, a, other)
	mustMutate(t, other, "exec", execArgs("DROP TABLE c"))
	if ps := push(t, a, other); ps == nil {
		t.Skip("the server refuses DDL in a mutator")
	}
	catchUp(t, a, r)
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err := q.Next(wctx)
	if !errors.Is(err, ErrQueryGone) {
		t.Fatalf("after DROP TABLE: %v", err)
	}
}
