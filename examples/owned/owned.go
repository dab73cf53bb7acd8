// Package owned is a small example app on sqlrebase with a permission rule:
// todos have an owner, and only the owner may change one. The owner is never
// taken from args, which any client can forge, but from the mutation's
// caller (mutators.CallerFrom): on the server, the user its authenticator
// established for the session that pushed the mutation. A client that lies
// about its user locally (replica.Options.User) sees its edit optimistically
// and then rolled back, with the server's message, because the server's run
// wins.
package owned

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// Schema is the app's schema: the server's Setup runs it.
const Schema = `CREATE TABLE IF NOT EXISTS todos (
  id    TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  title TEXT NOT NULL,
  done  INTEGER NOT NULL DEFAULT 0
)`

// The mutators' refusals: the server's rejection message starts with one
// of them, and the replica's Handle.Wait returns it in a
// *replica.RejectedError.
var (
	// ErrNoCaller: a mutation with no authenticated user.
	ErrNoCaller = errors.New("owned: no signed-in user")
	// ErrNotOwner: a change to another user's todo.
	ErrNotOwner = errors.New("owned: not your todo")
	// ErrNoSuchTodo: an id that is not there.
	ErrNoSuchTodo = errors.New("owned: no such todo")
)

// AddArgs are the args of Mutators.Add. There is no owner: it is the caller.
type AddArgs struct {
	ID    string `json:"id"`
	Title string `json:"title"`
}

// EditArgs are the args of Mutators.Edit.
type EditArgs struct {
	ID    string `json:"id"`
	Title string `json:"title"`
	Done  bool   `json:"done"`
}

// Mutators are the app's typed mutators, for building args on the client.
type Mutators struct {
	Add  mutators.Def[AddArgs]
	Edit mutators.Def[EditArgs]
}

// Register registers the app's mutators in reg; client and server call it
// alike.
func Register(reg *mutators.Registry) (Mutators, error) {
	var m Mutators
	var err error
	if m.Add, err = mutators.Register(reg, "owned.add", add); err != nil {
		return m, err
	}
	if m.Edit, err = mutators.Register(reg, "owned.edit", edit); err != nil {
		return m, err
	}
	return m, nil
}

// user is the caller's UserID, or ErrNoCaller.
func user(ctx context.Context) (string, error) {
	c, ok := mutators.CallerFrom(ctx)
	if !ok || c.UserID == "" {
		return "", ErrNoCaller
	}
	return c.UserID, nil
}

func add(ctx context.Context, tx mutators.Tx, a AddArgs) error {
	owner, err := user(ctx)
	if err != nil {
		return err
	}
	if a.ID == "" || a.Title == "" {
		return errors.New("owned: id and title are required")
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO todos(id, owner, title) VALUES (?, ?, ?)`, a.ID, owner, a.Title)
	return err
}

func edit(ctx context.Context, tx mutators.Tx, a EditArgs) error {
	me, err := user(ctx)
	if err != nil {
		return err
	}
	var owner string
	switch err := tx.QueryRowContext(ctx, `SELECT owner FROM todos WHERE id = ?`, a.ID).Scan(&owner); {
	case errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("%w: %s", ErrNoSuchTodo, a.ID)
	case err != nil:
		return err
	case owner != me:
		return fmt.Errorf("%w: %s", ErrNotOwner, a.ID)
	}
	_, err = tx.ExecContext(ctx, `UPDATE todos SET title = ?, done = ? WHERE id = ?`, a.Title, a.Done, a.ID)
	return err
}
