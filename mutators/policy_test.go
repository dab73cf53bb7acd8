package mutators_test

import (
	"strings"
	"testing"

	sqlite3 "github.com/ncruces/go-sqlite3"

	"github.com/sqlrebase/sqlrebase/mutators"
)

func TestAuthorize(t *testing.T) {
	for _, c := range []struct {
		role   mutators.Role
		action sqlite3.AuthorizerActionCode
		n3, n4 string
		schema string
		ok     bool
		why    string
	}{
		{mutators.RoleEngine, sqlite3.AUTH_TRANSACTION, "COMMIT", "", "", true, ""},
		{mutators.RoleEngine, sqlite3.AUTH_UPDATE, mutators.TableClients, "last_mutation_id", "main", true, ""},
		{mutators.RoleMutator, sqlite3.AUTH_TRANSACTION, "COMMIT", "", "", false, "COMMIT inside a mutator"},
		{mutators.RoleMutator, sqlite3.AUTH_TRANSACTION, "ROLLBACK", "", "", false, "ROLLBACK inside a mutator"},
		{mutators.RoleReader, sqlite3.AUTH_TRANSACTION, "BEGIN", "", "", true, ""},
		{mutators.RoleMutator, sqlite3.AUTH_SAVEPOINT, "BEGIN", "mine", "", true, ""},
		{mutators.RoleMutator, sqlite3.AUTH_SAVEPOINT, "RELEASE", "_SQLREBASE_mutation", "", false, "the caller's savepoint"},
		{mutators.RoleMutator, sqlite3.AUTH_UPDATE, "_SQLRebase_Clients", "x", "main", false, "reserved table"},
		{mutators.RoleMutator, sqlite3.AUTH_INSERT, "todos", "", "main", true, ""},
		{mutators.RoleMutator, sqlite3.AUTH_INSERT, "t", "", "temp", true, ""},
		{mutators.RoleMutator, sqlite3.AUTH_INSERT, "t", "", "local", false, "mutators change replicated data only"},
		{mutators.RoleReader, sqlite3.AUTH_INSERT, "t", "", "local", true, ""},
		{mutators.RoleReader, sqlite3.AUTH_INSERT, "todos", "", "main", false, "replicated table"},
		{mutators.RoleMutator, sqlite3.AUTH_ATTACH, "x.db", "", "", false, "ATTACH"},
		{mutators.RoleMutator, sqlite3.AUTH_PRAGMA, "journal_mode", "DELETE", "", false, "PRAGMA journal_mode"},
		{mutators.RoleMutator, sqlite3.AUTH_PRAGMA, "journal_mode", "", "", true, ""},
		{mutators.RoleReader, sqlite3.AUTH_PRAGMA, "WAL_CHECKPOINT", "", "", false, "PRAGMA"},
		{mutators.RoleMutator, sqlite3.AUTH_READ, mutators.TableClients, "last_mutation_id", "main", true, ""},
	} {
		why, ok := mutators.Authorize(c.role, c.action, c.n3, c.n4, c.schema)
		if ok != c.ok || !strings.Contains(why, c.why) {
			t.Errorf("Authorize(%d, %d, %q, %q, %q) = %q, %v; want %v with %q", c.role, c.action, c.n3, c.n4, c.schema, why, ok, c.ok, c.why)
		}
	}
}

// FuzzAuthorize checks the contract's invariants on any names: the engine
// may do anything, a mutator never controls the transaction, never writes
// a reserved table of main, and a refusal always says why.
func FuzzAuthorize(f *testing.F) {
	f.Add(int(mutators.RoleMutator), int(sqlite3.AUTH_UPDATE), "_sqlrebase_clients", "x", "main")
	f.Add(int(mutators.RoleReader), int(sqlite3.AUTH_PRAGMA), "journal_mode", "wal", "")
	f.Fuzz(func(t *testing.T, role, action int, n3, n4, schema string) {
		r := mutators.Role(role % 3)
		if r < 0 {
			r = -r
		}
		a := sqlite3.AuthorizerActionCode(action)
		why, ok := mutators.Authorize(r, a, n3, n4, schema)
		if r == mutators.RoleEngine && !ok {
			t.Fatal("the engine was refused")
		}
		if !ok && why == "" {
			t.Fatal("a refusal without a reason")
		}
		if r == mutators.RoleMutator && a == sqlite3.AUTH_TRANSACTION && ok {
			t.Fatal("a mutator may control the transaction")
		}
		main := schema == "" || strings.EqualFold(schema, "main")
		if r == mutators.RoleMutator && main && mutators.IsReserved(n3) && ok &&
			(a == sqlite3.AUTH_INSERT || a == sqlite3.AUTH_UPDATE || a == sqlite3.AUTH_DELETE) {
			t.Fatal("a mutator may write a reserved table")
		}
	})
}
