package replica

import (
	"errors"
	"fmt"
	"strings"

	sqlite3 "github.com/ncruces/go-sqlite3"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// ErrReadOnly is the error of a statement on DB() that would change
// replicated data. Replicated tables change only through mutators.
var ErrReadOnly = errors.New("replica: replicated data changes only through Mutate")

// ErrForbidden is the error of a statement a mutator may not run: transaction
// control, reserved tables, other attached databases.
var ErrForbidden = errors.New("replica: statement not allowed in a mutator")

// role is who is preparing a statement, for the authorizer.
type role int

const (
	roleEngine  role = iota // the replica's own statements on the writer (the zero value)
	roleReader              // a DB() connection of the app
	roleMutator             // a mutator running on the writer
)

// pragmasThatWrite are pragmas that, given a value, change the database file
// or stop the replica from controlling it.
var pragmasThatWrite = map[string]bool{
	"journal_mode": true, "locking_mode": true, "writable_schema": true,
	"schema_version": true, "user_version": true, "application_id": true,
	"page_size": true, "auto_vacuum": true, "incremental_vacuum": true,
	"wal_autocheckpoint": true, "wal_checkpoint": true,
}

// authorize decides whether a statement being prepared may touch what the
// authorizer reports. It returns a reason when it must not.
//
// Readers may read everything and write any attached database but "main".
// Mutators may write "main" (and temp) but no reserved table, and may not
// control the transaction their caller opened (SAVEPOINTs are fine).
func authorize(r role, action sqlite3.AuthorizerActionCode, name3, name4, schema string) (string, bool) {
	if r == roleEngine {
		return "", true
	}
	switch action {
	case sqlite3.AUTH_PRAGMA:
		if name3 == "wal_checkpoint" || (name4 != "" && pragmasThatWrite[strings.ToLower(name3)] && (schema == "" || schema == "main")) {
			return fmt.Sprintf("PRAGMA %s", name3), false
		}
		return "", true
	case sqlite3.AUTH_TRANSACTION:
		if r == roleMutator {
			return fmt.Sprintf("%s inside a mutator (use SAVEPOINT)", name3), false
		}
		return "", true
	case sqlite3.AUTH_ATTACH, sqlite3.AUTH_DETACH:
		if r == roleMutator {
			return "ATTACH/DETACH", false
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

func checkWrite(r role, what, table, schema string) (string, bool) {
	main := schema == "" || schema == "main"
	switch {
	case r == roleReader && main:
		return fmt.Sprintf("%s on replicated table %q", what, table), false
	case r == roleMutator && main && mutators.IsReserved(table):
		return fmt.Sprintf("%s on reserved table %q", what, table), false
	case r == roleMutator && !main && schema != "temp":
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
	case sqlite3.AUTH_ANALYZE:
		return "ANALYZE"
	case sqlite3.AUTH_REINDEX:
		return "REINDEX"
	}
	return fmt.Sprintf("action %d", a)
}
