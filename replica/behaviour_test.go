package replica

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

func execArgs(stmts ...string) json.RawMessage {
	b, _ := json.Marshal(stmts)
	return b
}

func mustMutate(t tb, r *Replica, name string, args json.RawMessage) *Handle {
	t.Helper()
	h, err := r.Mutate(context.Background(), name, args)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestOtherConnectionsSeePending(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	// Pin two pool connections so the read is not on the one that was warm.
	ctx := context.Background()
	c1, _ := r.DB().Conn(ctx)
	c2, _ := r.DB().Conn(ctx)
	defer c1.Close()
	defer c2.Close()
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 5))
	for i, c := range []*sql.Conn{c1, c2} {
		var n int64
		if err := c.QueryRowContext(ctx, "SELECT count FROM Categories WHERE name='Food'").Scan(&n); err != nil || n != 5 {
			t.Fatalf("connection %d sees %d, %v", i, n, err)
		}
	}
}

func TestDBRefusesReplicatedWrites(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	ctx := context.Background()
	for _, q := range []string{
		"INSERT INTO Categories(name, count) VALUES('x', 1)",
		"UPDATE Categories SET count = 3",
		"DELETE FROM Categories",
		"CREATE TABLE t(x)",
		"DROP TABLE Categories",
		"CREATE INDEX i ON Categories(count)",
		"ALTER TABLE Categories ADD COLUMN y",
		"PRAGMA wal_checkpoint(TRUNCATE)",
		"PRAGMA journal_mode=DELETE",
		"UPDATE _sqlrebase_meta SET value = 9",
	} {
		if _, err := r.DB().ExecContext(ctx, q); !errors.Is(err, ErrReadOnly) {
			t.Errorf("%s: got %v, want ErrReadOnly", q, err)
		}
	}
	if got := categories(t, r.DB()); len(got) != 0 {
		t.Fatalf("state changed: %v", got)
	}
	if st := r.Status(); st.Checksum != a.Checksum() {
		t.Fatal("main file changed")
	}
}

func TestMutatorsMayNotControlTransactions(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	for _, stmts := range [][]string{
		{"COMMIT"},
		{"BEGIN"},
		{"ROLLBACK"},
		{"UPDATE _sqlrebase_clients SET last_mutation_id = 100"},
		{"ATTACH ':memory:' AS x"},
	} {
		h := mustMutate(t, r, "exec", execArgs(stmts...))
		if !errors.Is(h.LocalErr(), ErrForbidden) {
			t.Errorf("%v: local error %v, want ErrForbidden", stmts, h.LocalErr())
		}
	}
	// The writer is still usable and the queue intact.
	h := mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if h.LocalErr() != nil {
		t.Fatal(h.LocalErr())
	}
	if n := len(r.Pending()); n != 6 {
		t.Fatalf("pending %d, want 6", n)
	}
}

func TestNestedSavepointsInMutator(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	h := mustMutate(t, r, "exec", execArgs(
		"INSERT INTO Categories(name, count) VALUES('a', 1)",
		"SAVEPOINT inner1",
		"INSERT INTO Categories(name, count) VALUES('b', 1)",
		"SAVEPOINT inner2",
		"INSERT INTO Categories(name, count) VALUES('c', 1)",
		"ROLLBACK TO inner2",
		"RELEASE inner2",
		"RELEASE inner1",
	))
	if h.LocalErr() != nil {
		t.Fatal(h.LocalErr())
	}
	want := map[string]int64{"a": 1, "b": 1}
	if got := categories(t, r.DB()); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("local %v", got)
	}
	if err := r.Rebase(context.Background(), push(t, a, r)); err != nil {
		t.Fatal(err)
	}
	if got := categories(t, r.DB()); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("confirmed %v", got)
	}
	if got := categories(t, serverDB{a}); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("server %v", got)
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 7))

	// Unknown mutator and bad args are refused before anything is queued.
	if _, err := r.Mutate(ctx, "nope", []byte(`{}`)); !errors.Is(err, mutators.ErrUnknownMutator) {
		t.Fatalf("unknown mutator: %v", err)
	}
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, []byte(`{not json`)); !errors.Is(err, mutators.ErrInvalidArgs) {
		t.Fatalf("bad args: %v", err)
	}
	// A mutator error is queued with a local error; the server decides.
	h := mustMutate(t, r, "fail", []byte(`"boom"`))
	var f *failure
	if !errors.As(h.LocalErr(), &f) {
		t.Fatalf("local error %v", h.LocalErr())
	}

	good := push(t, a, r) // version 2
	before := r.Status()
	bad := map[string]func() *wal.PageSet{
		"version gap": func() *wal.PageSet { c := *good; c.Version += 1; return &c },
		"pre checksum": func() *wal.PageSet {
			c := *good
			c.PreChecksum ^= 1
			return &c
		},
		"post checksum": func() *wal.PageSet {
			c := *good
			c.PostChecksum ^= 1
			return &c
		},
		"corrupt page": func() *wal.PageSet {
			c := *good
			c.Pages = append([]wal.Page(nil), good.Pages...)
			d := append([]byte(nil), c.Pages[0].Data...)
			d[len(d)-1] ^= 0xff
			c.Pages[0].Data = d
			return &c
		},
		"page size": func() *wal.PageSet {
			c := *good
			c.PageSize = 8192
			c.Pages = nil
			return &c
		},
		"nil": func() *wal.PageSet { return nil },
	}
	wantErr := map[string]error{
		"version gap": vfs.ErrVersion, "pre checksum": vfs.ErrChecksum, "post checksum": vfs.ErrChecksum,
		"corrupt page": vfs.ErrChecksum, "page size": vfs.ErrPageSize, "nil": vfs.ErrVersion,
	}
	for name, mk := range bad {
		err := r.Rebase(ctx, mk())
		if !errors.Is(err, wantErr[name]) {
			t.Errorf("%s: got %v, want %v", name, err, wantErr[name])
		}
		if st := r.Status(); st != before {
			t.Fatalf("%s: state changed %+v -> %+v", name, before, st)
		}
		if got := categories(t, r.DB()); got["Food"] != 7 {
			t.Fatalf("%s: pending state lost: %v", name, got)
		}
	}
	// Truncated and corrupt encodings are refused by the decoder.
	enc, _ := good.MarshalBinary()
	if _, err := wal.DecodePageSet(enc[:len(enc)-9], wal.Limits{}); !errors.Is(err, wal.ErrTruncated) && !errors.Is(err, wal.ErrCorrupt) {
		t.Fatalf("truncated: %v", err)
	}
	enc[100] ^= 1
	if _, err := wal.DecodePageSet(enc, wal.Limits{}); !errors.Is(err, wal.ErrCorrupt) {
		t.Fatalf("corrupt: %v", err)
	}
	// And the good one still applies afterwards.
	if err := r.Rebase(ctx, good); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.Checksum != a.Checksum() || st.Pending != 0 {
		t.Fatalf("after good: %+v", st)
	}
	var rej *RejectedError
	if err := h.Wait(ctx); !errors.As(err, &rej) || rej.Message != "mutator fail: boom" && rej.Message == "" {
		t.Fatalf("fail: %v", err)
	}
}

func TestSecondOpenIsRefused(t *testing.T) {
	reg := testRegistry(t)
	path := filepath.Join(t.TempDir(), "r.db")
	openReplica(t, path, reg)
	if _, err := Open(context.Background(), path, Options{Mutators: reg}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v", err)
	}
}

// TestExplicitTransactions: the app reads with BEGIN…COMMIT on DB() and
// writes its local database in its own transactions while mutations and
// rebases run. The SAVEPOINT prototype could do neither.
func TestExplicitTransactions(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	dir := t.TempDir()
	r, err := Open(ctx, filepath.Join(dir, "r.db"), Options{Mutators: reg, LocalName: "local", LocalPath: filepath.Join(dir, "local.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	catchUp(t, a, r)
	if _, err := r.DB().ExecContext(ctx, "CREATE TABLE IF NOT EXISTS local.notes(n INTEGER)"); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var txErr atomic.Value
	wg.Add(2)
	go func() { // reader: a consistent snapshot inside one transaction
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			tx, err := r.DB().BeginTx(ctx, nil)
			if err != nil {
				txErr.Store(err)
				return
			}
			var c1, c2 int64
			tx.QueryRowContext(ctx, "SELECT coalesce(sum(count),0) FROM Categories").Scan(&c1)
			tx.QueryRowContext(ctx, "SELECT coalesce(sum(count),0) FROM Categories").Scan(&c2)
			if err := tx.Commit(); err != nil {
				txErr.Store(err)
				return
			}
			if c1 != c2 {
				txErr.Store(fmt.Errorf("snapshot moved inside a transaction: %d then %d", c1, c2))
				return
			}
		}
	}()
	go func() { // local writer: its own explicit transactions
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			tx, err := r.DB().BeginTx(ctx, nil)
			if err != nil {
				txErr.Store(err)
				return
			}
			if _, err := tx.ExecContext(ctx, "INSERT INTO local.notes VALUES(?)", i); err != nil {
				tx.Rollback()
				txErr.Store(err)
				return
			}
			if err := tx.Commit(); err != nil {
				txErr.Store(err)
				return
			}
		}
	}()
	for i := 0; i < 30; i++ {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
		if i%3 == 2 {
			if err := r.Rebase(ctx, push(t, a, r)); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	if err, _ := txErr.Load().(error); err != nil {
		t.Fatal(err)
	}
	var notes int
	if err := r.DB().QueryRowContext(ctx, "SELECT count(*) FROM local.notes").Scan(&notes); err != nil || notes == 0 {
		t.Fatalf("local notes %d, %v", notes, err)
	}
	if got := categories(t, r.DB()); got["Food"] != 30 {
		t.Fatalf("state %v", got)
	}
	// Local data survives a reopen, replicated state equals the server's.
	r.Close()
	r2, err := Open(ctx, filepath.Join(dir, "r.db"), Options{Mutators: reg, LocalName: "local", LocalPath: filepath.Join(dir, "local.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	var notes2 int
	r2.DB().QueryRowContext(ctx, "SELECT count(*) FROM local.notes").Scan(&notes2)
	if notes2 != notes {
		t.Fatalf("local notes after reopen %d, want %d", notes2, notes)
	}
	if st := r2.Status(); st.Checksum != a.Checksum() {
		t.Fatalf("checksum %x, server %x", st.Checksum, a.Checksum())
	}
}

// TestNoMidRebaseState: readers hammer a query whose answer must include
// every pending mutation while rebases run (invariant 2).
func TestNoMidRebaseState(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	other := openReplica(t, filepath.Join(t.TempDir(), "o.db"), reg)
	catchUp(t, a, other)

	// Each local mutation adds 1 to Food; the visible sum must never drop
	// below what Mutate has returned, whatever rebases do.
	var returned atomic.Int64
	var failed atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				floor := returned.Load()
				var n int64
				err := r.DB().QueryRowContext(ctx, "SELECT coalesce((SELECT count FROM Categories WHERE name='Mine'),0)").Scan(&n)
				if err != nil {
					failed.Store(err)
					return
				}
				if n < floor {
					failed.Store(fmt.Errorf("reader saw %d, but %d mutations had returned", n, floor))
					return
				}
			}
		}()
	}
	for i := 0; i < 60; i++ {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Mine", 1))
		returned.Add(1)
		// Another client's change makes a server version to rebase on.
		mustMutate(t, other, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Theirs", 1))
		push(t, a, other)
		if i%4 == 3 {
			push(t, a, r) // acknowledge some of ours too
		}
		catchUp(t, a, r)
	}
	close(stop)
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		t.Fatal(err)
	}
}

// serverDB lets test helpers query the authority's database.
type serverDB struct {
	a interface {
		Query(context.Context, string, ...any) (*sql.Rows, error)
	}
}

func (s serverDB) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	return s.a.Query(ctx, q, args...)
}
