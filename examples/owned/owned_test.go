package owned_test

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/examples/owned"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// passwords is the test authenticator: credential "pw-NAME" is user NAME.
var passwords = server.AuthenticatorFunc(func(ctx context.Context, req server.AuthRequest) (server.Identity, error) {
	user, ok := strings.CutPrefix(req.Credential, "pw-")
	if !ok || user == "" {
		return server.Identity{}, &server.AuthError{Reason: "wrong password"}
	}
	return server.Identity{UserID: user, Credential: req.Credential}, nil
})

type todo struct {
	Owner, Title string
	Done         bool
}

type querier func(ctx context.Context, q string, args ...any) (*sql.Rows, error)

// read returns todo id as q sees it.
func read(t *testing.T, q querier, id string) todo {
	t.Helper()
	rows, err := q(context.Background(), `SELECT owner, title, done FROM todos WHERE id = ?`, id)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	if !rows.Next() {
		t.Fatalf("no todo %s (%v)", id, rows.Err())
	}
	var td todo
	if err := rows.Scan(&td.Owner, &td.Title, &td.Done); err != nil {
		t.Fatal(err)
	}
	return td
}

// world is a server for the owned app, with the password authenticator.
type world struct {
	t    *testing.T
	reg  *mutators.Registry
	m    owned.Mutators
	srv  *server.Server
	addr string
}

func newWorld(t *testing.T) *world {
	ctx := context.Background()
	reg := mutators.NewRegistry()
	m, err := owned.Register(reg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.Open(ctx, server.Config{Dir: filepath.Join(t.TempDir(), "server"), Mutators: reg, Logger: quiet,
		Authenticator: passwords,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.ExecContext(ctx, owned.Schema)
			return err
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.AddDatabase(ctx, "todos", "unused"); err != nil {
		t.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return &world{t: t, reg: reg, m: m, srv: srv, addr: addr}
}

// open opens a replica at path that authenticates with password and
// claims to be user locally; each connection waits for gate to be closed.
func (w *world) open(path, user, password string, gate <-chan struct{}) *replica.Replica {
	w.t.Helper()
	r, err := replica.Open(context.Background(), path, replica.Options{Mutators: w.reg, User: user, Logger: quiet,
		Remote: &replica.Remote{Addr: w.addr, Database: "todos", Fingerprint: w.srv.Fingerprint(),
			Token: func(ctx context.Context) (string, error) {
				select {
				case <-gate: // nil: at once
				case <-ctx.Done():
					return "", ctx.Err()
				}
				return password, nil
			}}})
	if err != nil {
		w.t.Fatal(err)
	}
	return r
}

func closed() <-chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// TestOwnerOnly: bob adds a todo; mallory, authenticated as mallory but
// with a replica configured to claim bob's identity locally, edits it. The
// edit shows on her replica at once (her local run believes she is bob),
// then the server, which runs it as mallory, rejects it: her replica
// rolls it back, Handle.Wait returns the server's message, and bob's todo
// is untouched on the server and on bob's replica. A todo she adds while
// claiming to be bob is hers once the server has run it: the server's run
// wins.
func TestOwnerOnly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w := newWorld(t)
	dir := t.TempDir()
	mutate := func(r *replica.Replica, name string, args []byte, err error) *replica.Handle {
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

	bob := w.open(filepath.Join(dir, "bob.db"), "bob", "pw-bob", closed())
	defer bob.Close()
	if err := bob.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	args, err := w.m.Add.Args(owned.AddArgs{ID: "b1", Title: "bob's todo"})
	if err := mutate(bob, w.m.Add.Name, args, err).Wait(ctx); err != nil {
		t.Fatalf("bob adds his todo: %v", err)
	}
	want := todo{Owner: "bob", Title: "bob's todo"}
	if got := read(t, w.srv.Authority("todos").Query, "b1"); got != want {
		t.Fatalf("server has %+v, want %+v", got, want)
	}

	// Mallory's replica first syncs bob's todo, then goes on with its
	// connections held back, so that the test sees the optimistic state
	// before the server's answer arrives.
	mpath := filepath.Join(dir, "mallory.db")
	mal := w.open(mpath, "bob", "pw-mallory", closed())
	if err := mal.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := mal.Close(); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	mal = w.open(mpath, "bob", "pw-mallory", gate)
	defer mal.Close()
	args, err = w.m.Edit.Args(owned.EditArgs{ID: "b1", Title: "pwned", Done: true})
	edit := mutate(mal, w.m.Edit.Name, args, err)
	args, err = w.m.Add.Args(owned.AddArgs{ID: "m1", Title: "mallory's todo"})
	add := mutate(mal, w.m.Add.Name, args, err)
	if edit.LocalErr() != nil || add.LocalErr() != nil {
		t.Fatalf("local runs: %v, %v", edit.LocalErr(), add.LocalErr())
	}
	if got := read(t, mal.DB().QueryContext, "b1"); got != (todo{Owner: "bob", Title: "pwned", Done: true}) {
		t.Fatalf("mallory's optimistic view of b1: %+v", got)
	}
	if got := read(t, mal.DB().QueryContext, "m1"); got.Owner != "bob" {
		t.Fatalf("mallory's optimistic view of m1: %+v (she claims to be bob locally)", got)
	}

	close(gate)
	err = edit.Wait(ctx)
	var rej *replica.RejectedError
	if !errors.As(err, &rej) || !strings.Contains(rej.Message, owned.ErrNotOwner.Error()) {
		t.Fatalf("mallory's edit: %v, want a rejection saying %q", err, owned.ErrNotOwner)
	}
	if err := add.Wait(ctx); err != nil {
		t.Fatalf("mallory's add: %v", err)
	}
	if got := read(t, mal.DB().QueryContext, "b1"); got != want {
		t.Fatalf("mallory's view of b1 after the rejection: %+v, want %+v", got, want)
	}
	if got := read(t, mal.DB().QueryContext, "m1"); got.Owner != "mallory" {
		t.Fatalf("m1 after the server ran it: %+v, want mallory's (the server's run wins)", got)
	}
	if got := read(t, w.srv.Authority("todos").Query, "b1"); got != want {
		t.Fatalf("server's b1: %+v, want %+v", got, want)
	}
	// Bob's replica catches up to the server's version (Sync alone waits
	// only for the version of its session's Welcome).
	for v := w.srv.Authority("todos").Version(); bob.Status().Version < v; {
		select {
		case <-ctx.Done():
			t.Fatalf("bob's replica at %d, server at %d", bob.Status().Version, v)
		case <-time.After(5 * time.Millisecond):
		}
	}
	if got := read(t, bob.DB().QueryContext, "b1"); got != want {
		t.Fatalf("bob's b1: %+v, want %+v", got, want)
	}
	if got := read(t, bob.DB().QueryContext, "m1"); got.Owner != "mallory" {
		t.Fatalf("bob's view of m1: %+v", got)
	}
	// Bob may edit his own.
	args, err = w.m.Edit.Args(owned.EditArgs{ID: "b1", Title: "bob's todo", Done: true})
	if err := mutate(bob, w.m.Edit.Name, args, err).Wait(ctx); err != nil {
		t.Fatalf("bob edits his todo: %v", err)
	}
	if got := read(t, w.srv.Authority("todos").Query, "b1"); !got.Done {
		t.Fatalf("server's b1 after bob's edit: %+v", got)
	}
}
