package replica

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	sqlite3 "github.com/ncruces/go-sqlite3"

	"github.com/sqlrebase/sqlrebase/wal"
)

// ErrQueryGone ends a live query whose statement no longer prepares (a
// schema change dropped a table or column it reads).
var ErrQueryGone = errors.New("replica: live query no longer prepares")

// liveState is what live queries need of the replica: which tables each
// change wrote, and the page-to-table map of the confirmed state.
//
// Lock order: mu and recMu are leaves. mu is taken under writeMu (by
// Mutate, settle and the rebase), recMu inside SQLite's authorizer; neither
// is held while calling anything else.
type liveState struct {
	mu       sync.Mutex
	written  map[string]bool // tables the writer wrote since the last take
	pending  map[string]bool // tables the pending mutations wrote: a rebase drops them
	pages    map[uint32]bool // pages of the server versions this rebase applies
	noted    bool            // pages is the whole change of this rebase's apply
	dirtyAll bool            // a failed rebase: the next change is everything
	bt       *btreeMap       // nil until a rebase with watchers builds it
	cookie   uint32          // the schema cookie bt was built at
	settled  []uint64
	rejected []*RejectedError

	watchers  atomic.Int32 // live queries open; without any, bt is not kept
	recording atomic.Int32 // recorders registered
	recMu     sync.Mutex
	rec       map[*sqlite3.Conn]map[string]bool
}

// wrote is the writer connection's update hook.
func (l *liveState) wrote(_ sqlite3.AuthorizerActionCode, schema, table string, _ int64) {
	if schema != "main" {
		return
	}
	l.mu.Lock()
	if l.written == nil {
		l.written = map[string]bool{}
	}
	l.written[strings.ToLower(table)] = true
	l.mu.Unlock()
}

// noteRead is called by the authorizer on every AUTH_READ: while a live
// query prepares on c, it records the table.
func (l *liveState) noteRead(c *sqlite3.Conn, schema, table string) {
	if l.recording.Load() == 0 {
		return
	}
	l.recMu.Lock()
	defer l.recMu.Unlock()
	set := l.rec[c]
	if set == nil {
		return
	}
	switch {
	case schema != "main":
		set["*"] = true // temp or the local database: any change may matter
	case strings.EqualFold(table, "sqlite_master"):
		set["sqlite_schema"] = true
	default:
		set[strings.ToLower(table)] = true
	}
}

func (l *liveState) record(c *sqlite3.Conn, set map[string]bool) {
	l.recMu.Lock()
	if l.rec == nil {
		l.rec = map[*sqlite3.Conn]map[string]bool{}
	}
	l.rec[c] = set
	l.recMu.Unlock()
	l.recording.Add(1)
}

func (l *liveState) stopRecord(c *sqlite3.Conn) {
	l.recMu.Lock()
	delete(l.rec, c)
	l.recMu.Unlock()
	l.recording.Add(-1)
}

// notePages records the pages of the server versions a rebase applies.
func (l *liveState) notePages(sets []*wal.PageSet) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.noted = true
	if l.pages == nil {
		l.pages = map[uint32]bool{}
	}
	for _, s := range sets {
		if s == nil {
			continue
		}
		if s.Flags&wal.FlagSnapshot != 0 {
			l.noted = false
		}
		for _, p := range s.Pages {
			l.pages[p.Pgno] = true
		}
	}
}

// noteSettled records a mutation the server acknowledged (rejected, if it
// is in rejected), for the next Change. h is its handle, if the app holds one.
func (l *liveState) noteSettled(id uint64, rejected map[uint64]string, h *Handle) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.settled = append(l.settled, id)
	if msg, ok := rejected[id]; ok {
		e := &RejectedError{ID: id, Message: msg}
		if h != nil {
			e.Name = h.Name
		}
		l.rejected = append(l.rejected, e)
	}
}

// takeMutate fills a Mutate's Change: the tables its mutator wrote, which
// stay pending until the next rebase drops them.
func (l *liveState) takeMutate(c *Change) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pending == nil {
		l.pending = map[string]bool{}
	}
	for t := range l.written {
		l.pending[t] = true
	}
	c.Tables = sortedKeys(l.written)
	l.written = nil
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// liveRebased fills a rebase's Change (err is the rebase's) with the
// tables it may have changed: those the dropped pending mutations wrote,
// those the replay wrote, and those the server's pages belong to; and
// keeps the page map up to date. It runs under writeMu, after the replay.
func (r *Replica) liveRebased(c *Change, err error) {
	l := &r.live
	// l.mu is held over the map's reads (a SELECT and page reads): no
	// write, so the writer's update hook, which takes l.mu, cannot fire.
	l.mu.Lock()
	defer l.mu.Unlock()
	pages, noted := l.pages, l.noted
	l.pages, l.noted = nil, false
	if err != nil {
		// Whatever was half done, the next change re-runs everything.
		l.dirtyAll, l.bt = true, nil
		return
	}
	c.Settled, c.Rejected = l.settled, l.rejected
	l.settled, l.rejected = nil, nil
	cookie, cerr := r.files.SchemaCookie()
	all := l.dirtyAll || !noted || l.bt == nil || cerr != nil || cookie != l.cookie
	var touched []uint32
	tables := map[string]bool{}
	if !all {
		var ts []string
		ts, touched, all = l.bt.tablesOf(keysU32(pages))
		for _, t := range ts {
			tables[t] = true
		}
	}
	for t := range l.pending {
		tables[t] = true
	}
	for t := range l.written {
		tables[t] = true
	}
	l.pending, l.written, l.dirtyAll = l.written, nil, false
	c.AllTables = all
	if !all {
		c.Tables = sortedKeys(tables)
	}
	if l.watchers.Load() == 0 {
		l.bt = nil // nobody to tell: keep no map
		return
	}
	if all {
		l.bt, l.cookie = nil, cookie
		roots, rerr := r.schemaRoots()
		if rerr == nil {
			l.bt, rerr = newBtreeMap(roots, r.files.Pages(), r.files.ReadPage)
		}
		if rerr != nil {
			r.log.Warn("live queries: cannot map pages to tables; every version re-runs every live query", "err", rerr)
		}
		return
	}
	for _, root := range touched {
		if werr := l.bt.walk(root, r.files.Pages(), r.files.ReadPage); werr != nil {
			r.log.Warn("live queries: cannot re-walk a b-tree; rebuilding the map at the next version", "err", werr)
			l.bt = nil
			return
		}
	}
}

func keysU32(m map[uint32]bool) []uint32 {
	out := make([]uint32, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// schemaRoots reads every b-tree's root page and its table from the schema
// (the engine's connection; writeMu is held).
func (r *Replica) schemaRoots() (map[uint32]string, error) {
	rows, err := r.engineQ.QueryContext(context.Background(), "SELECT tbl_name, rootpage FROM main.sqlite_schema WHERE rootpage > 0")
	if err != nil {
		return nil, fmt.Errorf("read root pages: %w", err)
	}
	defer rows.Close()
	roots := map[uint32]string{1: "sqlite_schema"}
	for rows.Next() {
		var t string
		var root uint32
		if err := rows.Scan(&t, &root); err != nil {
			return nil, fmt.Errorf("read root pages: %w", err)
		}
		roots[root] = t
	}
	return roots, rows.Err()
}

// Result is one delivery of a live query: its rows, and (keyed by the first
// column) what changed since the result the same consumer got before.
type Result struct {
	Columns []string
	Rows    [][]any
	// Added, Changed and Removed are rows keyed by their first column,
	// relative to the previous Result of Next (all rows are Added in the
	// first). Rows whose key repeats make them approximate.
	Added, Changed, Removed [][]any
	// Err is a query that failed this time (ErrPendingHidden, a disk
	// error); the live query carries on and runs again at the next change.
	Err error
}

// LiveQuery is a query whose result is delivered again whenever a change
// of the replica may have changed it (see Replica.Watch).
type LiveQuery struct {
	r     *Replica
	query string
	args  []any

	kick   chan struct{} // 1 slot: a change touched what the query reads
	runs   atomic.Int64  // times the query ran (tests, the bench)
	cancel func()

	mu     sync.Mutex
	reads  map[string]bool // tables the last run read
	latest *Result         // the newest result not yet taken by Next
	ready  chan struct{}   // 1 slot: latest was set
	done   chan struct{}   // closed when the watcher goroutine ends
	err    error           // why it ended
	prev   [][]any         // rows of the result Next returned last
	got    bool            // Next has returned a result
	last   [][]any         // rows of the last result posted
	posted bool            // a result has been posted
}

// Runs is how many times the live query has run so far (its first run
// included): what a benchmark or a diagnostic counts to see that a change to
// another table did not re-run it.
func (q *LiveQuery) Runs() int64 { return q.runs.Load() }

// Watch runs query (through DB(), so never on a state half rebased) and
// delivers its result at once, then again after every Mutate or rebase that
// changed a table the query reads and changed its result. Tables read are
// the ones SQLite's authorizer reports while the query prepares; tables
// changed are what the writer's update hook saw for local mutations and,
// for server versions, the b-trees of their pages. A consumer that falls
// behind gets the newest result only. The live query ends when ctx is done,
// or with ErrQueryGone when a schema change makes it fail to prepare.
// Close live queries (or cancel ctx) before closing the replica.
//
// Writes an app makes through DB() to a local (attached) table are not
// seen; a query reading a temp or local table re-runs on every change.
func (r *Replica) Watch(ctx context.Context, query string, args ...any) (*LiveQuery, error) {
	if r.closed.Load() {
		return nil, ErrClosed
	}
	q := &LiveQuery{r: r, query: query, args: args, kick: make(chan struct{}, 1),
		ready: make(chan struct{}, 1), done: make(chan struct{}), reads: map[string]bool{"*": true}}
	r.live.watchers.Add(1)
	unsub := r.OnChange(q.onChange)
	ctx, cancel := context.WithCancel(ctx)
	q.cancel = cancel
	go q.loop(ctx, unsub)
	return q, nil
}

// onChange runs on the goroutine that made the change, after its locks are
// released: it only signals the watcher's goroutine, never queries.
func (q *LiveQuery) onChange(c Change) {
	if !q.affected(c) {
		return
	}
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

func (q *LiveQuery) affected(c Change) bool {
	if c.AllTables {
		return true
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.reads["*"] {
		return true
	}
	for _, t := range c.Tables {
		if q.reads[t] {
			return true
		}
	}
	return false
}

func (q *LiveQuery) loop(ctx context.Context, unsub func()) {
	defer func() {
		unsub()
		q.r.live.watchers.Add(-1)
		close(q.done)
	}()
	for {
		res, reads, err := q.run(ctx)
		if ctx.Err() != nil {
			q.end(ctx.Err())
			return
		}
		if err != nil {
			q.end(err)
			return
		}
		q.mu.Lock()
		if res.Err == nil {
			q.reads = reads
		}
		// Post only what differs from the last posted result (or an error):
		// a change that left the result alone is no delivery.
		if res.Err != nil || !q.posted || !reflect.DeepEqual(res.Rows, q.last) {
			if res.Err == nil {
				q.last, q.posted = res.Rows, true
			}
			q.latest = res
			select {
			case q.ready <- struct{}{}:
			default:
			}
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			q.end(ctx.Err())
			return
		case <-q.kick:
		}
	}
}

func (q *LiveQuery) end(err error) {
	q.mu.Lock()
	q.err = err
	q.mu.Unlock()
}

// run runs the query once, recording the tables it reads. err ends the
// live query (it no longer prepares); a failing run is res.Err.
func (q *LiveQuery) run(ctx context.Context) (res *Result, reads map[string]bool, err error) {
	res = &Result{}
	q.runs.Add(1)
	conn, err := q.r.DB().Conn(ctx)
	if err != nil {
		res.Err = err
		return res, nil, nil
	}
	defer conn.Close()
	var raw *sqlite3.Conn
	if err := conn.Raw(func(dc any) error {
		rc, ok := dc.(*readConn)
		if !ok {
			return fmt.Errorf("replica: DB() connection is a %T", dc)
		}
		raw = rc.raw
		return nil
	}); err != nil {
		return nil, nil, err
	}
	reads = map[string]bool{}
	q.r.live.record(raw, reads)
	defer q.r.live.stopRecord(raw)
	stmt, err := conn.PrepareContext(ctx, q.query)
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, ErrPendingHidden) || errors.Is(err, ErrReadersBusy) {
			res.Err = err
			return res, nil, nil
		}
		return nil, nil, fmt.Errorf("%w: %w", ErrQueryGone, err)
	}
	defer stmt.Close()
	rows, err := stmt.QueryContext(ctx, q.args...)
	if err != nil {
		res.Err = err
		return res, nil, nil
	}
	defer rows.Close()
	res.Err = scanAll(rows, res)
	q.r.live.recMu.Lock()
	out := make(map[string]bool, len(reads))
	for k := range reads {
		out[k] = true
	}
	q.r.live.recMu.Unlock()
	return res, out, nil
}

func scanAll(rows *sql.Rows, res *Result) error {
	cols, err := rows.Columns()
	if err != nil {
		return err
	}
	res.Columns = cols
	for rows.Next() {
		row := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range row {
			ptrs[i] = &row[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return err
		}
		for i, v := range row {
			if b, ok := v.([]byte); ok {
				row[i] = append([]byte(nil), b...)
			}
		}
		res.Rows = append(res.Rows, row)
	}
	return rows.Err()
}

// Next waits for a result that differs from the one it returned last (the
// first call returns the first result) and returns the newest. It returns
// an error when the live query has ended (ErrQueryGone, or the context's
// error after Close or cancel) or ctx is done.
func (q *LiveQuery) Next(ctx context.Context) (Result, error) {
	for {
		q.mu.Lock()
		if res := q.latest; res != nil {
			q.latest = nil
			if res.Err == nil && q.got && reflect.DeepEqual(res.Rows, q.prev) {
				// Changed and changed back before this consumer looked.
				q.mu.Unlock()
				continue
			}
			if res.Err == nil {
				q.got = true
				res.Added, res.Changed, res.Removed = diffRows(q.prev, res.Rows)
				q.prev = res.Rows
			}
			q.mu.Unlock()
			return *res, nil
		}
		q.mu.Unlock()
		select {
		case <-q.ready:
			continue
		case <-q.done:
			q.mu.Lock()
			late, err := q.latest != nil, q.err
			q.mu.Unlock()
			if late {
				continue
			}
			return Result{}, fmt.Errorf("live query ended: %w", err)
		case <-ctx.Done():
			return Result{}, ctx.Err()
		}
	}
}

// Close ends the live query and waits for its goroutine.
func (q *LiveQuery) Close() {
	q.cancel()
	<-q.done
}

// Tables returns the tables the query read when it last ran (lower case;
// "*" for a temp or local table, which any change re-runs).
func (q *LiveQuery) Tables() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return sortedKeys(q.reads)
}

// diffRows compares two results keyed by their first column.
func diffRows(prev, next [][]any) (added, changed, removed [][]any) {
	key := func(row []any) string {
		if len(row) == 0 {
			return ""
		}
		return fmt.Sprintf("%T:%v", row[0], row[0])
	}
	old := make(map[string][]any, len(prev))
	for _, row := range prev {
		old[key(row)] = row
	}
	seen := make(map[string]bool, len(next))
	for _, row := range next {
		k := key(row)
		seen[k] = true
		if o, ok := old[k]; !ok {
			added = append(added, row)
		} else if !reflect.DeepEqual(o, row) {
			changed = append(changed, row)
		}
	}
	for _, row := range prev {
		if !seen[key(row)] {
			removed = append(removed, row)
		}
	}
	return added, changed, removed
}
