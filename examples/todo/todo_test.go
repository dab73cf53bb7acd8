package todo_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/examples/todo"
	"github.com/sqlrebase/sqlrebase/examples/todo/db"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// TestTodo runs sqlc-generated queries inside typed mutators on a replica
// and on the server, reads with the same generated code on DB(), and checks
// that args which do not fit are refused before anything is queued.
func TestTodo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	reg := mutators.NewRegistry()
	m, err := todo.Register(reg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.Open(ctx, server.Config{Dir: filepath.Join(dir, "server"), Mutators: reg,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.ExecContext(ctx, todo.Schema)
			return err
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := srv.AddDatabase(ctx, "todos", "s3cret"); err != nil {
		t.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r, err := replica.Open(ctx, filepath.Join(dir, "client.db"), replica.Options{Mutators: reg,
		Remote: &replica.Remote{Addr: addr, Database: "todos", Credential: "s3cret", Fingerprint: srv.Fingerprint()}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	mutate := func(name string, args json.RawMessage, err error) *replica.Handle {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		h, err := r.Mutate(ctx, name, args)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	a1, err := m.Add.Args(todo.AddArgs{ID: "t1", Owner: "ann", Title: "milk"})
	mutate(m.Add.Name, a1, err)
	d1, err := m.SetDone.Args(todo.SetDoneArgs{ID: "t1", Done: true})
	mutate(m.SetDone.Name, d1, err)
	missing, err := m.SetDone.Args(todo.SetDoneArgs{ID: "nope", Done: true})
	hMissing := mutate(m.SetDone.Name, missing, err)

	// The same generated code reads the replica, optimistically.
	got, err := db.New(r.DB()).GetTodo(ctx, "t1")
	if err != nil || got.Title != "milk" || got.Done != 1 || got.Owner != "ann" {
		t.Fatalf("optimistic read: %+v, %v", got, err)
	}
	if err := hMissing.Wait(ctx); !errors.As(err, new(*replica.RejectedError)) {
		t.Fatalf("setDone of a missing todo: %v, want a rejection", err)
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.Pending != 0 || st.Checksum != srv.Authority("todos").Checksum() {
		t.Fatalf("status %+v, server checksum %x", st, srv.Authority("todos").Checksum())
	}
	todos, err := db.New(r.DB()).ListTodos(ctx)
	if err != nil || len(todos) != 1 || todos[0].Done != 1 {
		t.Fatalf("confirmed todos %+v, %v", todos, err)
	}

	// A field of the wrong type: refused by Mutate, naming the field,
	// with nothing queued.
	_, err = r.Mutate(ctx, m.SetDone.Name, json.RawMessage(`{"id": "t1", "done": "yes"}`))
	if !errors.Is(err, mutators.ErrArgsMismatch) {
		t.Fatalf("Mutate with a string for a bool: %v, want ErrArgsMismatch", err)
	}
	if n := r.Status().Pending; n != 0 {
		t.Fatalf("%d pending after a refused Mutate", n)
	}
}
