package mutators_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"
	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/mutators"
)

func openDB(t testing.TB) *sql.DB {
	t.Helper()
	db, err := driver.Open("file:" + filepath.Join(t.TempDir(), "test.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func nop(context.Context, mutators.Tx, json.RawMessage) error { return nil }

func TestRegisterErrors(t *testing.T) {
	r := mutators.NewRegistry()
	bad := []string{"", "has space", "é", "semi;colon", "slash/", strings.Repeat("a", mutators.MaxNameLen+1)}
	for _, name := range bad {
		if err := r.Register(name, nop); !errors.Is(err, mutators.ErrInvalidName) {
			t.Errorf("Register(%q) = %v, want ErrInvalidName", name, err)
		}
	}
	good := []string{"a", "A.b:c-d_e9", strings.Repeat("z", mutators.MaxNameLen)}
	for _, name := range good {
		if err := r.Register(name, nop); err != nil {
			t.Errorf("Register(%q) = %v", name, err)
		}
	}
	if err := r.Register("a", nop); err == nil {
		t.Error("duplicate Register succeeded")
	}
	if err := r.Register("nilfn", nil); err == nil {
		t.Error("Register of nil func succeeded")
	}
	want := append([]string(nil), good...)
	want[0], want[1] = good[1], good[0] // "A..." sorts before "a"
	if got := r.Names(); !reflect.DeepEqual(got, want) {
		t.Errorf("Names() = %q, want %q", got, want)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("MustRegister of a duplicate did not panic")
			}
		}()
		r.MustRegister("a", nop)
	}()
}

func TestLookupAndCheck(t *testing.T) {
	r := mutators.NewRegistry()
	r.MustRegister("m", nop)
	if _, err := r.Lookup("nope"); !errors.Is(err, mutators.ErrUnknownMutator) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("Lookup(nope) = %v", err)
	}
	if fn, err := r.Lookup("m"); err != nil || fn == nil {
		t.Errorf("Lookup(m) = %v, %v", fn, err)
	}
	cases := []struct {
		name string
		args json.RawMessage
		want error
	}{
		{"m", json.RawMessage(`{"a":1}`), nil},
		{"m", json.RawMessage(`null`), nil},
		{"nope", json.RawMessage(`{}`), mutators.ErrUnknownMutator},
		{"bad name", json.RawMessage(`{}`), mutators.ErrInvalidName},
		{"m", nil, mutators.ErrInvalidArgs},
		{"m", json.RawMessage(`{`), mutators.ErrInvalidArgs},
		{"m", json.RawMessage(`{} {}`), mutators.ErrInvalidArgs},
		{"m", json.RawMessage(`"` + strings.Repeat("x", mutators.MaxArgsSize) + `"`), mutators.ErrInvalidArgs},
	}
	for _, c := range cases {
		err := r.Check(c.name, c.args)
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("Check(%q, %.20q) = %v, want %v", c.name, c.args, err, c.want)
		}
		// Run fails the same way before touching tx.
		if c.want != nil {
			if err := r.Run(context.Background(), nil, c.name, c.args); !errors.Is(err, c.want) {
				t.Errorf("Run(%q, %.20q) = %v, want %v", c.name, c.args, err, c.want)
			}
		}
	}
	// Exactly at the limit is fine.
	atLimit := json.RawMessage(`"` + strings.Repeat("x", mutators.MaxArgsSize-2) + `"`)
	if err := r.Check("m", atLimit); err != nil {
		t.Errorf("Check at the size limit: %v", err)
	}
}

func TestRunWrapsMutatorError(t *testing.T) {
	sentinel := errors.New("out of stock")
	r := mutators.NewRegistry()
	r.MustRegister("fail", func(context.Context, mutators.Tx, json.RawMessage) error {
		return fmt.Errorf("checking: %w", sentinel)
	})
	r.MustRegister("panics", func(context.Context, mutators.Tx, json.RawMessage) error {
		var m map[string]int
		//lint:ignore SA5000 the mutator panics on purpose: the test checks that Run recovers
		m["x"] = 1 // nil map write
		return nil
	})
	err := r.Run(context.Background(), nil, "fail", json.RawMessage(`{}`))
	var me *mutators.Error
	if !errors.As(err, &me) || me.Name != "fail" {
		t.Fatalf("Run = %#v, want *Error for fail", err)
	}
	if !errors.Is(err, sentinel) {
		t.Errorf("errors.Is(%v, sentinel) = false", err)
	}
	if got, want := err.Error(), "mutator fail: checking: out of stock"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	err = r.Run(context.Background(), nil, "panics", json.RawMessage(`{}`))
	if !errors.As(err, &me) || me.Name != "panics" || !errors.Is(err, mutators.ErrPanic) {
		t.Errorf("Run of a panicking mutator = %v", err)
	}
}

// A mutator may use savepoints of its own inside the caller's transaction;
// its partial rollback must undo exactly the inner work.
func TestNewTxSavepoints(t *testing.T) {
	ctx := context.Background()
	db := openDB(t)
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `CREATE TABLE t (v TEXT)`); err != nil {
		t.Fatal(err)
	}
	r := mutators.NewRegistry()
	r.MustRegister("nested", func(ctx context.Context, tx mutators.Tx, _ json.RawMessage) error {
		steps := []string{
			`INSERT INTO t VALUES ('a')`,
			`SAVEPOINT outer_sp`,
			`INSERT INTO t VALUES ('b')`,
			`SAVEPOINT inner_sp`,
			`INSERT INTO t VALUES ('c')`,
			`ROLLBACK TO inner_sp`, // drops c
			`RELEASE inner_sp`,
			`INSERT INTO t VALUES ('d')`,
			`RELEASE outer_sp`, // keeps b, d
			`SAVEPOINT third`,
			`INSERT INTO t VALUES ('e')`,
			`ROLLBACK TO third`, // drops e
			`RELEASE third`,
		}
		for _, s := range steps {
			if _, err := tx.Exec(s); err != nil {
				return fmt.Errorf("%s: %w", s, err)
			}
		}
		var n int
		if err := tx.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil {
			return err
		}
		if n != 3 {
			return fmt.Errorf("inside mutator: %d rows, want 3", n)
		}
		return nil
	})
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	if err := r.Run(ctx, mutators.NewTx(ctx, conn), "nested", json.RawMessage(`{}`)); err != nil {
		t.Fatal(err)
	}
	// The caller's transaction is still open: its rollback undoes all.
	rows, err := mutators.NewTx(ctx, conn).Query(`SELECT v FROM t ORDER BY rowid`)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			t.Fatal(err)
		}
		got = append(got, v)
	}
	rows.Close()
	if want := []string{"a", "b", "d"}; !reflect.DeepEqual(got, want) {
		t.Errorf("rows = %q, want %q", got, want)
	}
	if _, err := conn.ExecContext(ctx, `ROLLBACK`); err != nil {
		t.Fatalf("caller's ROLLBACK: %v (the mutator must not have ended the transaction)", err)
	}
	var n int
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM t`).Scan(&n); err != nil || n != 0 {
		t.Errorf("after ROLLBACK: %d rows, %v", n, err)
	}
}

func TestNewTxBindsContext(t *testing.T) {
	db := openDB(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	tx := mutators.NewTx(ctx, db)
	if _, err := tx.Exec(`SELECT 1`); !errors.Is(err, context.Canceled) {
		t.Errorf("Exec with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestDemoMutator(t *testing.T) {
	ctx := context.Background()
	db := openDB(t)
	r := mutators.NewRegistry()
	if err := mutators.RegisterDemo(r); err != nil {
		t.Fatal(err)
	}
	run := func(name string, delta int64) error {
		sqltx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = r.Run(ctx, mutators.NewTx(ctx, sqltx), mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(name, delta))
		if err != nil {
			sqltx.Rollback()
			return err
		}
		return sqltx.Commit()
	}
	// The seed scenario, on an empty database: the mutator creates its table.
	for i := 0; i < 10; i++ {
		if err := run("Food", 1); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		if err := run("Food", -3); err != nil {
			t.Fatal(err)
		}
	}
	var id, count int64
	var name string
	if err := db.QueryRow(`SELECT id, name, count FROM Categories`).Scan(&id, &name, &count); err != nil {
		t.Fatal(err)
	}
	if id != 1 || name != "Food" || count != 1 {
		t.Errorf("row = (%d, %q, %d), want (1, 'Food', 1)", id, name, count)
	}
	if err := run("Drinks", 5); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow(`SELECT id, count FROM Categories WHERE name = 'Drinks'`).Scan(&id, &count); err != nil || id != 2 || count != 5 {
		t.Errorf("Drinks = (%d, %d), %v; want (2, 5)", id, count, err)
	}
	err := run("", 1)
	var me *mutators.Error
	if !errors.As(err, &me) || !errors.Is(err, mutators.ErrEmptyCategory) {
		t.Errorf("empty name: %v", err)
	}
	if err := run2(r, ctx, db, json.RawMessage(`[1,2]`)); err == nil || !errors.As(err, &me) {
		t.Errorf("args of the wrong shape: %v, want *Error", err)
	}
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM Categories`).Scan(&n); err != nil || n != 2 {
		t.Errorf("%d categories, %v; want 2", n, err)
	}
	var a mutators.CategoryDelta
	if err := json.Unmarshal(mutators.CategoryArgs("x\"y", -7), &a); err != nil || a != (mutators.CategoryDelta{Name: "x\"y", Delta: -7}) {
		t.Errorf("CategoryArgs round trip = %+v, %v", a, err)
	}
}

func run2(r *mutators.Registry, ctx context.Context, db *sql.DB, args json.RawMessage) error {
	sqltx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer sqltx.Rollback()
	return r.Run(ctx, mutators.NewTx(ctx, sqltx), mutators.CreateCategoryOrIncrementIfExists, args)
}

func TestReservedOnEmptyDB(t *testing.T) {
	ctx := context.Background()
	db := openDB(t)
	if v, err := mutators.Version(ctx, db); v != 0 || err != nil {
		t.Errorf("Version = %d, %v", v, err)
	}
	if id, err := mutators.LastMutationID(ctx, db, "c1"); id != 0 || err != nil {
		t.Errorf("LastMutationID = %d, %v", id, err)
	}
	if rej, err := mutators.Rejections(ctx, db, "c1", 0, 100); len(rej) != 0 || err != nil {
		t.Errorf("Rejections = %v, %v", rej, err)
	}
	// Writes need the schema.
	if err := mutators.SetVersion(ctx, db, 1); err == nil {
		t.Error("SetVersion without the schema succeeded")
	}
}

func TestReservedHelpers(t *testing.T) {
	ctx := context.Background()
	db := openDB(t)
	for i := 0; i < 2; i++ { // idempotent
		if _, err := db.ExecContext(ctx, mutators.ReservedSchema); err != nil {
			t.Fatal(err)
		}
	}
	for _, tbl := range []string{mutators.TableClients, mutators.TableRejections, mutators.TableMeta} {
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM sqlite_schema WHERE name = ?`, tbl).Scan(&n); err != nil || n != 1 {
			t.Errorf("table %s: %d, %v", tbl, n, err)
		}
	}
	if v, err := mutators.Version(ctx, db); v != 0 || err != nil {
		t.Errorf("Version on fresh schema = %d, %v", v, err)
	}
	for _, v := range []uint64{1, 42, 1 << 62} {
		if err := mutators.SetVersion(ctx, db, v); err != nil {
			t.Fatal(err)
		}
		if got, err := mutators.Version(ctx, db); got != v || err != nil {
			t.Errorf("Version = %d, %v; want %d", got, err, v)
		}
	}
	if err := mutators.SetVersion(ctx, db, 1<<63); !errors.Is(err, mutators.ErrOutOfRange) {
		t.Errorf("SetVersion(1<<63) = %v", err)
	}

	if id, err := mutators.LastMutationID(ctx, db, "c1"); id != 0 || err != nil {
		t.Errorf("LastMutationID(c1) = %d, %v", id, err)
	}
	if err := mutators.SetLastMutationID(ctx, db, "c1", 5); err != nil {
		t.Fatal(err)
	}
	if err := mutators.SetLastMutationID(ctx, db, "c2", 9); err != nil {
		t.Fatal(err)
	}
	if err := mutators.SetLastMutationID(ctx, db, "c1", 7); err != nil {
		t.Fatal(err)
	}
	if id, err := mutators.LastMutationID(ctx, db, "c1"); id != 7 || err != nil {
		t.Errorf("LastMutationID(c1) = %d, %v", id, err)
	}
	if id, err := mutators.LastMutationID(ctx, db, "c2"); id != 9 || err != nil {
		t.Errorf("LastMutationID(c2) = %d, %v", id, err)
	}

	for _, r := range []struct {
		client string
		id     uint64
		msg    string
	}{{"c1", 2, "two"}, {"c1", 4, "four"}, {"c1", 6, "six"}, {"c2", 4, "other"}} {
		if err := mutators.RecordRejection(ctx, db, r.client, r.id, "m", r.msg, 3); err != nil {
			t.Fatal(err)
		}
	}
	if err := mutators.RecordRejection(ctx, db, "c1", 4, "m", "four again", 4); err != nil {
		t.Fatal(err)
	}
	got, err := mutators.Rejections(ctx, db, "c1", 2, 6)
	if want := map[uint64]string{4: "four again", 6: "six"}; err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("Rejections(c1, 2, 6) = %v, %v; want %v", got, err, want)
	}
	if got, err := mutators.Rejections(ctx, db, "c1", 6, 2); err != nil || len(got) != 0 {
		t.Errorf("Rejections with an empty range = %v, %v", got, err)
	}
	if got, err := mutators.Rejections(ctx, db, "c1", 0, 1<<64-1); err != nil || len(got) != 3 {
		t.Errorf("Rejections(c1, 0, max) = %v, %v", got, err)
	}
}

func TestIsReserved(t *testing.T) {
	for name, want := range map[string]bool{
		"_sqlrebase_clients": true,
		"_SQLRebase_meta":    true,
		"_sqlrebase_":        true,
		"_sqlrebase":         false,
		"sqlrebase_x":        false,
		"Categories":         false,
		"":                   false,
	} {
		if got := mutators.IsReserved(name); got != want {
			t.Errorf("IsReserved(%q) = %v", name, got)
		}
	}
	for _, tbl := range []string{mutators.TableClients, mutators.TableRejections, mutators.TableMeta} {
		if !mutators.IsReserved(tbl) {
			t.Errorf("IsReserved(%q) = false", tbl)
		}
	}
}

// TestSettlementIsLastMutationIDAndRejections: Settlement answers, in one
// statement, what LastMutationID and then Rejections(after, that id)
// answer, on a database without the reserved tables, without the client's
// row, and on any history of acknowledgements and rejections.
func TestSettlementIsLastMutationIDAndRejections(t *testing.T) {
	ctx := context.Background()
	agree := func(t interface{ Fatalf(string, ...any) }, db *sql.DB, client string, after uint64) {
		lmid, rej, err := mutators.Settlement(ctx, db, client, after)
		wantID, err1 := mutators.LastMutationID(ctx, db, client)
		wantRej, err2 := mutators.Rejections(ctx, db, client, after, wantID)
		if err != nil || err1 != nil || err2 != nil {
			t.Fatalf("Settlement(%s, %d): %v; the two: %v, %v", client, after, err, err1, err2)
		}
		if lmid != wantID || !reflect.DeepEqual(rej, wantRej) {
			t.Fatalf("Settlement(%s, %d) = %d %v; the two say %d %v", client, after, lmid, rej, wantID, wantRej)
		}
	}
	agree(t, openDB(t), "c1", 0)
	rapid.Check(t, func(rt *rapid.T) {
		db := openDB(t)
		if _, err := db.ExecContext(ctx, mutators.ReservedSchema); err != nil {
			rt.Fatal(err)
		}
		clients := []string{"c0", "c1", "c2"}
		rt.Repeat(map[string]func(*rapid.T){
			"ack": func(rt *rapid.T) {
				if err := mutators.SetLastMutationID(ctx, db, rapid.SampledFrom(clients).Draw(rt, "client"), rapid.Uint64Range(0, 20).Draw(rt, "id")); err != nil {
					rt.Fatal(err)
				}
			},
			"reject": func(rt *rapid.T) {
				if err := mutators.RecordRejection(ctx, db, rapid.SampledFrom(clients).Draw(rt, "client"), rapid.Uint64Range(1, 20).Draw(rt, "id"), "m", rapid.StringMatching(`[a-z]{0,8}`).Draw(rt, "msg"), 1); err != nil {
					rt.Fatal(err)
				}
			},
			"": func(rt *rapid.T) {
				agree(rt, db, rapid.SampledFrom(append(clients, "nobody")).Draw(rt, "client"), rapid.Uint64Range(0, 22).Draw(rt, "after"))
			},
		})
	})
}
