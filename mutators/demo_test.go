package mutators

import (
	"context"
	"encoding/json"
	"testing"
)

var categoryArgCases = []string{
	`{"name":"Food","delta":1}`,
	`{"delta":-3,"name":"Food"}`,
	` { "name" : "Fööd" , "delta" : 0 } `,
	"{\"name\":\"a\",\n\t\"delta\":\r-0}",
	`{"name":"a","name":"b","delta":1,"delta":2}`,
	`{}`,
	`{"name":""}`,
	`{"delta":9223372036854775807}`,
	`{"delta":-9223372036854775808}`,
	// What json.Unmarshal decodes, or refuses, itself:
	`{"name":"a\"b","delta":1}`,
	`{"name":"a\u0062","delta":1}`,
	`{"Name":"a","DELTA":1}`,
	`{"name":"a","delta":1.0}`,
	`{"name":"a","delta":1e3}`,
	`{"name":"a","delta":01}`,
	`{"name":"a","delta":9223372036854775808}`,
	`{"name":"a","delta":null}`,
	`{"name":null,"delta":1}`,
	`{"name":"a","delta":1,"other":[1,{"x":2}]}`,
	"{\"name\":\"\xff\",\"delta\":1}",
	"{\"name\":\"a\x01\",\"delta\":1}",
	`{"name":"a","delta":1} x`,
	`{"name":"a","delta":1}{}`,
	`{"name":"a",}`,
	`{"name":"a" "delta":1}`,
	`{"name":1}`,
	`{"delta":"1"}`,
	`[1,2]`,
	`null`,
	`"x"`,
	``,
	`{`,
	`{"name":"a`,
	`{"delta":-}`,
}

// TestDecodeCategoryDelta: the demo's own decoding takes the args
// CategoryArgs makes, and whatever it takes it decodes as json.Unmarshal
// does.
func TestDecodeCategoryDelta(t *testing.T) {
	for _, want := range []CategoryDelta{{Name: "Food", Delta: 1}, {Name: "cat-0", Delta: -7}, {Name: "日本", Delta: 1 << 40}} {
		got, ok := decodeCategoryDelta(CategoryArgs(want.Name, want.Delta))
		if !ok || got != want {
			t.Errorf("CategoryArgs(%q, %d) decodes to %+v, %v", want.Name, want.Delta, got, ok)
		}
	}
	for _, c := range categoryArgCases {
		checkDecodeCategoryDelta(t, []byte(c))
	}
}

func FuzzDecodeCategoryDelta(f *testing.F) {
	for _, c := range categoryArgCases {
		f.Add([]byte(c))
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkDecodeCategoryDelta(t, b) })
}

func checkDecodeCategoryDelta(t *testing.T, b []byte) {
	t.Helper()
	got, ok := decodeCategoryDelta(b)
	if !ok {
		return
	}
	var want CategoryDelta
	if err := json.Unmarshal(b, &want); err != nil || got != want {
		t.Errorf("%q: decoded %+v, json.Unmarshal %+v, %v", b, got, want, err)
	}
}

// TestDemoMutatorCreatesItsTable: the demo mutator upserts first and
// creates its table only when it is not there, through a statement cache
// as the server and the replica run it: on an empty database, and after
// the table went away under a statement the cache holds.
func TestDemoMutatorCreatesItsTable(t *testing.T) {
	ctx := context.Background()
	q, conn := openStmtCache(t, 8)
	r := NewRegistry()
	if err := RegisterDemo(r); err != nil {
		t.Fatal(err)
	}
	count := func() (n int64) {
		t.Helper()
		if err := conn.QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	run := func() {
		t.Helper()
		if err := r.Run(ctx, NewTx(ctx, q), CreateCategoryOrIncrementIfExists, CategoryArgs("Food", 2)); err != nil {
			t.Fatal(err)
		}
	}
	run()
	run()
	if n := count(); n != 4 {
		t.Fatalf("count %d, want 4", n)
	}
	if _, ok := q.stmts[upsertCategory]; !ok {
		t.Fatal("the upsert is not cached")
	}
	if _, err := conn.ExecContext(ctx, `DROP TABLE Categories`); err != nil {
		t.Fatal(err)
	}
	run()
	if n := count(); n != 2 {
		t.Fatalf("count %d after the table was dropped, want 2", n)
	}
	// In a transaction that rolls back, as a rejected batch does.
	if _, err := conn.ExecContext(ctx, `DROP TABLE Categories`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	run()
	if _, err := conn.ExecContext(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	var tables int
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_schema WHERE name = 'Categories'`).Scan(&tables); err != nil || tables != 0 {
		t.Fatalf("%d tables after the rollback, %v", tables, err)
	}
	run()
	if n := count(); n != 2 {
		t.Fatalf("count %d after the rollback, want 2", n)
	}
}
