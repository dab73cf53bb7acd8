// Package bench holds the baseline that sqlrebase is measured against: the
// savepoint engine of the prisma-sync prototype, rebuilt in Go on the same
// SQLite (github.com/ncruces/go-sqlite3) and running the same mutators.
//
// The prototype undoes pending local work with SQLite SAVEPOINTs that are
// never released: a rebase rolls back to the oldest one, executes the SQL
// statements the server sent, and runs the pending mutators again. It is
// fast for small rebases, but it persists nothing that is pending, hides the
// pending state from every other connection, holds one write transaction
// open for as long as anything is pending, and breaks as soon as the app uses
// a transaction of its own. The benchmarks in this package and in package
// replica put numbers on the comparison (see [SavepointEngine]).
package bench
