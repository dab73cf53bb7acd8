package mutators_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
)

type addTodo struct {
	ID    string `json:"id"`
	Title string `json:"title"`
	Done  bool   `json:"done"`
}

// openConn is a plain database with a todos table, in a transaction as a
// caller of a mutator would hold it.
func openConn(t *testing.T) *sql.Conn {
	t.Helper()
	db, err := driver.Open("file:"+t.TempDir()+"/t.db", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	conn, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.ExecContext(context.Background(), `CREATE TABLE todos(id TEXT PRIMARY KEY, title TEXT NOT NULL, done INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return conn
}

func TestTypedRegister(t *testing.T) {
	reg := mutators.NewRegistry()
	def, err := mutators.Register(reg, "addTodo", func(ctx context.Context, tx mutators.Tx, a addTodo) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO todos(id, title, done) VALUES (?, ?, ?)`, a.ID, a.Title, a.Done)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mutators.Register(reg, "addTodo", func(context.Context, mutators.Tx, addTodo) error { return nil }); err == nil {
		t.Fatal("a second registration of the same name succeeded")
	}
	args, err := def.Args(addTodo{ID: "t1", Title: "milk"})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Check(def.Name, args); err != nil {
		t.Fatalf("Check of encoded args: %v", err)
	}
	conn := openConn(t)
	ctx := context.Background()
	if err := reg.Run(ctx, mutators.NewTx(ctx, conn), def.Name, args); err != nil {
		t.Fatal(err)
	}
	var title string
	if err := conn.QueryRowContext(ctx, `SELECT title FROM todos WHERE id = 't1'`).Scan(&title); err != nil || title != "milk" {
		t.Fatalf("title %q, %v", title, err)
	}

	// A field of the wrong type: Check refuses it, naming the field, so a
	// replica queues nothing; Run (the server) rejects it as the mutator's
	// own failure.
	bad := json.RawMessage(`{"id": "t2", "title": 7}`)
	err = reg.Check(def.Name, bad)
	if !errors.Is(err, mutators.ErrArgsMismatch) || !strings.Contains(err.Error(), "title") {
		t.Fatalf("Check(bad) = %v, want ErrArgsMismatch naming the field", err)
	}
	var me *mutators.Error
	if err := reg.Run(ctx, mutators.NewTx(ctx, conn), def.Name, bad); !errors.As(err, &me) || !errors.Is(err, mutators.ErrArgsMismatch) {
		t.Fatalf("Run(bad) = %v, want a *mutators.Error wrapping ErrArgsMismatch", err)
	}
	// Unknown fields are allowed (a newer client, an older server).
	if err := reg.Check(def.Name, json.RawMessage(`{"id": "t3", "title": "x", "priority": 2}`)); err != nil {
		t.Fatalf("an unknown field: %v", err)
	}
	if err := reg.Check(def.Name, json.RawMessage(`[1, 2]`)); !errors.Is(err, mutators.ErrArgsMismatch) {
		t.Fatalf("args of another shape: %v", err)
	}
}

// TestTxContextMethods: a Tx is the DBTX that sqlc-generated code takes;
// its Context methods run under the mutation's context, and a done context
// of the caller's fails the statement.
func TestTxContextMethods(t *testing.T) {
	conn := openConn(t)
	ctx := context.Background()
	tx := mutators.NewTx(ctx, mutators.NewStmtCache(conn, 8))
	var dbtx interface {
		ExecContext(context.Context, string, ...any) (sql.Result, error)
		PrepareContext(context.Context, string) (*sql.Stmt, error)
		QueryContext(context.Context, string, ...any) (*sql.Rows, error)
		QueryRowContext(context.Context, string, ...any) *sql.Row
	} = tx
	stmt, err := dbtx.PrepareContext(ctx, `INSERT INTO todos(id, title, done) VALUES (?, ?, 0)`)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stmt.ExecContext(ctx, "a", "first"); err != nil {
		t.Fatal(err)
	}
	stmt.Close()
	rows, err := dbtx.QueryContext(ctx, `SELECT id FROM todos`)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for rows.Next() {
		n++
	}
	rows.Close()
	if n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
	done, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := dbtx.ExecContext(done, `DELETE FROM todos`); !errors.Is(err, context.Canceled) {
		t.Fatalf("ExecContext with a done ctx: %v", err)
	}
	if _, err := dbtx.QueryContext(done, `SELECT 1`); !errors.Is(err, context.Canceled) {
		t.Fatalf("QueryContext with a done ctx: %v", err)
	}
	var one int
	// database/sql hands the done ctx to the driver, which reports an
	// interrupt: any error will do, as long as the statement did not run.
	if err := dbtx.QueryRowContext(done, `SELECT 1`).Scan(&one); err == nil {
		t.Fatalf("QueryRowContext with a done ctx: %v", err)
	}
	if _, err := dbtx.PrepareContext(done, `SELECT 1`); !errors.Is(err, context.Canceled) {
		t.Fatalf("PrepareContext with a done ctx: %v", err)
	}
	var left int
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM todos`).Scan(&left); err != nil || left != 1 {
		t.Fatalf("%d rows after the refused DELETE, %v", left, err)
	}
}
