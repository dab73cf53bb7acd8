package replica

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
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

// innerConn is what readConn needs of a go-sqlite3 driver connection,
// checked once in Connect (an error, not a panic, if a go-sqlite3 bump
// drops one of them).
type innerConn interface {
	sqlitedriver.Conn
	driver.ExecerContext
	driver.NamedValueChecker
}

// innerStmt is what readStmt needs of a go-sqlite3 statement, checked in
// PrepareContext.
type innerStmt interface {
	driver.Stmt
	driver.StmtExecContext
	driver.StmtQueryContext
	driver.NamedValueChecker
}

func (c *readConnector) Connect(ctx context.Context) (driver.Conn, error) {
	// A poisoned replica's files may be torn, and SQLite is locked out of
	// them: say so at once rather than let the driver's setup wait.
	if err := c.r.files.Poisoned(); err != nil {
		return nil, fmt.Errorf("replica: %w", err)
	}
	conn, err := c.inner.Connect(ctx)
	if err != nil {
		return nil, err
	}
	dc, ok := conn.(innerConn)
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("replica: the go-sqlite3 connection %T lacks an interface the replica needs", conn)
	}
	raw := dc.Raw()
	rc := &readConn{r: c.r, inner: dc, raw: raw, role: roleReader, id: c.r.connIDs.Add(1)}
	if err := c.r.initConn(raw, func() role { return rc.role }, rc.deny); err != nil {
		dc.Close()
		return nil, err
	}
	rc.epoch = c.r.schemaEpoch.Load()
	return rc, nil
}

type readConn struct {
	r      *Replica
	inner  innerConn
	raw    *sqlite3.Conn
	id     int64 // for ErrReadersBusy: "DB() connection #id"
	epoch  uint64
	role   role // roleReader, or roleEngine while the replica runs its own statement
	mu     sync.Mutex
	denied string // what the authorizer refused last, for a clear error

	// hold is this connection's place in the gate, nil when it holds none.
	// It holds the gate while a statement runs, while a cursor is open
	// (rows), and while SQLite is outside autocommit, however the
	// transaction began: BeginTx, Exec("BEGIN"), Exec("SAVEPOINT x"), a
	// multi-statement Exec. database/sql uses a connection from one
	// goroutine at a time (Rows.Close included), so no lock guards these.
	hold *holder
	rows int
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

// enter makes sure the connection holds the gate for a statement (what it
// is, for ErrReadersBusy): it passes the gate unless it holds it already
// (inside a transaction or with a cursor open), then reloads the schema if a
// rebase moved it. Every enter is followed by release.
func (c *readConn) enter(ctx context.Context, what string) error {
	if c.hold != nil {
		return nil
	}
	h := newHolder(c.id, "a statement running ("+what+")")
	if err := c.r.gate.enter(ctx, h); err != nil {
		return err
	}
	c.hold = h
	// Inside the gate no rebase runs: the replica's state is settled.
	// Files a failed write left torn are never read (Repair first).
	if err := c.r.files.Poisoned(); err != nil {
		c.release()
		return fmt.Errorf("replica: %w", err)
	}
	if err := c.r.hiddenErr(); err != nil {
		c.release()
		return err
	}
	if err := c.refreshSchema(); err != nil {
		c.release()
		return err
	}
	return nil
}

// release lets go of the gate once the connection is back in autocommit
// with no cursor open; while it is not, the hold says since when and why.
func (c *readConn) release() {
	if c.hold == nil {
		return
	}
	if c.rows > 0 {
		return
	}
	if !c.raw.GetAutocommit() {
		what := *c.hold.what.Load()
		if !strings.HasPrefix(what, "been in a transaction") {
			what = "been in a transaction (began with " + strings.TrimSuffix(strings.TrimPrefix(what, "a statement running ("), ")") + ")"
			c.hold.what.Store(&what)
		}
		return
	}
	c.r.gate.leave(c.hold)
	c.hold = nil
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

// describeSQL shortens a statement for ErrReadersBusy.
func describeSQL(call, query string) string {
	q := strings.Join(strings.Fields(query), " ")
	if len(q) > 40 {
		q = q[:40] + "…"
	}
	return fmt.Sprintf("%s(%q)", call, q)
}

func (c *readConn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

func (c *readConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if err := c.enter(ctx, describeSQL("Prepare", query)); err != nil {
		return nil, err
	}
	defer c.release()
	s, err := c.inner.PrepareContext(ctx, query)
	if err != nil {
		return nil, c.explain(err)
	}
	is, ok := s.(innerStmt)
	if !ok {
		s.Close()
		return nil, fmt.Errorf("replica: the go-sqlite3 statement %T lacks an interface the replica needs", s)
	}
	return &readStmt{c: c, inner: is, query: query}, nil
}

func (c *readConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if err := c.enter(ctx, describeSQL("Exec", query)); err != nil {
		return nil, err
	}
	defer c.release()
	res, err := c.inner.ExecContext(ctx, query, args)
	return res, c.explain(err)
}

func (c *readConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *readConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if err := c.enter(ctx, "BeginTx"); err != nil {
		return nil, err
	}
	defer c.release()
	tx, err := c.inner.BeginTx(ctx, opts)
	if err != nil {
		return nil, c.explain(err)
	}
	return &readTx{c: c, inner: tx}, nil
}

func (c *readConn) CheckNamedValue(v *driver.NamedValue) error {
	return c.inner.CheckNamedValue(v)
}

// IsValid tells database/sql not to put a connection back in its pool while
// it is inside a transaction (the app ran Exec("BEGIN") on the *sql.DB,
// not on a *sql.Conn): the pool closes it, which rolls the transaction back
// and lets go of the gate, instead of keeping every rebase out.
func (c *readConn) IsValid() bool { return c.raw.GetAutocommit() }

func (c *readConn) Close() error {
	err := c.inner.Close()
	if c.hold != nil {
		c.r.gate.leave(c.hold)
		c.hold = nil
	}
	return err
}

// Raw gives the underlying go-sqlite3 connection, as the driver's own
// connections do. Statements run on it bypass the gate.
func (c *readConn) Raw() *sqlite3.Conn { return c.raw }

type readTx struct {
	c     *readConn
	inner driver.Tx
}

func (t *readTx) Commit() error {
	err := t.inner.Commit()
	t.c.release()
	return t.c.explain(err)
}

func (t *readTx) Rollback() error {
	err := t.inner.Rollback()
	t.c.release()
	return err
}

type readStmt struct {
	c     *readConn
	inner innerStmt
	query string
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
	if err := s.c.enter(ctx, describeSQL("Exec", s.query)); err != nil {
		return nil, err
	}
	defer s.c.release()
	res, err := s.inner.ExecContext(ctx, args)
	return res, s.c.explain(err)
}

func (s *readStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if err := s.c.enter(ctx, describeSQL("Query", s.query)); err != nil {
		return nil, err
	}
	rows, err := s.inner.QueryContext(ctx, args)
	if err != nil {
		s.c.release()
		return nil, s.c.explain(err)
	}
	s.c.rows++
	if s.c.hold != nil && s.c.raw.GetAutocommit() {
		what := "a cursor open (" + describeSQL("Query", s.query) + ")"
		s.c.hold.what.Store(&what)
	}
	return &readRows{Rows: rows, c: s.c}, nil
}

func (s *readStmt) CheckNamedValue(v *driver.NamedValue) error {
	return s.inner.CheckNamedValue(v)
}

// readRows holds the gate until the rows are closed: an open cursor is an
// open read transaction.
type readRows struct {
	driver.Rows
	c *readConn // nil once closed
}

func (r *readRows) Close() error {
	err := r.Rows.Close()
	if r.c != nil {
		r.c.rows--
		r.c.release()
		r.c = nil
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
