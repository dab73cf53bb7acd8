package replica

import (
	"errors"

	sqlite3 "github.com/ncruces/go-sqlite3"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// ErrReadOnly is the error of a statement on DB() that would change
// replicated data. Replicated tables change only through mutators.
var ErrReadOnly = errors.New("replica: replicated data changes only through Mutate")

// ErrForbidden is the error of a statement a mutator may not run: transaction
// control, reserved tables, other attached databases.
var ErrForbidden = errors.New("replica: statement not allowed in a mutator")

// role is who is preparing a statement, for the authorizer. The policy
// itself is mutators.Authorize, which the server enforces too.
type role = mutators.Role

const (
	roleEngine  = mutators.RoleEngine  // the replica's own statements on the writer (the zero value)
	roleReader  = mutators.RoleReader  // a DB() connection of the app
	roleMutator = mutators.RoleMutator // a mutator running on the writer
)

// authorize is mutators.Authorize: one contract for replica and server.
func authorize(r role, action sqlite3.AuthorizerActionCode, name3, name4, schema string) (string, bool) {
	return mutators.Authorize(r, action, name3, name4, schema)
}
