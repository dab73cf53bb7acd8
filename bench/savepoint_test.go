package bench

import (
	"context"
	"database/sql"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
)

func demoRegistry(t testing.TB) *mutators.Registry {
	t.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	return reg
}

func openEngine(t testing.TB, path string) *SavepointEngine {
	t.Helper()
	e, err := OpenSavepoint(path, demoRegistry(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// count reads the count of category name, or 0 if there is none (or no
// table yet).
func count(t testing.TB, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, name string) int64 {
	t.Helper()
	var n int64
	err := q.QueryRowContext(context.Background(), "SELECT count FROM Categories WHERE name = ?", name).Scan(&n)
	if err != nil && err != sql.ErrNoRows && !strings.Contains(err.Error(), "no such table") {
		t.Fatal(err)
	}
	return n
}

// fakeServer stands for the prototype's server: it orders mutations, runs
// their SQL on its own database and sends that SQL to every client.
type fakeServer struct {
	t       *testing.T
	db      *SavepointEngine // never has anything pending: it only commits
	clients []*SavepointEngine
	queued  [][]int64 // per client, deltas sent but not yet processed
}

// process runs the oldest queued mutation of client c and broadcasts it.
func (s *fakeServer) process(c int) {
	s.t.Helper()
	ctx := context.Background()
	delta := s.queued[c][0]
	s.queued[c] = s.queued[c][1:]
	stmts := DemoSQL("Food", delta)
	if err := s.db.Rebase(ctx, stmts, 0); err != nil {
		s.t.Fatal(err)
	}
	for i, e := range s.clients {
		acked := 0
		if i == c {
			acked = 1
		}
		if err := e.Rebase(ctx, stmts, acked); err != nil {
			s.t.Fatalf("client %d: %v", i+1, err)
		}
	}
}

// TestSavepointConverges runs the prototype's scenario (client 1 adds 1 ten
// times, client 2 subtracts 3 three times, client 3 only watches), with the
// server's processing interleaved with the clients' optimistic mutations.
// Everyone must end on Food = 1, and the optimistic state must always be the
// confirmed state plus the client's own pending deltas.
func TestSavepointConverges(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := &fakeServer{t: t, db: openEngine(t, filepath.Join(dir, "server.db"))}
	for i := range 3 {
		s.clients = append(s.clients, openEngine(t, filepath.Join(dir, "client"+string(rune('1'+i))+".db")))
	}
	s.queued = make([][]int64, 3)
	mutate := func(c int, delta int64) {
		t.Helper()
		if err := s.clients[c].Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", delta)); err != nil {
			t.Fatal(err)
		}
		s.queued[c] = append(s.queued[c], delta)
	}
	check := func() {
		t.Helper()
		confirmed := count(t, s.db.Conn(), "Food")
		for i, e := range s.clients {
			want := confirmed
			for _, d := range s.queued[i] {
				want += d
			}
			if got := count(t, e.Conn(), "Food"); got != want {
				t.Fatalf("client %d sees Food = %d, want %d (confirmed %d, pending %v)", i+1, got, want, confirmed, s.queued[i])
			}
			if e.Pending() != len(s.queued[i]) {
				t.Fatalf("client %d has %d pending, want %d", i+1, e.Pending(), len(s.queued[i]))
			}
		}
	}
	ones, threes := 10, 3
	for step := 0; ones > 0 || threes > 0 || len(s.queued[0]) > 0 || len(s.queued[1]) > 0; step++ {
		if ones > 0 {
			mutate(0, 1)
			ones--
		}
		if threes > 0 && step%4 == 0 {
			mutate(1, -3)
			threes--
		}
		check()
		// Client 1 has the longer latency: the server sees its mutations
		// three steps late; client 2's at once.
		if len(s.queued[1]) > 0 {
			s.process(1)
			check()
		}
		if len(s.queued[0]) > 0 && (len(s.queued[0]) > 3 || ones == 0) {
			s.process(0)
			check()
		}
	}
	for i, e := range s.clients {
		if got := count(t, e.Conn(), "Food"); got != 1 {
			t.Errorf("client %d ends on Food = %d, want 1", i+1, got)
		}
	}
	if got := count(t, s.db.Conn(), "Food"); got != 1 {
		t.Errorf("server ends on Food = %d, want 1", got)
	}
}

// TestSavepointPendingIsInvisible shows that pending mutations live only in
// the engine's open transaction: another connection to the same file sees
// the confirmed state only, and a reopen loses them.
func TestSavepointPendingIsInvisible(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "client.db")
	e := openEngine(t, path)
	if err := e.Rebase(ctx, DemoSQL("Food", 5), 0); err != nil {
		t.Fatal(err)
	}
	if err := e.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatal(err)
	}
	if got := count(t, e.Conn(), "Food"); got != 6 {
		t.Fatalf("engine sees Food = %d, want 6", got)
	}
	other, err := driver.Open("file:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if got := count(t, other, "Food"); got != 5 {
		t.Fatalf("another connection sees Food = %d, want the confirmed 5", got)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e2 := openEngine(t, path)
	if got, n := count(t, e2.Conn(), "Food"), e2.Pending(); got != 5 || n != 0 {
		t.Fatalf("after reopen: Food = %d with %d pending, want 5 with 0: the pending mutation is lost", got, n)
	}
}

// TestSavepointAppTransaction shows the known limitation: the app cannot use
// transactions of its own on the engine.
func TestSavepointAppTransaction(t *testing.T) {
	ctx := context.Background()
	mutate := func(e *SavepointEngine, delta int64) {
		t.Helper()
		if err := e.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", delta)); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("BEGIN while pending fails", func(t *testing.T) {
		e := openEngine(t, filepath.Join(t.TempDir(), "client.db"))
		mutate(e, 1)
		_, err := e.Conn().ExecContext(ctx, "BEGIN")
		if err == nil || !strings.Contains(err.Error(), "cannot start a transaction within a transaction") {
			t.Fatalf("BEGIN with a mutation pending: got %v, want SQLite's nested transaction error", err)
		}
	})

	t.Run("COMMIT by the app confirms pending work", func(t *testing.T) {
		// The app's BEGIN succeeds when nothing is pending; a mutation then
		// runs inside the app's transaction, and the app's COMMIT writes
		// it to the file as if the server had confirmed it. The engine
		// still counts it as pending, so the next rebase's ROLLBACK TO
		// finds no such savepoint.
		path := filepath.Join(t.TempDir(), "client.db")
		e := openEngine(t, path)
		if _, err := e.Conn().ExecContext(ctx, "BEGIN"); err != nil {
			t.Fatalf("BEGIN with nothing pending: %v", err)
		}
		mutate(e, 1)
		if _, err := e.Conn().ExecContext(ctx, "COMMIT"); err != nil {
			t.Fatalf("COMMIT: %v", err)
		}
		other, err := driver.Open("file:"+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		if got := count(t, other, "Food"); got != 1 {
			t.Fatalf("another connection sees Food = %d, want 1: the unconfirmed mutation was committed", got)
		}
		err = e.Rebase(ctx, DemoSQL("Food", 10), 0)
		if err == nil || !strings.Contains(err.Error(), "no such savepoint") {
			t.Fatalf("rebase after the app's COMMIT: got %v, want \"no such savepoint\"", err)
		}
	})
}
