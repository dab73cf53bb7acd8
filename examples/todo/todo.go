// Package todo is a small example app on sqlrebase: its mutators are
// written with sqlc-generated queries (package db, generated from
// schema.sql and query.sql by `sqlc generate`), which run inside a mutator
// unchanged because a mutators.Tx is the DBTX sqlc takes, and they are
// registered typed, so that args are encoded and decoded in one place.
package todo

import (
	"context"
	_ "embed"
	"errors"
	"fmt"

	"github.com/sqlrebase/sqlrebase/examples/todo/db"
	"github.com/sqlrebase/sqlrebase/mutators"
)

//go:generate sqlc generate

// Schema is the app's schema: the server's Setup runs it, and each mutator
// too (a replica at version 0 has an empty database; IF NOT EXISTS makes it
// a no-op afterwards).
//
//go:embed schema.sql
var Schema string

// AddArgs are the args of Mutators.Add.
type AddArgs struct {
	ID    string `json:"id"`
	Owner string `json:"owner"`
	Title string `json:"title"`
}

// SetDoneArgs are the args of Mutators.SetDone.
type SetDoneArgs struct {
	ID   string `json:"id"`
	Done bool   `json:"done"`
}

// Mutators are the app's typed mutators, for building args on the client.
type Mutators struct {
	Add     mutators.Def[AddArgs]
	SetDone mutators.Def[SetDoneArgs]
}

// ErrNoSuchTodo is the mutators' error for an id that is not there.
var ErrNoSuchTodo = errors.New("todo: no such todo")

// Register registers the app's mutators in reg; client and server call it
// alike.
func Register(reg *mutators.Registry) (Mutators, error) {
	var m Mutators
	var err error
	if m.Add, err = mutators.Register(reg, "todo.add", add); err != nil {
		return m, err
	}
	if m.SetDone, err = mutators.Register(reg, "todo.setDone", setDone); err != nil {
		return m, err
	}
	return m, nil
}

func add(ctx context.Context, tx mutators.Tx, a AddArgs) error {
	if a.ID == "" || a.Title == "" {
		return errors.New("todo: id and title are required")
	}
	if _, err := tx.ExecContext(ctx, Schema); err != nil {
		return err
	}
	return db.New(tx).CreateTodo(ctx, db.CreateTodoParams{ID: a.ID, Owner: a.Owner, Title: a.Title})
}

func setDone(ctx context.Context, tx mutators.Tx, a SetDoneArgs) error {
	if _, err := tx.ExecContext(ctx, Schema); err != nil {
		return err
	}
	done := int64(0)
	if a.Done {
		done = 1
	}
	n, err := db.New(tx).SetDone(ctx, db.SetDoneParams{Done: done, ID: a.ID})
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("%w: %q", ErrNoSuchTodo, a.ID)
	}
	return nil
}
