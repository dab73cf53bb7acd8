package mutators

import (
	"fmt"
	"strings"

	sqlite3 "github.com/ncruces/go-sqlite3"
)

// Role is who prepares a statement, for [Authorize]. The replica and the
// server install the same authorizer on their connections and set the role
// around each statement they prepare, so that the mutator contract is
// enforced the same way on both sides: a mutator that passes on a replica
// cannot do more on the server.
type Role int

const (
	// RoleEngine is the replica's or server's own statements (the zero
	// value): everything is allowed.
	RoleEngine Role = iota
	// RoleReader is an app connection of a replica: it reads everything and
	// writes only databases other than "main".
	RoleReader
	// RoleMutator is a mutator running inside the caller's transaction.
	RoleMutator
)

// pragmasThatWrite are pragmas that, given a value, change the database file
// or stop the replica or server from controlling it.
var pragmasThatWrite = map[string]bool{
	"journal_mode": true, "locking_mode": true, "writable_schema": true,
	"schema_version": true, "user_version": true, "application_id": true,
	"page_size": true, "auto_vacuum": true, "incremental_vacuum": true,
	"wal_autocheckpoint": true, "wal_checkpoint": true,
}

// Authorize decides whether a statement being prepared by r may do what
// SQLite's authorizer reports (action, its two names and the schema). It
// returns a reason naming the statement when it must not, e.g. "COMMIT
// inside a mutator (use SAVEPOINT)".
//
// Readers may read everything and write any attached database but "main".
// Mutators may write "main" (and temp) but no reserved table; they may not
// control the transaction their caller opened (their own SAVEPOINTs are
// fine, but not savepoints whose name starts with [ReservedPrefix], which
// are the caller's), attach or detach databases, or run pragmas that
// change the file or how it is managed.
func Authorize(r Role, action sqlite3.AuthorizerActionCode, name3, name4, schema string) (why string, ok bool) {
	if r == RoleEngine {
		return "", true
	}
	switch action {
	case sqlite3.AUTH_PRAGMA:
		if strings.EqualFold(name3, "wal_checkpoint") || (name4 != "" && pragmasThatWrite[strings.ToLower(name3)] && (schema == "" || schema == "main")) {
			return fmt.Sprintf("PRAGMA %s", name3), false
		}
		return "", true
	case sqlite3.AUTH_TRANSACTION:
		if r == RoleMutator {
			return fmt.Sprintf("%s inside a mutator (use SAVEPOINT)", name3), false
		}
		return "", true
	case sqlite3.AUTH_SAVEPOINT:
		// name3 is BEGIN, RELEASE or ROLLBACK, name4 the savepoint.
		if r == RoleMutator && IsReserved(name4) {
			return fmt.Sprintf("SAVEPOINT %s %q inside a mutator: the caller's savepoint", name3, name4), false
		}
		return "", true
	case sqlite3.AUTH_ATTACH, sqlite3.AUTH_DETACH:
		if r == RoleMutator {
			return "ATTACH/DETACH inside a mutator", false
		}
		return "", true
	case sqlite3.AUTH_ALTER_TABLE:
		// name3 is the database, name4 the table.
		return checkWrite(r, "ALTER TABLE", name4, name3)
	case sqlite3.AUTH_INSERT, sqlite3.AUTH_UPDATE, sqlite3.AUTH_DELETE,
		sqlite3.AUTH_CREATE_TABLE, sqlite3.AUTH_DROP_TABLE,
		sqlite3.AUTH_CREATE_VIEW, sqlite3.AUTH_DROP_VIEW,
		sqlite3.AUTH_CREATE_VTABLE, sqlite3.AUTH_DROP_VTABLE,
		sqlite3.AUTH_ANALYZE, sqlite3.AUTH_REINDEX:
		return checkWrite(r, actionName(action), name3, schema)
	case sqlite3.AUTH_CREATE_INDEX, sqlite3.AUTH_DROP_INDEX,
		sqlite3.AUTH_CREATE_TRIGGER, sqlite3.AUTH_DROP_TRIGGER:
		// name4 is the table the index or trigger belongs to.
		return checkWrite(r, actionName(action), name4, schema)
	}
	return "", true
}

func checkWrite(r Role, what, table, schema string) (string, bool) {
	main := schema == "" || strings.EqualFold(schema, "main")
	switch {
	case r == RoleReader && main:
		return fmt.Sprintf("%s on replicated table %q", what, table), false
	case r == RoleMutator && main && IsReserved(table):
		return fmt.Sprintf("%s on reserved table %q", what, table), false
	case r == RoleMutator && !main && !strings.EqualFold(schema, "temp"):
		return fmt.Sprintf("%s on %s.%s: mutators change replicated data only", what, schema, table), false
	}
	return "", true
}

func actionName(a sqlite3.AuthorizerActionCode) string {
	switch a {
	case sqlite3.AUTH_INSERT:
		return "INSERT"
	case sqlite3.AUTH_UPDATE:
		return "UPDATE"
	case sqlite3.AUTH_DELETE:
		return "DELETE"
	case sqlite3.AUTH_CREATE_TABLE:
		return "CREATE TABLE"
	case sqlite3.AUTH_DROP_TABLE:
		return "DROP TABLE"
	case sqlite3.AUTH_CREATE_INDEX:
		return "CREATE INDEX"
	case sqlite3.AUTH_DROP_INDEX:
		return "DROP INDEX"
	case sqlite3.AUTH_CREATE_TRIGGER:
		return "CREATE TRIGGER"
	case sqlite3.AUTH_DROP_TRIGGER:
		return "DROP TRIGGER"
	case sqlite3.AUTH_CREATE_VIEW:
		return "CREATE VIEW"
	case sqlite3.AUTH_DROP_VIEW:
		return "DROP VIEW"
	case sqlite3.AUTH_CREATE_VTABLE:
		return "CREATE VIRTUAL TABLE"
	case sqlite3.AUTH_DROP_VTABLE:
		return "DROP VIRTUAL TABLE"
	case sqlite3.AUTH_ANALYZE:
		return "ANALYZE"
	case sqlite3.AUTH_REINDEX:
		return "REINDEX"
	}
	return fmt.Sprintf("action %d", a)
}
