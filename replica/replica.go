// Package replica is the client side of sqlrebase: a local SQLite database
// that the app reads through database/sql and changes only through named
// mutators, which run at once (optimistically) and are replayed on top of
// every server version until the server confirms or rejects them.
//
// The main database file is always the server's database at the replica's
// version; the WAL holds only pending local transactions (see package vfs).
// A rebase drops the WAL in O(1), writes the server's pages into the main
// file, and replays the pending mutations in one write transaction.
package replica

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	sqlite3 "github.com/ncruces/go-sqlite3"
	sqlitedriver "github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// Durability re-exports the storage durability settings.
type Durability = vfs.Durability

const (
	// Normal survives kill -9 with no fsync on the rebase path; after a
	// power failure a replica may need its state again from the server.
	Normal = vfs.Normal
	// Full also survives power loss: every Mutate and rebase is fsynced.
	Full = vfs.Full
)

// Options configure a replica.
type Options struct {
	// Mutators is the app's registry, the same one the server runs.
	Mutators *mutators.Registry
	// Durability defaults to Normal.
	Durability Durability
	// LocalName and LocalPath attach a local-only database, which the app
	// may write in its own transactions on DB() (as "LocalName.table"). It
	// is never replicated and never dropped. Both empty: none.
	LocalName, LocalPath string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Remote, if set, is the server this replica syncs with: Open starts a
	// sync loop that pushes the pending mutations and rebases on the
	// server's versions until Close. Nil: the app drives Rebase itself.
	Remote *Remote
	// AppVersion is the app's build number, stated to the server in Hello
	// (0: none). Raise it with every release. A server whose
	// MinAppVersion is higher refuses to sync with ErrUpgradeRequired;
	// the pending mutations stay queued for the upgraded build, opening
	// the same files, to push. An integer rather than a semver string, so
	// that "older" is one comparison the server cannot get wrong.
	AppVersion uint64
	// ReaderWait bounds how long a rebase waits for DB() readers (open
	// transactions and cursors) and for the WAL locks before it gives up
	// with ErrReadersBusy, which names the connection in the way; the sync
	// loop tries again later. Zero means DefaultReaderWait.
	ReaderWait time.Duration
	// User and Claims are the local user's identity: every mutator this
	// replica runs (Mutate's optimistic run, and every replay after a
	// rebase) sees them, with the replica's client id, through
	// mutators.CallerFrom. Set them to what the server's authenticator
	// will establish for this replica's credential (a JWT's "sub" and
	// claims), so that the optimistic run and the server's run agree.
	// Where they differ, the server's run wins: a mutation the server
	// rejects is rolled back here, and its effects are the server's.
	User   string
	Claims map[string]any

	// crashHook, if set, is called at named points of Mutate and Rebase;
	// the crash tests use it to kill the process exactly there.
	crashHook func(point string)
	// failHook, if set, is asked at named points ("commit": the COMMIT of
	// a Mutate or a replay); an error it returns is taken as that
	// statement's failure (tests inject I/O errors with it).
	failHook func(point string) error
	// rebaseDefer, if set, replaces maxRebaseDefer (the drain tests set
	// it long, so that they count replays, not time).
	rebaseDefer time.Duration
	// fileFaults, if set, is the fault hook under the replica's own file
	// I/O (vfs.Replica's): tests fill the disk with it.
	fileFaults *vfs.Faults
}

// Change tells watchers that the replica's visible state moved.
type Change struct {
	Version uint64 // the server version under the pending mutations
	Pending int    // pending mutations after the change
	Rebased bool   // false: a local Mutate; true: a rebase

	// Tables are the replicated tables (lower case, sorted) the change may
	// have changed, unless AllTables: a schema change, a snapshot, or a
	// version whose pages could not be placed (see Watch).
	Tables    []string
	AllTables bool
	// Settled are the mutations the server acknowledged in this rebase,
	// Rejected the ones among them it rejected: a UI's "saving…" ends.
	Settled  []uint64
	Rejected []*RejectedError
}

// Status is a snapshot of the replica's state.
type Status struct {
	ClientID string
	Version  uint64
	Checksum uint64
	Pending  int

	// The sync loop's state; zero without a Remote.

	// Connected says a session with the server is up (it accepted Hello).
	Connected bool
	// LastError is what ended the last session or connection attempt, nil
	// while connected. A fatal refusal (see WaitConnected) stays here.
	LastError error
	// ServerVersion is the newest server version the replica has heard
	// of: the gap to Version is what it has still to apply.
	ServerVersion uint64
	// Node is the address of the node (Remote.Addr or one of its
	// Alternates) of the current session, or of the last session the
	// replica had; "" before the first.
	Node string

	// ForeignWrites counts the times the replica found frames in its WAL
	// that its own writer did not commit (another process wrote to the
	// database, e.g. with the sqlite3 shell) and dropped them. Replicated
	// data changes only through mutators; such a write was visible to
	// readers until it was found, at the next Mutate or rebase.
	ForeignWrites int
}

// Replica is an open replica database. Its methods are safe for concurrent
// use.
type Replica struct {
	path  string
	opts  Options
	log   *slog.Logger
	files *vfs.Replica
	queue *queue
	// caller is who every mutator of this replica runs as (Options.User
	// and Claims, and the client id): set at open, never changed.
	caller mutators.Caller

	// Lock order: gate, then writeMu, then the vfs's wal-index locks (taken
	// by files.Rebase); watchMu, hmu, the queue's and the sync state's
	// locks are leaves, never held while waiting for another lock. A rebase
	// closes the gate (waits for DB() readers) before it takes writeMu, and
	// nothing holding writeMu waits for the gate; so a reader may call
	// Mutate (writeMu only), Status, Pending or Handle (no writeMu at all)
	// while a rebase waits for it, and they return.
	writeMu ctxMutex // serialises Mutate and Rebase on the writer
	writer  *sql.Conn
	// engineQ and mutatorQ run statements on the writer prepared once
	// (parsing was half of a replay). Two caches, because SQLite authorizes
	// a statement when it prepares it: a statement prepared for the engine
	// must never run for a mutator, whose statements the authorizer limits.
	// After a schema reset SQLite re-prepares them (the schema generation
	// moves), so the schema-cookie ABA fix covers them too.
	engineQ, mutatorQ *mutators.StmtCache
	// dec decodes the server's versions, reusing its decompressor (made
	// at the first version; guarded by writeMu).
	dec  *protocol.Decoder
	wdb  *sql.DB
	role atomic.Int32 // role of statements on the writer, for the authorizer
	// mutatorDenied is what the authorizer refused to a running mutator,
	// so that its error can say why.
	mutatorDenied atomic.Pointer[string]
	lmid          uint64 // last mutation id the server acknowledged, as the queue recorded it (writeMu)
	// ackRead is the acknowledged id the confirmed state says (>= lmid;
	// more while the queue failed to record it): replay skips up to it, so
	// a failed queue write never shows a mutation twice (writeMu).
	ackRead uint64
	hmu     sync.Mutex
	// handles holds the Handle of each pending mutation weakly: one the
	// app has dropped costs no memory beyond its map entry (a long offline
	// queue), and Handle makes a new one on demand. hmu; changed only under
	// writeMu too.
	handles map[uint64]weak.Pointer[Handle]

	// What Status reports, published under writeMu after every change, so
	// that Status never waits for a Mutate or a rebase.
	stVersion, stChecksum atomic.Uint64
	stPending             atomic.Int64

	gate        *gate
	schemaEpoch atomic.Uint64
	rdb         *sql.DB

	watchMu  sync.Mutex
	watchers map[int]func(Change)
	nextW    int
	live     liveState // live queries' bookkeeping (watch.go)

	net   *netState    // the sync loop; nil without Options.Remote
	fatal *fatalSignal // set when the sync loop stops on a refusal

	// hidden is set when a replay (or a Mutate's own transaction) failed
	// to write, so that DB() would show a state without some pending
	// mutation: reads and Mutate fail with ErrPendingHidden until a rebase
	// (Mutate starts one) replays everything again.
	hidden atomic.Pointer[error]
	// repairSnap is the snapshot file whose install poisoned the files:
	// Repair copies it again, so it is kept until then (or Close).
	repairSnap atomic.Pointer[snapBuffer]

	// ownFrames is the WAL's frame count after the writer's last commit
	// (its WAL hook), 0 after a drop: a wal-index that counts more frames
	// holds another process's write (see Status.ForeignWrites).
	// connIDs numbers the read connections of DB() and of every
	// Connector alike, so that ErrReadersBusy's "connection #N" names one.
	connIDs atomic.Int64

	ownFrames     atomic.Uint32
	foreignWrites atomic.Int64

	lastRebase atomic.Int64  // when the last rebase (or Open) ended, Unix ns: rebaseDue's clock
	deferWake  atomic.Bool   // a wake-up of the sync loop is armed for a deferred rebase
	replayed   atomic.Uint64 // mutations replayed in all, for tests and benchmarks
	stats      stats         // the rest of Stats

	closed atomic.Bool
}

// gatePatience is how long a rebase waits for readers to leave before it
// lets held-back readers through once and tries again.
const gatePatience = 50 * time.Millisecond

// DefaultReaderWait is Options.ReaderWait's default.
const DefaultReaderWait = 10 * time.Second

// ctxMutex is a mutex whose Lock can give up with a context (a 1-buffered
// channel semaphore): Mutate's wait for the writer honours its ctx.
type ctxMutex struct {
	once sync.Once
	ch   chan struct{}
}

func (m *ctxMutex) sem() chan struct{} {
	m.once.Do(func() { m.ch = make(chan struct{}, 1) })
	return m.ch
}

// Lock takes the lock, however long that takes.
func (m *ctxMutex) Lock() { m.sem() <- struct{}{} }

// LockContext takes the lock, or returns ctx's error if ctx ends first.
func (m *ctxMutex) LockContext(ctx context.Context) error {
	select {
	case m.sem() <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Unlock lets go of the lock.
func (m *ctxMutex) Unlock() { <-m.sem() }

// readerWait is the bound on a rebase's wait for readers.
func (r *Replica) readerWait() time.Duration {
	if r.opts.ReaderWait > 0 {
		return r.opts.ReaderWait
	}
	return DefaultReaderWait
}

// publish makes the state Status reports current. Call with writeMu held.
func (r *Replica) publish() {
	r.stVersion.Store(r.files.Version())
	r.stChecksum.Store(r.files.Checksum())
	r.stPending.Store(int64(r.queue.Len()))
}

// Open opens (or creates) the replica database at path. The process holds it
// exclusively until Close; a second Open fails with ErrLocked. Pending
// mutations from before a crash are replayed at once.
func Open(ctx context.Context, path string, opts Options) (*Replica, error) {
	if opts.Mutators == nil {
		return nil, errors.New("replica: Options.Mutators is required")
	}
	if (opts.LocalName == "") != (opts.LocalPath == "") {
		return nil, errors.New("replica: set both LocalName and LocalPath, or neither")
	}
	if opts.LocalName == "main" || opts.LocalName == "temp" {
		return nil, fmt.Errorf("replica: %q cannot name the local database", opts.LocalName)
	}
	if opts.Remote != nil {
		if err := opts.Remote.validate(); err != nil {
			return nil, err
		}
	}
	r := &Replica{
		path: path, opts: opts, log: opts.Logger,
		handles: map[uint64]weak.Pointer[Handle]{}, gate: newGate(), watchers: map[int]func(Change){},
		fatal: newFatalSignal(),
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	if err := r.open(ctx); err != nil {
		r.Close()
		return nil, fmt.Errorf("open replica %s: %w", path, err)
	}
	if opts.Remote != nil {
		if err := writeSettings(path, opts.Remote); err != nil {
			r.Close()
			return nil, fmt.Errorf("open replica %s: %w", path, err)
		}
		if err := r.startSync(); err != nil {
			r.Close()
			return nil, fmt.Errorf("open replica %s: %w", path, err)
		}
	}
	return r, nil
}

func (r *Replica) open(ctx context.Context) error {
	var err error
	// The queue's lock is the ownership lock: take it before touching the
	// database files.
	if r.queue, err = openQueue(r.path+"-pending", r.opts.Durability == Full); err != nil {
		return err
	}
	r.caller = mutators.Caller{ClientID: r.queue.ClientID(), UserID: r.opts.User, Claims: r.opts.Claims}
	r.files, err = vfs.OpenReplicaWith(r.path, vfs.ReplicaOptions{Durability: r.opts.Durability, Faults: r.opts.fileFaults})
	if errors.Is(err, vfs.ErrDiverged) && r.opts.Remote != nil {
		// The main file is not a state the server ever had (a write torn
		// by a power failure under Durability Normal). It is never served:
		// set it aside and start from the empty database, which the sync
		// loop brings back to the server's state (through a snapshot if
		// need be). The pending queue is kept and replayed on top.
		aside, qerr := quarantine(r.path)
		if qerr != nil {
			return errors.Join(err, qerr)
		}
		r.log.Warn("replica's main file diverged from every server version; set aside, re-syncing from the server", "err", err, "aside", aside)
		r.files, err = vfs.OpenReplicaWith(r.path, vfs.ReplicaOptions{Durability: r.opts.Durability, Faults: r.opts.fileFaults})
	}
	if err != nil {
		return err
	}
	dsn := "file:" + (&url.URL{Path: r.path}).EscapedPath() + "?vfs=" + vfs.Name
	r.wdb, err = sqlitedriver.Open(dsn+"&_txlock=immediate", func(c *sqlite3.Conn) error {
		c.UpdateHook(r.live.wrote) // which tables each change wrote, for Watch
		return r.initConn(c, func() role { return role(r.role.Load()) }, nil)
	})
	if err != nil {
		return err
	}
	r.wdb.SetMaxOpenConns(1)
	if r.writer, err = r.wdb.Conn(ctx); err == nil {
		r.engineQ, r.mutatorQ = mutators.NewStmtCache(r.writer, 64), mutators.NewStmtCache(r.writer, 512)
	}
	if err != nil {
		return err
	}
	inner, err := (&sqlitedriver.SQLite{}).OpenConnector(dsn + "&_txlock=deferred")
	if err != nil {
		return err
	}
	r.rdb = sql.OpenDB(&readConnector{r: r, inner: inner})
	if r.opts.LocalName != "" {
		if _, err := r.writer.ExecContext(ctx, "PRAGMA "+r.opts.LocalName+".journal_mode=WAL"); err != nil {
			return fmt.Errorf("local database: %w", err)
		}
	}
	// Whatever the WAL held was dropped: settle what the server already
	// acknowledged, and replay the rest.
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	if err := r.settle(ctx); err != nil {
		return err
	}
	// The handles of the recovered mutations are made when asked for.
	defer r.publish()
	r.lastRebase.Store(time.Now().UnixNano())
	return r.replay(ctx)
}

// initConn prepares every SQLite connection to the replica: no checkpoint
// can start from it, its writes are vetted by role, and the local database is
// attached.
func (r *Replica) initConn(c *sqlite3.Conn, roleOf func() role, deny func(string)) error {
	if _, err := c.Config(sqlite3.DBCONFIG_NO_CKPT_ON_CLOSE, true); err != nil {
		return fmt.Errorf("no checkpoint on close: %w", err)
	}
	// The replica's WAL is never needed after a crash (Open drops it and
	// the queue replays it), so its commits need no fsync at any
	// durability: the queue and the apply journal carry the guarantees.
	if err := c.Exec("PRAGMA wal_autocheckpoint=0; PRAGMA main.synchronous=OFF"); err != nil {
		return err
	}
	if err := c.BusyTimeout(10 * time.Second); err != nil {
		return err
	}
	if r.opts.LocalName != "" {
		stmt, _, err := c.Prepare("ATTACH DATABASE ? AS " + quoteIdent(r.opts.LocalName))
		if err != nil {
			return err
		}
		// The local database is opened by the OS VFS, not ours: ours refuses
		// every write to the main file of what it opens.
		stmt.BindText(1, "file:"+(&url.URL{Path: r.opts.LocalPath}).EscapedPath()+"?vfs=os")
		err = stmt.Exec()
		stmt.Close()
		if err != nil {
			return fmt.Errorf("attach local database: %w", err)
		}
		sync := "NORMAL"
		if r.opts.Durability == Full {
			sync = "FULL"
		}
		if err := c.Exec("PRAGMA " + quoteIdent(r.opts.LocalName) + ".synchronous=" + sync); err != nil {
			return err
		}
	}
	// The local database checkpoints as usual; the replicated one never.
	c.WALHook(func(db *sqlite3.Conn, schema string, pages int) error {
		if schema == "main" {
			// Only the writer commits to the replicated database (the
			// authorizer refuses everyone else): what it leaves is ours.
			r.ownFrames.Store(uint32(pages))
		} else if pages >= 1000 {
			db.WALCheckpoint(schema, sqlite3.CHECKPOINT_PASSIVE)
		}
		return nil
	})
	return c.SetAuthorizer(func(action sqlite3.AuthorizerActionCode, name3, name4, schema, _ string) sqlite3.AuthorizerReturnCode {
		if action == sqlite3.AUTH_READ {
			r.live.noteRead(c, schema, name3) // what a live query reads
		}
		who := roleOf()
		why, ok := authorize(who, action, name3, name4, schema)
		if ok {
			return sqlite3.AUTH_OK
		}
		if deny != nil {
			deny(why)
		}
		if who == roleMutator {
			r.mutatorDenied.Store(&why)
		}
		return sqlite3.AUTH_DENY
	})
}

func quoteIdent(s string) string {
	out := []byte{'"'}
	for i := 0; i < len(s); i++ {
		if s[i] == '"' {
			out = append(out, '"')
		}
		out = append(out, s[i])
	}
	return string(append(out, '"'))
}

// DB returns the app's handle for reads (and for writes to the local
// database). Reads see the pending mutations, and never a rebase half done.
// Statements that would change replicated tables fail with ErrReadOnly.
func (r *Replica) DB() *sql.DB { return r.rdb }

// ClientID is this replica's identity towards the server.
func (r *Replica) ClientID() string { return r.queue.ClientID() }

// Status reports the replica's state. It never waits for a Mutate, a
// rebase or a reader: it reads what the latest of them published.
func (r *Replica) Status() Status {
	st := Status{ClientID: r.queue.ClientID(), Version: r.stVersion.Load(), Checksum: r.stChecksum.Load(), Pending: int(r.stPending.Load()),
		ForeignWrites: int(r.foreignWrites.Load())}
	r.netStatus(&st)
	return st
}

// Pending returns the pending mutations, oldest first. It never waits for a
// rebase (the queue's own lock is held only for its bookkeeping).
func (r *Replica) Pending() []Mutation {
	q, err := r.queue.Pending()
	if err != nil {
		r.log.Error("read pending mutations", "err", err)
	}
	out := make([]Mutation, len(q))
	for i, m := range q {
		out[i] = Mutation{ClientID: r.queue.ClientID(), ID: m.ID, Name: m.Name, Args: m.Args}
	}
	return out
}

// Mutation is a pending mutation as it is sent to the server.
type Mutation struct {
	ClientID string
	ID       uint64
	Name     string
	Args     json.RawMessage
}

// Handle returns the handle of a pending mutation (also of those recovered
// at Open), or nil if it is not pending.
func (r *Replica) Handle(id uint64) *Handle {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	if h := r.handles[id].Value(); h != nil {
		return h
	}
	name, ok := r.queue.name(id)
	if !ok {
		return nil
	}
	h := r.newHandle(id, name)
	r.handles[id] = weak.Make(h)
	return h
}

// Outcome says what became of this replica's mutation id, from the
// replicated state itself, so that it holds across Close, a crash and
// Open: nil if the server applied it, a *RejectedError if it rejected it,
// ErrPending while it waits for the server (Handle(id) follows it), and
// ErrUnknownMutation for an id this replica never issued. A handle that
// said ErrClosed (its mutation was settled, if at all, while the replica
// was closed, or by the repair at Open) and a mutation whose handle died
// with a crash are answered here: it was settled exactly once, and this is
// how.
func (r *Replica) Outcome(ctx context.Context, id uint64) error {
	if id == 0 || id >= r.queue.NextID() {
		return ErrUnknownMutation
	}
	// Settled, or pending: a rebase settles a mutation in the replicated
	// state before it drops it from the queue, so a mutation seen neither
	// pending nor settled was settled between the two looks: look again.
	for try := 0; try < 2; try++ {
		if _, pending := r.queue.name(id); pending {
			return ErrPending
		}
		db, cid := r.DB(), r.queue.ClientID()
		last, err := mutators.LastMutationID(ctx, db, cid)
		if err != nil {
			return fmt.Errorf("replica: outcome of mutation %d: %w", id, err)
		}
		if id > last {
			continue
		}
		name, msg, rejected, err := mutators.Rejection(ctx, db, cid, id)
		if err != nil {
			return fmt.Errorf("replica: outcome of mutation %d: %w", id, err)
		}
		if rejected {
			return &RejectedError{ID: id, Name: name, Message: msg}
		}
		return nil
	}
	// Issued, not pending, not in the state: the server forgot the client
	// (ClientTTL) after it settled the mutation.
	return ErrUnknownMutation
}

// liveHandle is the handle of a pending mutation if anyone holds it.
func (r *Replica) liveHandle(id uint64) *Handle {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	return r.handles[id].Value()
}

// OnChange calls fn after every change of the visible state: each Mutate and
// each rebase. fn runs on the goroutine that made the change, after it has
// finished and let go of the replica's locks, so it may call Status, read
// DB() or even Mutate; it should return quickly, since the sync loop waits
// for it. The returned func unsubscribes.
func (r *Replica) OnChange(fn func(Change)) (cancel func()) {
	r.watchMu.Lock()
	id := r.nextW
	r.nextW++
	r.watchers[id] = fn
	r.watchMu.Unlock()
	return func() {
		r.watchMu.Lock()
		delete(r.watchers, id)
		r.watchMu.Unlock()
	}
}

func (r *Replica) notify(c Change) {
	r.watchMu.Lock()
	fns := make([]func(Change), 0, len(r.watchers))
	for _, fn := range r.watchers {
		fns = append(fns, fn)
	}
	r.watchMu.Unlock()
	for _, fn := range fns {
		fn(c)
	}
}

// newHandle makes a mutation's handle, which also hears of a fatal sync
// error.
func (r *Replica) newHandle(id uint64, name string) *Handle {
	h := newHandle(id, name)
	h.fatal = r.fatal
	return h
}

func (r *Replica) crash(point string) {
	if r.opts.crashHook != nil {
		r.opts.crashHook(point)
	}
}

var (
	// ErrClosed is returned by a closed replica.
	ErrClosed = errors.New("replica: closed")
	// ErrReadersBusy is returned by a rebase that gave up waiting
	// (Options.ReaderWait) for DB() readers or the WAL locks; the error
	// says which connection was in the way and since when. Nothing
	// changed; the sync loop tries again later.
	ErrReadersBusy = errors.New("replica: readers keep the rebase out")
	// ErrPendingHidden is returned by DB() reads and Mutate after the
	// pending mutations could not be written again (a replay's COMMIT
	// failed twice): rather than show a state that lacks them, the replica
	// refuses until a rebase replays them (the sync loop's next, a Mutate's
	// repair, or Rebase(ctx) with no page sets).
	ErrPendingHidden = errors.New("replica: pending mutations could not be replayed")
	// ErrPending is Outcome's answer for a mutation the server has not
	// settled yet: Handle(id) follows it.
	ErrPending = errors.New("replica: the mutation is pending")
	// ErrUnknownMutation is Outcome's answer for an id this replica never
	// issued, or whose record the server no longer holds (it collects the
	// records of clients away longer than its ClientTTL).
	ErrUnknownMutation = errors.New("replica: no such mutation of this replica")
)

// engineError is a failure of the replica's own write (BEGIN, COMMIT, a
// savepoint, or the storage under a mutator), not of a mutator: the
// mutation's effect is missing because the write failed.
type engineError struct{ err error }

func (e *engineError) Error() string { return e.err.Error() }
func (e *engineError) Unwrap() error { return e.err }

// isEngineFailure says whether err is the replica's write failing rather
// than the mutator refusing.
func isEngineFailure(err error) bool {
	var ee *engineError
	return errors.As(err, &ee) || errors.Is(err, sqlite3.IOERR) || errors.Is(err, sqlite3.FULL) || errors.Is(err, sqlite3.CORRUPT) || errors.Is(err, sqlite3.CANTOPEN)
}

func (r *Replica) fail(point string) error {
	if r.opts.failHook != nil {
		return r.opts.failHook(point)
	}
	return nil
}

// hiddenErr is ErrPendingHidden with the failure behind it, or nil.
func (r *Replica) hiddenErr() error {
	if p := r.hidden.Load(); p != nil {
		return fmt.Errorf("%w: %w", ErrPendingHidden, *p)
	}
	return nil
}

// repair drops the WAL and replays every pending mutation: a rebase with no
// page sets. It keeps the lock order (the caller holds neither the gate nor
// writeMu).
func (r *Replica) repair(ctx context.Context) error {
	if err := r.rebase(ctx, context.WithoutCancel(ctx), func(ctx context.Context) error { return r.files.Rebase(ctx) }); err != nil {
		if r.hidden.Load() != nil {
			return fmt.Errorf("%w; repair failed: %w", ErrPendingHidden, err)
		}
		return fmt.Errorf("repair: %w", err)
	}
	return r.hiddenErr()
}

// Repair brings back a replica whose files a failed write left poisoned
// (vfs.ErrPoisoned: a full disk or an I/O error part-way through a rebase),
// as Open would, without a restart: the main file is brought to its
// journaled version, and the pending mutations are replayed on top. Until
// then reads and Mutate fail with an error that wraps vfs.ErrPoisoned (and
// says "no space left on device" if that was the cause). The sync loop
// calls it by itself, with backoff; on a sound replica it does nothing.
func (r *Replica) Repair(ctx context.Context) error {
	if r.files.Poisoned() == nil {
		return nil
	}
	err := r.rebase(ctx, context.WithoutCancel(ctx), func(ctx context.Context) error {
		if r.files.Poisoned() == nil {
			return nil // another repair came first
		}
		return r.files.Repair(ctx)
	})
	if err != nil {
		return fmt.Errorf("replica: %w", err)
	}
	r.repairSnap.Swap(nil).discard()
	r.log.Info("sqlrebase: repaired the replica's files", "version", r.files.Version())
	return nil
}

// Mutate records a mutation durably and runs it at once on the replica. It
// returns an error, and records nothing, only if the mutation cannot be
// queued: an unknown mutator, args that are not JSON, or an I/O error. If the
// mutator itself fails locally the mutation is still queued (the server
// decides) and the handle's LocalErr says why.
func (r *Replica) Mutate(ctx context.Context, name string, args json.RawMessage) (*Handle, error) {
	if r.closed.Load() {
		return nil, ErrClosed
	}
	if err := r.opts.Mutators.Check(name, args); err != nil {
		return nil, err
	}
	if r.files.Poisoned() != nil {
		// Never write on top of torn files: repair them first.
		if err := r.Repair(ctx); err != nil {
			return nil, fmt.Errorf("mutate %s: %w", name, err)
		}
	}
	if r.hidden.Load() != nil {
		// Never write on top of a state that lacks pending mutations.
		if err := r.repair(ctx); err != nil {
			return nil, fmt.Errorf("mutate %s: %w", name, err)
		}
	}
	if err := r.writeMu.LockContext(ctx); err != nil {
		return nil, fmt.Errorf("mutate %s: wait for the writer: %w", name, err)
	}
	if r.foreignFrames(false) {
		// Never build on another process's write: drop it (a rebase with
		// no versions replays the queue, and counts it), then go on.
		r.writeMu.Unlock()
		if err := r.Rebase(ctx); err != nil {
			return nil, fmt.Errorf("mutate %s: drop another process's write: %w", name, err)
		}
		if err := r.writeMu.LockContext(ctx); err != nil {
			return nil, fmt.Errorf("mutate %s: wait for the writer: %w", name, err)
		}
	}
	id := r.queue.NextID()
	r.crash("mutate-before-queue")
	if err := r.queue.Append(queuedMutation{ID: id, Name: name, Args: args}); err != nil {
		r.writeMu.Unlock()
		return nil, fmt.Errorf("queue mutation: %w", err)
	}
	r.crash("mutate-after-queue")
	h := r.newHandle(id, name)
	r.hmu.Lock()
	r.handles[id] = weak.Make(h)
	r.hmu.Unlock()
	m := queuedMutation{ID: id, Name: name, Args: args}
	err := r.runOne(ctx, m, true)
	if isEngineFailure(err) {
		// Queued but not written: try once more, else hide the state
		// until a rebase writes it again.
		if err = r.runOne(ctx, m, true); isEngineFailure(err) {
			r.hidden.Store(&err)
		}
	}
	h.setLocalErr(err)
	r.crash("mutate-after-run")
	r.publish()
	change := Change{Version: r.files.Version(), Pending: r.queue.Len()}
	r.live.takeMutate(&change)
	r.writeMu.Unlock()
	r.notify(change)
	// Tell the sync loop there is something to push; never wait for it.
	r.net.kick()
	return h, nil
}

// foreignFrames reports whether the WAL holds frames the writer did not
// commit: another process (the sqlite3 shell, a tool) wrote to the
// replicated database behind the replica's back, which no lock can refuse (a
// WAL writer takes the locks our own writer takes). count says to count and
// log the finding, as the rebase that drops the frames does. writeMu is held.
func (r *Replica) foreignFrames(count bool) bool {
	n, err := r.files.WALFrames()
	return err == nil && r.foreignIn(n, count)
}

// foreignIn is foreignFrames for a wal-index that counts n frames.
func (r *Replica) foreignIn(n uint32, count bool) bool {
	if n == r.ownFrames.Load() {
		return false
	}
	if count {
		r.foreignWrites.Add(1)
		r.log.Error("sqlrebase: another process wrote to the replica's database; its write is dropped (replicated data changes only through mutators)",
			"path", r.path, "frames", n, "own", r.ownFrames.Load())
	}
	return true
}

// savepointName is the savepoint each replayed mutation runs in.
const savepointName = mutators.ReservedPrefix + "mutation"

// runOne runs one mutator: alone, in a transaction of its own (an error
// rolls it back); in a replay, in a savepoint of the replay's transaction (an
// error rolls back the savepoint). The mutator's error is returned.
func (r *Replica) runOne(ctx context.Context, m queuedMutation, alone bool) error {
	// The savepoint has the reserved prefix, as the server's has, so that
	// the mutator contract forbids a mutator to release or roll it back.
	begin, undo, done := "SAVEPOINT "+savepointName, "ROLLBACK TO "+savepointName+"; RELEASE "+savepointName, "RELEASE "+savepointName
	if alone {
		begin, undo, done = "BEGIN IMMEDIATE", "ROLLBACK", "COMMIT"
	}
	if _, err := r.engineQ.ExecContext(ctx, begin); err != nil {
		return &engineError{fmt.Errorf("%s: %w", begin, err)}
	}
	err := r.runMutator(ctx, m)
	if err != nil {
		if _, rerr := r.writer.ExecContext(context.WithoutCancel(ctx), undo); rerr != nil {
			return errors.Join(err, rerr)
		}
		return err
	}
	err = nil
	if alone {
		err = r.fail("commit")
	}
	if err == nil {
		_, err = r.engineQ.ExecContext(ctx, done)
	}
	if err != nil {
		r.writer.ExecContext(context.WithoutCancel(ctx), undo)
		return &engineError{fmt.Errorf("%s: %w", done, err)}
	}
	return nil
}

// runMutator runs m's mutator on the writer under the mutator role, in
// whatever transaction or savepoint the caller opened. The mutator's error
// is returned, saying why if the authorizer refused it something.
func (r *Replica) runMutator(ctx context.Context, m queuedMutation) error {
	r.role.Store(int32(roleMutator))
	r.mutatorDenied.Store(nil)
	mctx := mutators.WithCaller(ctx, r.caller)
	err := r.opts.Mutators.Run(mctx, mutators.NewTx(mctx, r.mutatorQ), m.Name, m.Args)
	r.role.Store(int32(roleEngine))
	if why := r.mutatorDenied.Swap(nil); why != nil && err != nil {
		err = fmt.Errorf("%w: %s (%v)", ErrForbidden, *why, err)
	}
	return err
}

// Rebase drops the pending state, applies the server's page sets in order,
// settles the mutations the server acknowledged or rejected, and replays the
// rest in one transaction. Readers of DB() see the state before or after,
// never between. If the page sets do not check out (version gap, checksum or
// page size mismatch, corrupt), it returns the error and changes nothing.
func (r *Replica) Rebase(ctx context.Context, sets ...*wal.PageSet) error {
	return r.rebase(ctx, ctx, func(ctx context.Context) error {
		if err := r.files.Rebase(ctx, sets...); err != nil {
			return err // refused sets changed nothing; a failed apply invalidates every live query
		}
		r.live.notePages(sets)
		return nil
	})
}

// rebase runs one rebase whose drop-and-apply step is apply (the server's
// page sets, or a snapshot image): it closes the gate, then takes the writer
// lock (the lock order), and notifies watchers after letting go of both, so
// that a watcher may call Status or Mutate. waitCtx bounds the waits (for
// readers, the writer and the WAL locks; Options.ReaderWait too); applyCtx
// the rest, which must not stop between the drop and the replay.
func (r *Replica) rebase(waitCtx, applyCtx context.Context, apply func(context.Context) error) error {
	if r.closed.Load() {
		return ErrClosed
	}
	// Bad page sets are refused inside files.Rebase before anything is
	// dropped, so the pending state survives them; checking here too would
	// merge and checksum every set twice on the rebase path.
	if err := r.gate.close(waitCtx, gatePatience, r.readerWait()); err != nil {
		return fmt.Errorf("rebase: wait for readers: %w", err)
	}
	if err := r.writeMu.LockContext(waitCtx); err != nil {
		r.gate.open()
		return fmt.Errorf("rebase: wait for the writer: %w", err)
	}
	held := time.Now()
	change, err := r.rebaseApplying(waitCtx, applyCtx, apply)
	r.writeMu.Unlock()
	if err == nil {
		r.stats.rebaseDone(time.Since(held))
	}
	r.gate.open()
	if err != nil {
		return err
	}
	r.notify(change)
	return nil
}

// rebaseApplying is a rebase whose drop-and-apply step is apply: the
// server's page sets (files.Rebase), or a snapshot image
// (files.InstallSnapshot). The gate is closed and writeMu held.
func (r *Replica) rebaseApplying(waitCtx, applyCtx context.Context, apply func(context.Context) error) (Change, error) {
	// The only wait inside apply is for the wal-index locks, before
	// anything is dropped: bound it like the wait for readers. With the
	// gate closed only a Raw() connection can hold them.
	lockCtx, cancel := context.WithTimeout(waitCtx, r.readerWait())
	defer cancel()
	err := r.rebaseClosed(applyCtx, func(context.Context) error {
		err := apply(lockCtx)
		if err != nil && lockCtx.Err() == context.DeadlineExceeded && waitCtx.Err() == nil {
			err = fmt.Errorf("%w: the WAL locks stayed taken for %s with every DB() connection out (a Raw() connection in a transaction?): %w", ErrReadersBusy, r.readerWait(), err)
		}
		return err
	})
	r.publish()
	r.lastRebase.Store(time.Now().UnixNano())
	change := Change{Version: r.files.Version(), Pending: r.queue.Len(), Rebased: true}
	r.liveRebased(&change, err)
	if err != nil {
		return Change{}, fmt.Errorf("rebase to version %d: %w", r.files.Version(), err)
	}
	return change, nil
}

func (r *Replica) rebaseClosed(ctx context.Context, apply func(context.Context) error) error {
	// A poisoned replica's files may be torn and SQLite is locked out: only
	// a repair (apply is then files.Repair) may run, and every connection's
	// schema is reloaded after it.
	poisoned := r.files.Poisoned()
	var mainBefore, optBefore uint32
	if poisoned == nil {
		var err error
		if mainBefore, err = r.files.SchemaCookie(); err != nil {
			return err
		}
		// The cookie the connections see: the main file's unless pending
		// frames in the WAL hold page 1. One read of the wal-index also
		// says whether another process appended frames: counted and
		// logged; the apply drops them.
		var frames uint32
		if optBefore, frames, err = r.optimisticCookie(ctx); err != nil {
			return err
		}
		r.foreignIn(frames, true)
	}
	r.crash("rebase-before-apply")
	if err := apply(ctx); err != nil {
		return err
	}
	r.ownFrames.Store(0) // the WAL is empty now
	r.crash("rebase-after-apply")
	mainAfter, err := r.files.SchemaCookie()
	if err != nil {
		return err
	}
	// The schema-cookie ABA fix: if the cookie moved at all, a connection's
	// cached schema may belong to a state the cookie no longer tells apart.
	// Reload it everywhere before the next statement, the replay's included.
	if poisoned != nil || optBefore != mainBefore || mainBefore != mainAfter {
		if err := r.resetSchema(ctx); err != nil {
			return err
		}
	}
	// A failed settle still replays what the server has not acknowledged
	// (invariant 2: no reader sees a state without a pending mutation);
	// then the rebase reports the failure.
	serr := r.settle(ctx)
	if err := r.replay(ctx); err != nil {
		return errors.Join(serr, err)
	}
	if serr != nil {
		return serr
	}
	optAfter, _, err := r.optimisticCookie(ctx)
	if err != nil {
		return err
	}
	if optAfter != mainAfter {
		r.schemaEpoch.Add(1)
	}
	return nil
}

// optimisticCookie is the schema cookie the connections see, and the
// frames the wal-index counts. vfs reads both from the files (the newest
// copy of page 1 in the WAL, else the main file) without a read
// transaction; should that fail (a wal-index header torn by another
// process's write), SQLite is asked, and the frames are taken to be ours.
func (r *Replica) optimisticCookie(ctx context.Context) (cookie, frames uint32, err error) {
	v, verr := r.files.View()
	if verr == nil {
		return v.Cookie, v.Frames, nil
	}
	if r.files.Poisoned() != nil {
		return 0, 0, verr
	}
	if err := r.engineQ.QueryRowContext(ctx, "PRAGMA schema_version").Scan(&cookie); err != nil {
		return 0, 0, fmt.Errorf("read schema cookie: %w", errors.Join(verr, err))
	}
	return cookie, r.ownFrames.Load(), nil
}

func (r *Replica) resetSchema(ctx context.Context) error {
	if _, err := r.writer.ExecContext(ctx, "PRAGMA writable_schema=RESET"); err != nil {
		return fmt.Errorf("reload schema: %w", err)
	}
	r.schemaEpoch.Add(1)
	return nil
}

// settle reads this client's acknowledgement and rejections from the
// confirmed state (the WAL is empty now), settles those handles and drops
// their mutations from the queue.
func (r *Replica) settle(ctx context.Context) error {
	if r.queue.Len() == 0 && len(r.handles) == 0 {
		// Nothing to settle: skip the query (a third of a rebase with
		// nothing pending). r.lmid may lag meanwhile; the next settle reads
		// the rejections from where it stands, which is only a wider range.
		return nil
	}
	id := r.queue.ClientID()
	lmid, rejected, err := mutators.Settlement(ctx, r.engineQ, id, r.lmid)
	if err != nil {
		return fmt.Errorf("read acknowledgements: %w", err)
	}
	if lmid < r.lmid {
		return fmt.Errorf("server acknowledged mutation %d after %d: acknowledgements went back", lmid, r.lmid)
	}
	r.ackRead = lmid
	if lmid == r.lmid {
		return nil
	}
	// The queue first: if its write fails, nothing in memory moved (the
	// handles stay pending, r.lmid stays), so the next settle tries again
	// from the same place. Once the queue has recorded it (even if a later
	// step of its compaction failed), memory follows.
	r.crash("settle-before-queue")
	qerr := r.queue.Settle(lmid)
	if r.queue.settled() < lmid {
		return fmt.Errorf("settle queue: %w", qerr)
	}
	// Status first: whoever a settled handle wakes sees a Status at
	// least as new (the version and checksum are the applied ones).
	r.publish()
	r.hmu.Lock()
	for mid, wp := range r.handles {
		if mid > lmid {
			continue
		}
		if h := wp.Value(); h == nil {
			// Dropped by the app: nobody to tell.
		} else if msg, ok := rejected[mid]; ok {
			h.settle(&RejectedError{ID: mid, Name: h.Name, Message: msg})
		} else {
			h.settle(nil)
		}
		r.live.noteSettled(mid, rejected, wp.Value())
		delete(r.handles, mid)
	}
	r.hmu.Unlock()
	r.lmid = lmid
	if qerr != nil {
		return fmt.Errorf("settle queue: %w", qerr)
	}
	return nil
}

// replay runs every pending mutation again, in one write transaction with a
// savepoint each: committing them one by one would cost a commit each.
//
// If the replay cannot be written (an I/O error at COMMIT), it is tried once
// more; if that fails too, DB() reads and Mutate fail with ErrPendingHidden
// until a later replay succeeds: no reader sees a state that lacks a
// pending mutation (invariant 2).
func (r *Replica) replay(ctx context.Context) error {
	err := r.replayOnce(ctx)
	if err != nil {
		r.log.Warn("replay failed; trying again", "err", err)
		err = r.replayOnce(ctx)
	}
	if err != nil {
		r.hidden.Store(&err)
		return err
	}
	r.hidden.Store(nil)
	return nil
}

func (r *Replica) replayOnce(ctx context.Context) error {
	pending, err := r.queue.Pending()
	if err != nil {
		return &engineError{err}
	}
	for len(pending) > 0 && pending[0].ID <= r.ackRead {
		pending = pending[1:]
	}
	r.replayed.Add(uint64(len(pending)))
	if len(pending) == 0 {
		return nil
	}
	if len(pending) == 1 {
		// One mutation needs no savepoint: its own transaction is the
		// unit that a failure rolls back (two statements fewer).
		m := pending[0]
		err := r.runOne(ctx, m, true)
		if isEngineFailure(err) {
			return fmt.Errorf("replay mutation %d: %w", m.ID, err)
		}
		if h := r.liveHandle(m.ID); h != nil {
			h.setLocalErr(err)
		}
		r.crash("replay-middle")
		return nil
	}
	if done, err := r.replayBare(ctx, pending); err != nil || done {
		return err
	}
	if _, err := r.engineQ.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fmt.Errorf("replay: begin: %w", err)
	}
	for i, m := range pending {
		err := r.runOne(ctx, m, false)
		if isEngineFailure(err) {
			r.writer.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			return fmt.Errorf("replay mutation %d: %w", m.ID, err)
		}
		if h := r.liveHandle(m.ID); h != nil {
			h.setLocalErr(err)
		}
		if i == len(pending)/2 {
			r.crash("replay-middle")
		}
	}
	return r.commitReplay(ctx)
}

// commitReplay commits the replay's transaction, or rolls it back and says
// why (the crash hook "commit" fires first, for the crash tests).
func (r *Replica) commitReplay(ctx context.Context) error {
	err := r.fail("commit")
	if err == nil {
		_, err = r.engineQ.ExecContext(ctx, "COMMIT")
	}
	if err != nil {
		r.writer.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
		return fmt.Errorf("replay: commit: %w", err)
	}
	return nil
}

// replayBare replays pending in one transaction without a savepoint per
// mutation: SAVEPOINT and RELEASE were a sixth of a deep replay (pprof at
// 1,000 pending), and a savepoint matters only when a mutator fails. If one
// fails, the transaction is rolled back and done is false: the caller
// replays again with a savepoint each, so that the failed mutator's partial
// effects go and the others' stay. Mutators are deterministic (the server
// runs them again too), so the second pass fails the same one. An engine
// failure is returned as such.
func (r *Replica) replayBare(ctx context.Context, pending []queuedMutation) (done bool, err error) {
	if _, err := r.engineQ.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return false, fmt.Errorf("replay: begin: %w", err)
	}
	for i, m := range pending {
		if err := r.runMutator(ctx, m); err != nil {
			r.writer.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			if isEngineFailure(err) {
				return false, fmt.Errorf("replay mutation %d: %w", m.ID, err)
			}
			return false, nil
		}
		if i == len(pending)/2 {
			r.crash("replay-middle")
		}
	}
	if err := r.commitReplay(ctx); err != nil {
		return false, err
	}
	for _, m := range pending {
		if h := r.liveHandle(m.ID); h != nil {
			h.setLocalErr(nil)
		}
	}
	return true, nil
}

// quarantine moves a diverged replica's database files (not its queue)
// aside, under a name with the time, and returns that name.
func quarantine(path string) (string, error) {
	aside := fmt.Sprintf("%s.diverged-%s", path, time.Now().UTC().Format("20060102T150405.000000000"))
	for _, suffix := range []string{"", "-wal", "-shm", "-apply0", "-apply1"} {
		if err := os.Rename(path+suffix, aside+suffix); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("set the diverged database aside: %w", err)
		}
	}
	return aside, nil
}

// Close closes the replica. Pending mutations stay queued for the next Open.
func (r *Replica) Close() error {
	if r.closed.Swap(true) {
		return nil
	}
	// Stop the sync loop before taking the writer: it may be in a rebase.
	r.stopSync()
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	var errs []error
	if r.rdb != nil {
		errs = append(errs, r.rdb.Close())
	}
	if r.engineQ != nil {
		errs = append(errs, r.engineQ.Close(), r.mutatorQ.Close())
	}
	if r.dec != nil {
		r.dec.Close()
	}
	if r.writer != nil {
		errs = append(errs, r.writer.Close())
	}
	if r.wdb != nil {
		errs = append(errs, r.wdb.Close())
	}
	if r.files != nil {
		errs = append(errs, r.files.Close())
	}
	r.repairSnap.Swap(nil).discard()
	if r.queue != nil {
		errs = append(errs, r.queue.Close())
	}
	for _, wp := range r.handles {
		if h := wp.Value(); h != nil {
			h.settle(ErrClosed)
		}
	}
	return errors.Join(errs...)
}
