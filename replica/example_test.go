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

	// The authority (in-process for now; the QUIC server is the next step).
	auth, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg,
		func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema) // version 1: the app's schema
			return err
		})
	if err != nil {
		log.Fatal(err)
	}
	defer auth.Close()

	// A replica: one process owns its files until Close.
	r, err := replica.Open(ctx, filepath.Join(dir, "client.db"), replica.Options{Mutators: reg})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	// Mutate runs at once, locally and durably queued; reads see it.
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		log.Fatal(err)
	}
	var count int64
	if err := r.DB().QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&count); err != nil {
		log.Fatal(err)
	}
	fmt.Println("optimistic count:", count, "pending:", r.Status().Pending)

	// Push the pending mutations; the authority runs them in its global order.
	var batch []server.Mutation
	for _, m := range r.Pending() {
		batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
	}
	if _, _, err := auth.Push(ctx, batch); err != nil {
		log.Fatal(err)
	}

	// Rebase on every version the replica lacks: drop pending, apply, replay.
	sets, err := auth.Since(r.Status().Version)
	if err != nil {
		log.Fatal(err)
	}
	if err := r.Rebase(ctx, sets...); err != nil {
		log.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil { // nil: the server applied it
		log.Fatal(err)
	}
	st := r.Status()
	fmt.Println("version:", st.Version, "pending:", st.Pending, "same as server:", st.Checksum == auth.Checksum())
	// Output:
	// optimistic count: 1 pending: 1
	// version: 2 pending: 0 same as server: true
}
