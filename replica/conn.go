package replica

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"sync"

	sqlite3 "github.com/ncruces/go-sqlite3"
	sqlitedriver "github.com/ncruces/go-sqlite3/driver"
)

// readConnector makes the connections behind DB(). Each wraps a go-sqlite3
// connection so that every statement and transaction passes the replica's
// gate (so it never sees a rebase half done), reloads the schema after a
// rebase that moved it (the schema-cookie ABA fix), and reports writes to
// replicated tables as ErrReadOnly.
type readConnector struct {
	r     *Replica
	inner driver.Connector
}

func (c *readConnector) Driver() driver.Driver { return c.inner.Driver() }

func (c *readConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.inner.Connect(ctx)
	if err != nil {
		return nil, err
	}
	raw := dc.(sqlitedriver.Conn).Raw()
	rc := &readConn{r: c.r, inner: dc, raw: raw, role: roleReader}
	if err := c.r.initConn(raw, func() role { return rc.role }, rc.deny); err != nil {
		dc.Close()
		return nil, err
	}
	rc.epoch = c.r.schemaEpoch.Load()
	return rc, nil
}

type readConn struct {
	r      *Replica
	inner  driver.Conn
	raw    *sqlite3.Conn
	epoch  uint64
	inTx   bool
	role   role // roleReader, or roleEngine while the replica runs its own statement
	mu     sync.Mutex
	denied string // what the authorizer refused last, for a clear error
}

// deny is called by the authorizer when it refuses a statement.
func (c *readConn) deny(why string) {
	c.mu.Lock()
	c.denied = why
	c.mu.Unlock()
}

// explain turns an authorizer refusal into ErrReadOnly.
func (c *readConn) explain(err error) error {
	if err == nil {
		return nil
	}
	c.mu.Lock()
	why := c.denied
	c.denied = ""
	c.mu.Unlock()
	if why != "" && errors.Is(err, sqlite3.AUTH) {
		return fmt.Errorf("%w: %s", ErrReadOnly, why)
	}
	return err
}

// enter passes the gate unless the connection is inside a transaction (which
// holds the gate already), then reloads the schema if a rebase moved it.
func (c *readConn) enter(ctx context.Context) (func(), error) {
	if c.inTx {
		return func() {}, nil
	}
	if err := c.r.gate.enter(ctx); err != nil {
		return nil, err
	}
	if err := c.refreshSchema(); err != nil {
		c.r.gate.leave()
		return nil, err
	}
	return c.r.gate.leave, nil
}

func (c *readConn) refreshSchema() error {
	if e := c.r.schemaEpoch.Load(); e != c.epoch {
		c.role = roleEngine
		err := c.raw.Exec("PRAGMA writable_schema=RESET")
		c.role = roleReader
		if err != nil {
			return fmt.Errorf("reload schema after rebase: %w", err)
		}
		c.epoch = e
	}
	return nil
}

func (c *readConn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

func (c *readConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	leave, err := c.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer leave()
	s, err := c.inner.(driver.ConnPrepareContext).PrepareContext(ctx, query)
	if err != nil {
		return nil, c.explain(err)
	}
	return &readStmt{c: c, inner: s}, nil
}

func (c *readConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	leave, err := c.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer leave()
	res, err := c.inner.(driver.ExecerContext).ExecContext(ctx, query, args)
	return res, c.explain(err)
}

func (c *readConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *readConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	leave, err := c.enter(ctx)
	if err != nil {
		return nil, err
	}
	tx, err := c.inner.(driver.ConnBeginTx).BeginTx(ctx, opts)
	if err != nil {
		leave()
		return nil, c.explain(err)
	}
	c.inTx = true
	return &readTx{c: c, inner: tx, leave: leave}, nil
}

func (c *readConn) CheckNamedValue(v *driver.NamedValue) error {
	return c.inner.(driver.NamedValueChecker).CheckNamedValue(v)
}

func (c *readConn) Close() error { return c.inner.Close() }

// Raw gives the underlying go-sqlite3 connection, as the driver's own
// connections do. Statements run on it bypass the gate.
func (c *readConn) Raw() *sqlite3.Conn { return c.raw }

type readTx struct {
	c     *readConn
	inner driver.Tx
	leave func()
}

func (t *readTx) Commit() error {
	err := t.inner.Commit()
	t.end()
	return t.c.explain(err)
}

func (t *readTx) Rollback() error {
	err := t.inner.Rollback()
	t.end()
	return err
}

func (t *readTx) end() {
	if t.leave != nil {
		t.c.inTx = false
		t.leave()
		t.leave = nil
	}
}

type readStmt struct {
	c     *readConn
	inner driver.Stmt
}

func (s *readStmt) Close() error  { return s.inner.Close() }
func (s *readStmt) NumInput() int { return s.inner.NumInput() }

func (s *readStmt) Exec(args []driver.Value) (driver.Result, error) {
	return nil, errors.New("replica: use ExecContext")
}

func (s *readStmt) Query(args []driver.Value) (driver.Rows, error) {
	return nil, errors.New("replica: use QueryContext")
}

func (s *readStmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	leave, err := s.c.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer leave()
	res, err := s.inner.(driver.StmtExecContext).ExecContext(ctx, args)
	return res, s.c.explain(err)
}

func (s *readStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	leave, err := s.c.enter(ctx)
	if err != nil {
		return nil, err
	}
	rows, err := s.inner.(driver.StmtQueryContext).QueryContext(ctx, args)
	if err != nil {
		leave()
		return nil, s.c.explain(err)
	}
	return &readRows{Rows: rows, leave: leave}, nil
}

func (s *readStmt) CheckNamedValue(v *driver.NamedValue) error {
	return s.inner.(driver.NamedValueChecker).CheckNamedValue(v)
}

// readRows holds the gate until the rows are closed: an open cursor is an
// open read transaction.
type readRows struct {
	driver.Rows
	leave func()
}

func (r *readRows) Close() error {
	err := r.Rows.Close()
	if r.leave != nil {
		r.leave()
		r.leave = nil
	}
	return err
}

// ColumnTypeDatabaseTypeName and friends are forwarded so that sql.ColumnType
// works as with the plain driver.
func (r *readRows) ColumnTypeDatabaseTypeName(i int) string {
	if t, ok := r.Rows.(driver.RowsColumnTypeDatabaseTypeName); ok {
		return t.ColumnTypeDatabaseTypeName(i)
	}
	return ""
}
