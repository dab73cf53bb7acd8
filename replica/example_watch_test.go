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

// ExampleReplica_Watch shows a live query: its first result at once, then
// a new one after a mutation that changed what it reads, with the rows
// added or changed keyed by the first column.
func ExampleReplica_Watch() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "sqlrebase-watch")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		log.Fatal(err)
	}
	// An in-process authority stands in for the server here.
	a, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec(mutators.DemoSchema)
		return err
	})
	if err != nil {
		log.Fatal(err)
	}
	defer a.Close()
	r, err := replica.Open(ctx, filepath.Join(dir, "client.db"), replica.Options{Mutators: reg})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	sets, err := a.Since(0)
	if err != nil {
		log.Fatal(err)
	}
	if err := r.Rebase(ctx, sets...); err != nil {
		log.Fatal(err)
	}

	q, err := r.Watch(ctx, "SELECT name, count FROM Categories ORDER BY name")
	if err != nil {
		log.Fatal(err)
	}
	defer q.Close()
	res, err := q.Next(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("rows:", len(res.Rows))

	for _, delta := range []int64{1, 2} {
		if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", delta)); err != nil {
			log.Fatal(err)
		}
		res, err := q.Next(ctx)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println("rows:", res.Rows, "added:", len(res.Added), "changed:", len(res.Changed))
	}
	// Output:
	// rows: 0
	// rows: [[Food 1]] added: 1 changed: 0
	// rows: [[Food 3]] added: 0 changed: 1
}
