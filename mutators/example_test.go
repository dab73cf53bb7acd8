package mutators_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
)

func ExampleRegistry() {
	r := mutators.NewRegistry()
	r.MustRegister("addTodo", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		var a struct {
			ID    int64  `json:"id"` // chosen by the caller: mutators are deterministic
			Title string `json:"title"`
		}
		if err := json.Unmarshal(args, &a); err != nil {
			return err
		}
		_, err := tx.Exec(`INSERT INTO todos(id, title) VALUES (?, ?)`, a.ID, a.Title)
		return err
	})

	dir, err := os.MkdirTemp("", "example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	db, err := driver.Open("file:" + filepath.Join(dir, "app.db"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	if _, err := db.ExecContext(ctx, `CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)`); err != nil {
		log.Fatal(err)
	}

	// The caller owns the transaction; the mutator only runs statements in it.
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	if err := r.Run(ctx, mutators.NewTx(ctx, tx), "addTodo", json.RawMessage(`{"id":1,"title":"milk"}`)); err != nil {
		tx.Rollback()
		log.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		log.Fatal(err)
	}

	var title string
	if err := db.QueryRowContext(ctx, `SELECT title FROM todos WHERE id = 1`).Scan(&title); err != nil {
		log.Fatal(err)
	}
	fmt.Println(r.Names(), title)
	fmt.Println(r.Check("removeTodo", json.RawMessage(`{}`)))
	// Output:
	// [addTodo] milk
	// mutators: unknown mutator: "removeTodo"
}
