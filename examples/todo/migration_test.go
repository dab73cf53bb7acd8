package todo_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/examples/todo"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// addPriorityArgs are the args of build 2's mutator, which writes the
// column the expand step adds.
type addPriorityArgs struct {
	ID       string `json:"id"`
	Title    string `json:"title"`
	Priority int64  `json:"priority"`
}

// build2 registers build 1's mutators (its queued mutations must still
// run) and the new one.
func build2(t *testing.T) (*mutators.Registry, todo.Mutators, mutators.Def[addPriorityArgs]) {
	t.Helper()
	reg := mutators.NewRegistry()
	m, err := todo.Register(reg)
	if err != nil {
		t.Fatal(err)
	}
	addP, err := mutators.Register(reg, "todo.addWithPriority", func(ctx context.Context, tx mutators.Tx, a addPriorityArgs) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO todos(id, owner, title, done, priority) VALUES (?, '', ?, 0, ?)`, a.ID, a.Title, a.Priority)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return reg, m, addP
}

// TestExpandContract is the README's migration recipe. Expand: the server
// adds a column (an administrative version) and runs build 1's and build
// 2's mutators side by side; old and new clients both converge. Contract:
// the server refuses build 1 (MinAppVersion); an old client stops with
// ErrUpgradeRequired and keeps its queued mutation, which the upgraded build
// pushes when it opens the same files.
func TestExpandContract(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	reg1 := mutators.NewRegistry()
	m1, err := todo.Register(reg1)
	if err != nil {
		t.Fatal(err)
	}
	reg2, _, addP := build2(t)
	setup := func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.ExecContext(ctx, todo.Schema)
		return err
	}
	openServer := func(min uint64) (*server.Server, string) {
		srv, err := server.Open(ctx, server.Config{Dir: filepath.Join(dir, "server"), Mutators: reg2, Setup: setup, MinAppVersion: min})
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.AddDatabase(ctx, "todos", "s3cret"); err != nil {
			t.Fatal(err)
		}
		addr, err := srv.Listen(ctx, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return srv, addr
	}
	srv, addr := openServer(0)
	openClient := func(name string, reg *mutators.Registry, build uint64, addr string, fp string) *replica.Replica {
		r, err := replica.Open(ctx, filepath.Join(dir, name+".db"), replica.Options{Mutators: reg, AppVersion: build,
			Remote: &replica.Remote{Addr: addr, Database: "todos", Credential: "s3cret", Fingerprint: fp}})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	old := openClient("old", reg1, 1, addr, srv.Fingerprint())
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
	a, err := m1.Add.Args(todo.AddArgs{ID: "a", Title: "before the expand"})
	mutate(old, m1.Add.Name, a, err)
	if err := old.Sync(ctx); err != nil {
		t.Fatal(err)
	}

	// Expand: the column, with a default, as a version of its own.
	if _, err := srv.Authority("todos").Exec(ctx, func(tx mutators.Tx) error {
		_, err := tx.ExecContext(ctx, `ALTER TABLE todos ADD COLUMN priority INTEGER NOT NULL DEFAULT 0`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	neu := openClient("new", reg2, 2, addr, srv.Fingerprint())
	b, err := m1.Add.Args(todo.AddArgs{ID: "b", Title: "old build, after the expand"})
	mutate(old, m1.Add.Name, b, err)
	c, err := addP.Args(addPriorityArgs{ID: "c", Title: "new build", Priority: 5})
	mutate(neu, addP.Name, c, err)
	for _, r := range []*replica.Replica{old, neu} {
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Sync settles a replica's own mutations; the other client's version
	// reaches it on its own: wait for it, bounded.
	want := srv.Authority("todos").Version()
	for _, r := range []*replica.Replica{old, neu} {
		for r.Status().Version < want {
			if ctx.Err() != nil {
				t.Fatalf("a client never reached version %d: %+v", want, r.Status())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	sum := srv.Authority("todos").Checksum()
	for name, r := range map[string]*replica.Replica{"old": old, "new": neu} {
		if st := r.Status(); st.Checksum != sum || st.Pending != 0 {
			t.Fatalf("%s client after the expand: %+v, server checksum %x", name, st, sum)
		}
	}
	var n, prio int64
	if err := old.DB().QueryRowContext(ctx, `SELECT count(*), sum(priority) FROM todos`).Scan(&n, &prio); err != nil || n != 3 || prio != 5 {
		t.Fatalf("the old client reads %d todos of priority %d, %v; want 3 and 5", n, prio, err)
	}

	// Contract: build 1 is refused from now on.
	old.Close()
	neu.Close()
	srv.Close()
	srv, addr = openServer(2)
	defer srv.Close()
	old = openClient("old", reg1, 1, addr, srv.Fingerprint())
	d, err := m1.Add.Args(todo.AddArgs{ID: "d", Title: "queued by the old build"})
	mutate(old, m1.Add.Name, d, err)
	if err := old.WaitConnected(ctx); !errors.Is(err, replica.ErrUpgradeRequired) {
		t.Fatalf("the old build after the contract: %v, want ErrUpgradeRequired", err)
	}
	if n := old.Status().Pending; n != 1 {
		t.Fatalf("the refused old build has %d pending, want its 1 queued", n)
	}
	old.Close()
	// The upgraded build opens the same files and pushes what was queued.
	up := openClient("old", reg2, 2, addr, srv.Fingerprint())
	defer up.Close()
	if err := up.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if st := up.Status(); st.Pending != 0 || st.Checksum != srv.Authority("todos").Checksum() {
		t.Fatalf("the upgraded build: %+v", st)
	}
	if err := up.DB().QueryRowContext(ctx, `SELECT count(*) FROM todos WHERE id = 'd'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("the queued mutation: %d rows, %v", n, err)
	}
}
