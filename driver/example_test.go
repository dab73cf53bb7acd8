package driver_test

import (
	"context"
	"database/sql"
	"fmt"
	"log"
	"net/url"
	"os"
	"path/filepath"

	"github.com/sqlrebase/sqlrebase/driver"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// Example opens a replica through database/sql with a DSN, writes with the
// sqlrebase_mutate SQL function, and reads what it wrote at once; then waits
// until the server has confirmed it.
func Example() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "sqlrebase-driver-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// The mutators, registered once under a name that DSNs refer to.
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		log.Fatal(err)
	}
	if err := driver.RegisterMutators("example", reg); err != nil {
		log.Fatal(err)
	}
	// The credential comes from a registered source (or the environment:
	// SQLREBASE_CREDENTIAL), never from the DSN.
	if err := driver.RegisterCredential("example", func(context.Context) (string, error) { return "s3cret", nil }); err != nil {
		log.Fatal(err)
	}

	// A server on a loopback port of this process (normally its own).
	srv, err := server.Open(ctx, server.Config{Dir: filepath.Join(dir, "server"), Mutators: reg,
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err }})
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

	dsn := "file:" + filepath.Join(dir, "app.db") + "?" + url.Values{
		"server": {addr}, "db": {"demo"}, "fingerprint": {srv.Fingerprint()},
		"credential": {"example"}, "mutators": {"example"},
	}.Encode()
	db, err := sql.Open(driver.Name, dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close() // the last sql.DB of the path closes the replica

	var id int64
	if err := db.QueryRowContext(ctx, `SELECT sqlrebase_mutate(?, ?)`,
		mutators.CreateCategoryOrIncrementIfExists, `{"name": "Food", "delta": 1}`).Scan(&id); err != nil {
		log.Fatal(err)
	}
	var count int
	if err := db.QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&count); err != nil {
		log.Fatal(err)
	}
	fmt.Println("mutation", id, "optimistic count:", count)

	r, _ := driver.Replica(dsn) // the replica behind the DSN: Status, Sync, Handle
	if err := r.Sync(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("confirmed; pending:", r.Status().Pending)
	// Output:
	// mutation 1 optimistic count: 1
	// confirmed; pending: 0
}
