package replica_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// Example is the README's library example, kept compiling and true.
func Example() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "sqlrebase-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// The same registry on both sides: mutators are shared code.
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		log.Fatal(err)
	}

	// The server. In production it is a process of its own (sqlrebase
	// serve, or your own binary linking your mutators); here it runs on
	// a loopback port of this process.
	srv, err := server.Open(ctx, server.Config{
		Dir:      filepath.Join(dir, "server"),
		Mutators: reg,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema) // version 1: the app's schema
			return err
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.AddDatabase(ctx, "demo", "s3cret"); err != nil {
		log.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}

	// A replica syncing with it over QUIC, pinning its certificate. One
	// process owns the replica's files until Close.
	r, err := replica.Open(ctx, filepath.Join(dir, "client.db"), replica.Options{
		Mutators: reg,
		Remote: &replica.Remote{
			Addr:        addr,
			Database:    "demo",
			Credential:  "s3cret",
			Fingerprint: srv.Fingerprint(), // what `sqlrebase serve` prints
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	// Mutate runs at once, locally and durably queued, and never waits
	// for the network; reads see it at once.
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		log.Fatal(err)
	}
	var count int64
	if err := r.DB().QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&count); err != nil {
		log.Fatal(err)
	}
	fmt.Println("optimistic count:", count)

	// The sync loop pushes it; the server runs it in its global order and
	// sends the pages back; the replica rebases. Wait until then.
	if err := h.Wait(ctx); err != nil { // a *replica.RejectedError if the server refused it
		log.Fatal(err)
	}
	st := r.Status()
	fmt.Println("confirmed; pending:", st.Pending, "same as server:", st.Checksum == srv.Authority("demo").Checksum())
	// Output:
	// optimistic count: 1
	// confirmed; pending: 0 same as server: true
}
