package mutators

import (
	"context"
	"database/sql"
)

// StmtCache is a Querier over one connection that prepares each distinct
// statement once and reuses it. Parsing is most of the cost of a small
// statement on SQLite; a server runs the same few statements (the
// mutators', SAVEPOINT, the reserved tables') for every mutation. SQLite
// re-prepares a cached statement by itself after a schema change.
//
// SQLite authorizes a statement when it prepares it, and again when it
// prepares it anew after a schema change, under whatever role the
// connection's authorizer sees then: so a cache serves one role only. The
// server and the replica each keep one for their own statements and one
// for the mutators', which they run only under the mutator role (a
// statement prepared for the engine must never run for a mutator). A
// StmtCache is not safe for concurrent use, like the connection under it.
type StmtCache struct {
	conn  *sql.Conn
	stmts map[string]*sql.Stmt
	max   int
}

// NewStmtCache returns a cache over conn holding at most max statements
// (beyond, it starts over).
func NewStmtCache(conn *sql.Conn, max int) *StmtCache {
	return &StmtCache{conn: conn, stmts: map[string]*sql.Stmt{}, max: max}
}

// stmt returns the prepared statement for query, or nil if it cannot be
// prepared alone (a script of several statements, or an error the
// connection reports better when running it).
func (c *StmtCache) stmt(ctx context.Context, query string) *sql.Stmt {
	if s, ok := c.stmts[query]; ok {
		return s
	}
	s, err := c.conn.PrepareContext(ctx, query)
	if err != nil {
		return nil
	}
	if len(c.stmts) >= c.max {
		c.Close()
	}
	c.stmts[query] = s
	return s
}

// ExecContext runs query through its cached statement.
func (c *StmtCache) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if s := c.stmt(ctx, query); s != nil {
		return s.ExecContext(ctx, args...)
	}
	return c.conn.ExecContext(ctx, query, args...)
}

// QueryContext runs query through its cached statement.
func (c *StmtCache) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if s := c.stmt(ctx, query); s != nil {
		return s.QueryContext(ctx, args...)
	}
	return c.conn.QueryContext(ctx, query, args...)
}

// QueryRowContext runs query through its cached statement.
func (c *StmtCache) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if s := c.stmt(ctx, query); s != nil {
		return s.QueryRowContext(ctx, args...)
	}
	return c.conn.QueryRowContext(ctx, query, args...)
}

// PrepareContext prepares query on the connection, outside the cache: the
// caller owns the statement and closes it.
func (c *StmtCache) PrepareContext(ctx context.Context, query string) (*sql.Stmt, error) {
	return c.conn.PrepareContext(ctx, query)
}

// Len is the number of statements cached.
func (c *StmtCache) Len() int { return len(c.stmts) }

// Close closes every cached statement.
func (c *StmtCache) Close() error {
	var first error
	for q, s := range c.stmts {
		if err := s.Close(); err != nil && first == nil {
			first = err
		}
		delete(c.stmts, q)
	}
	return first
}
