package policytest

import (
	"context"
	"encoding/json"
	"errors"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// CallersTable is the table [RegisterWhoami]'s mutator writes: one row per
// call, keyed by the call's tag.
const CallersTable = `CREATE TABLE Callers(tag TEXT PRIMARY KEY, client TEXT, user TEXT, role TEXT)`

// RegisterWhoami adds "whoami" to reg: it records its caller
// (mutators.CallerFrom) as a row of Callers tagged with its args (a JSON
// string), the "role" claim included, and fails where the context carries
// no caller. The replica's and the server's tests of the caller use the
// same mutator, so that both sides are held to one meaning of it.
func RegisterWhoami(reg *mutators.Registry) {
	reg.MustRegister("whoami", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		c, ok := mutators.CallerFrom(ctx)
		if !ok {
			return errors.New("no caller in the mutator's context")
		}
		var tag string
		if err := json.Unmarshal(args, &tag); err != nil {
			return err
		}
		role, _ := c.Claims["role"].(string)
		_, err := tx.Exec(`INSERT INTO Callers(tag, client, user, role) VALUES (?, ?, ?, ?)`, tag, c.ClientID, c.UserID, role)
		return err
	})
}
