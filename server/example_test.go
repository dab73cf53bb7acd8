package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"os"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// addTodo is an app's mutator: the same function is registered in the
// app's replicas and in its server binary.
func addTodo(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
	var a struct {
		ID    string `json:"id"` // ids come in the args: mutators are deterministic
		Title string `json:"title"`
	}
	if err := json.Unmarshal(args, &a); err != nil {
		return err
	}
	if a.Title == "" {
		return fmt.Errorf("a todo needs a title") // the server records this as a rejection
	}
	_, err := tx.Exec(`INSERT INTO todos(id, title, done) VALUES (?, ?, 0)`, a.ID, a.Title)
	return err
}

// Example_embed is an app's own server binary: it links the app's mutators,
// as its replicas do, and serves them over QUIC.
func Example_embed() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "todo-server")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	reg := mutators.NewRegistry()
	reg.MustRegister("addTodo", addTodo)
	srv, err := server.Open(ctx, server.Config{
		Dir:      dir, // databases, change logs, credentials, certificate
		Mutators: reg,
		Setup: func(ctx context.Context, tx mutators.Tx) error { // a new database's version 1
			_, err := tx.Exec(`CREATE TABLE todos(id TEXT PRIMARY KEY, title TEXT NOT NULL, done INTEGER NOT NULL)`)
			return err
		},
		Retention: server.Retention{Versions: 100_000},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	// One database per tenant; each with the credentials its clients use.
	if err := srv.AddDatabase(ctx, "acme", os.Getenv("ACME_TOKEN")+"example-token"); err != nil {
		log.Fatal(err)
	}
	if _, err := srv.Listen(ctx, "127.0.0.1:0"); err != nil { // e.g. ":7878" in production
		log.Fatal(err)
	}
	fmt.Println("databases:", srv.Databases())
	// A real server now waits for SIGTERM, then calls srv.Close.
	fmt.Println("fingerprint for replicas to pin:", len(srv.Fingerprint()) == len("sha256:")+64)
	// Output:
	// databases: [acme]
	// fingerprint for replicas to pin: true
}
