// Package policytest holds the table of statements the mutator contract
// forbids, so that the replica's and the server's enforcement of it
// (mutators.Authorize, installed on both) are tested against the same
// cases.
package policytest

// Case is one statement a mutator must not run, and a piece of the reason
// the rejection must give.
type Case struct {
	SQL string
	Why string
}

// Forbidden are statements a mutator may not run: transaction control,
// writes to the reserved tables, ATTACH/DETACH, writes outside the
// replicated database, the caller's savepoint, pragmas that change the
// file.
var Forbidden = []Case{
	{"COMMIT", "COMMIT inside a mutator"},
	{"END", "COMMIT inside a mutator"},
	{"ROLLBACK", "ROLLBACK inside a mutator"},
	{"BEGIN", "BEGIN inside a mutator"},
	{"UPDATE _sqlrebase_clients SET last_mutation_id = last_mutation_id + 1000", `UPDATE on reserved table "_sqlrebase_clients"`},
	{"INSERT INTO _sqlrebase_clients(client_id, last_mutation_id) VALUES('victim', 1000)", `INSERT on reserved table "_sqlrebase_clients"`},
	{"DELETE FROM _sqlrebase_clients", `DELETE on reserved table "_sqlrebase_clients"`},
	{"UPDATE _sqlrebase_meta SET value = value + 1", `UPDATE on reserved table "_sqlrebase_meta"`},
	{"INSERT INTO _sqlrebase_meta(key, value) VALUES('x', 1)", `INSERT on reserved table "_sqlrebase_meta"`},
	{"DELETE FROM _SQLREBASE_META", `DELETE on reserved table`},
	{"DELETE FROM _sqlrebase_rejections", `DELETE on reserved table "_sqlrebase_rejections"`},
	{"INSERT INTO _sqlrebase_rejections VALUES('c', 1, 'n', 'e', 1)", `INSERT on reserved table "_sqlrebase_rejections"`},
	{"UPDATE _sqlrebase_rejections SET error = 'x'", `UPDATE on reserved table "_sqlrebase_rejections"`},
	{"DROP TABLE _sqlrebase_meta", `DROP TABLE on reserved table`},
	{"CREATE TABLE _sqlrebase_x(a)", `CREATE TABLE on reserved table`},
	{"ATTACH ':memory:' AS other", "ATTACH/DETACH inside a mutator"},
	{"PRAGMA journal_mode=DELETE", "PRAGMA journal_mode"},
	{"PRAGMA user_version=7", "PRAGMA user_version"},
	{"PRAGMA writable_schema=ON", "PRAGMA writable_schema"},
	{"PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA wal_checkpoint"},
	{"RELEASE _sqlrebase_mutation", "the caller's savepoint"},
	{"ROLLBACK TO _sqlrebase_mutation", "the caller's savepoint"},
}
