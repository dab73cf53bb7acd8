// Package mutators defines the contract between an application and
// sqlrebase: the only way an app changes replicated data is by running a
// named mutator.
//
// A mutator runs twice: at once on the client replica (optimistically, so the
// UI sees its effect without a round trip), and later, authoritatively, on
// the server, where all clients' mutations are applied in one global order.
// When the server's result arrives, the client rolls back its optimistic
// effects and re-runs its still-pending mutators on top of the new state
// ("rebase"). For the two runs to agree, a mutator must obey these rules:
//
//   - Deterministic: its effect depends only on the database state it reads
//     through tx and on args. No clock, no randomness, no environment, files,
//     network or package-level state. Ids and timestamps the app needs are
//     chosen by the caller and passed in args.
//   - Inside the caller's transaction: the caller (replica or server) has
//     already begun the transaction and decides whether it commits. A mutator
//     must not issue BEGIN, COMMIT, END or ROLLBACK (of the transaction). It
//     may use SAVEPOINT / RELEASE / ROLLBACK TO of its own savepoints to undo
//     part of its work.
//   - Hands off the reserved tables (names starting with [ReservedPrefix]):
//     they carry the server's acknowledgements inside the replicated
//     database.
//   - Returning an error rejects the mutation: the caller rolls back all of
//     its effects. On the server the rejection is recorded for the client;
//     it is not retried.
//   - Quick: the server runs mutators one at a time, so it gives each a
//     time limit (server.Config.MutatorTimeout, 5 s by default). Past it
//     the mutator's SQLite statements are interrupted and the mutation is
//     rejected with "time limit exceeded". Go code that spins without
//     calling tx cannot be interrupted; it is rejected when it returns.
//
// Both the replica and the server enforce the rules that SQLite can see
// (transaction control, reserved tables, ATTACH, writes outside the
// replicated database, pragmas that change the file) with the same
// authorizer policy, [Authorize]: a statement that breaks them fails, and
// the server rejects the mutation naming the statement.
//
// Every run knows who called it: [CallerFrom] on the mutator's context
// gives the client id, the user and the token's claims. On the server they
// are the identity its authenticator established for the session that
// pushed the mutation (each mutation of a batch sees its own); on a replica,
// the identity the app configured for its local user (replica.Options.User
// and Claims). Take the user from the caller, never from args, to enforce a
// permission. Where the two differ, the server's run wins: a mutation it
// rejects ("not your row") is rolled back on the replica, and the server's
// effects are what every replica rebases onto.
//
// Args are JSON, validated by [Registry.Check] before anything runs: at most
// [MaxArgsSize] bytes of valid JSON (an empty value is not JSON; pass "null"
// or "{}" for a mutator without arguments).
//
// A short example:
//
//	r := mutators.NewRegistry()
//	r.MustRegister("addTodo", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
//		var a struct {
//			ID    string `json:"id"`
//			Title string `json:"title"`
//		}
//		if err := json.Unmarshal(args, &a); err != nil {
//			return err
//		}
//		_, err := tx.Exec(`INSERT INTO todos(id, title) VALUES (?, ?)`, a.ID, a.Title)
//		return err
//	})
package mutators

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
)

// Tx is what a mutator sees: statements on the database inside the
// transaction the caller opened. It follows database/sql: Exec, Query and
// QueryRow run under the mutation's context, bound once by [NewTx], so that
// mutator code reads like plain database/sql code and cannot outlive the
// mutation; the Context methods make a Tx the DBTX that sqlc-generated code
// (and most query helpers) take.
type Tx interface {
	Exec(query string, args ...any) (sql.Result, error)
	Query(query string, args ...any) (*sql.Rows, error)
	QueryRow(query string, args ...any) *sql.Row

	// ExecContext, QueryContext, QueryRowContext and PrepareContext run
	// under the mutation's context too, which carries the caller's
	// cancellation and the server's time limit: a statement of a mutator
	// cannot escape them with a context of its own. A ctx that is already
	// done fails the statement with its error.
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	PrepareContext(ctx context.Context, query string) (*sql.Stmt, error)
}

// Querier is the part of database/sql a [Tx] and the reserved-table helpers
// need. It is satisfied by *sql.Conn, *sql.Tx and *sql.DB.
type Querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// preparer is a Querier that can also prepare statements, as *sql.Conn,
// *sql.Tx and [StmtCache] can.
type preparer interface {
	PrepareContext(ctx context.Context, query string) (*sql.Stmt, error)
}

// NewTx binds q to ctx. q is normally a *sql.Conn on which the caller has
// issued BEGIN, or a *sql.Tx; the caller keeps control of commit and
// rollback.
func NewTx(ctx context.Context, q Querier) Tx {
	return boundTx{ctx: ctx, q: q}
}

type boundTx struct {
	ctx context.Context
	q   Querier
}

func (t boundTx) Exec(query string, args ...any) (sql.Result, error) {
	return t.q.ExecContext(t.ctx, query, args...)
}

func (t boundTx) Query(query string, args ...any) (*sql.Rows, error) {
	return t.q.QueryContext(t.ctx, query, args...)
}

func (t boundTx) QueryRow(query string, args ...any) *sql.Row {
	return t.q.QueryRowContext(t.ctx, query, args...)
}

func (t boundTx) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return t.q.ExecContext(t.ctx, query, args...)
}

func (t boundTx) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return t.q.QueryContext(t.ctx, query, args...)
}

func (t boundTx) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if ctx.Err() != nil {
		// database/sql's Row then carries ctx's error to Scan.
		return t.q.QueryRowContext(ctx, query, args...)
	}
	return t.q.QueryRowContext(t.ctx, query, args...)
}

func (t boundTx) PrepareContext(ctx context.Context, query string) (*sql.Stmt, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, ok := t.q.(preparer)
	if !ok {
		return nil, fmt.Errorf("mutators: %T cannot prepare statements", t.q)
	}
	return p.PrepareContext(t.ctx, query)
}

// Func is a mutator. See the package documentation for the rules it must
// follow (determinism, no transaction control, no reserved tables).
type Func func(ctx context.Context, tx Tx, args json.RawMessage) error

// ErrUnknownMutator is returned (wrapped with the name) for a name that is
// not registered. On the server this means the client runs a different app
// version; the mutation is rejected rather than retried.
var ErrUnknownMutator = errors.New("mutators: unknown mutator")

// ErrInvalidArgs is returned (wrapped with details) for args that are not
// valid JSON or are larger than [MaxArgsSize].
var ErrInvalidArgs = errors.New("mutators: args are not valid JSON")

// ErrInvalidName is returned (wrapped with the name) by [Registry.Register]
// and [Registry.Check] for a name outside the allowed alphabet or length.
var ErrInvalidName = errors.New("mutators: invalid mutator name")

// Limits on what crosses the wire and sits in the pending queue; they keep
// a hostile or buggy client from making the server or a replica allocate
// without bound.
const (
	// MaxNameLen is the maximum length of a mutator name in bytes. Names are
	// 1..MaxNameLen bytes of [A-Za-z0-9_.:-].
	MaxNameLen = 128
	// MaxArgsSize is the maximum size of a mutation's JSON args in bytes.
	MaxArgsSize = 1 << 20
)

// ValidName reports whether name is an acceptable mutator name:
// 1..[MaxNameLen] bytes of [A-Za-z0-9_.:-].
func ValidName(name string) bool {
	if len(name) == 0 || len(name) > MaxNameLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '_', c == '.', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

// CheckArgs validates args on their own: valid JSON of at most
// [MaxArgsSize] bytes. Errors wrap [ErrInvalidArgs].
func CheckArgs(args json.RawMessage) error {
	if len(args) > MaxArgsSize {
		return fmt.Errorf("%w: %d bytes exceeds the limit of %d", ErrInvalidArgs, len(args), MaxArgsSize)
	}
	if !validJSON(args) {
		return ErrInvalidArgs
	}
	return nil
}

// Registry maps names to mutators. The client and the server each build one
// with the same registrations. All methods are safe for concurrent use;
// the usual pattern is to register everything at start-up and only look up
// afterwards.
type Registry struct {
	mu      sync.RWMutex
	entries map[string]entry
}

// entry is one registration: the mutator, and for a typed one the check
// that its args decode into its argument type.
type entry struct {
	fn    Func
	check func(json.RawMessage) error
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{entries: make(map[string]entry)}
}

// Register adds fn under name. It fails on an invalid name, a nil fn or a
// name that is already registered: silently replacing a mutator would let
// client and server disagree about what a name means.
func (r *Registry) Register(name string, fn Func) error {
	if fn == nil {
		return fmt.Errorf("mutators: register %q: nil func", name)
	}
	return r.register(name, fn, nil)
}

func (r *Registry) register(name string, fn Func, check func(json.RawMessage) error) error {
	if !ValidName(name) {
		return fmt.Errorf("%w: %q", ErrInvalidName, truncName(name))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.entries[name]; dup {
		return fmt.Errorf("mutators: register %q: already registered", name)
	}
	r.entries[name] = entry{fn: fn, check: check}
	return nil
}

// MustRegister is like [Registry.Register] but panics on error. It is meant
// only for init-time wiring with literal names, where an error is a
// programming mistake; never call it with names from input.
func (r *Registry) MustRegister(name string, fn Func) {
	if err := r.Register(name, fn); err != nil {
		panic(err)
	}
}

// Lookup returns the mutator registered under name, or an error wrapping
// [ErrUnknownMutator].
func (r *Registry) Lookup(name string) (Func, error) {
	e, err := r.lookup(name)
	return e.fn, err
}

func (r *Registry) lookup(name string) (entry, error) {
	r.mu.RLock()
	e, ok := r.entries[name]
	r.mu.RUnlock()
	if !ok {
		return entry{}, fmt.Errorf("%w: %q", ErrUnknownMutator, name)
	}
	return e, nil
}

// Names returns the registered names in sorted order.
func (r *Registry) Names() []string {
	r.mu.RLock()
	names := make([]string, 0, len(r.entries))
	for n := range r.entries {
		names = append(names, n)
	}
	r.mu.RUnlock()
	sort.Strings(names)
	return names
}

// Check validates name and args without running anything, so a replica can
// refuse a bad mutation before queueing it and the server can reject one
// before opening a transaction. Errors wrap [ErrInvalidName],
// [ErrUnknownMutator], [ErrInvalidArgs] or, for a typed mutator (see
// [Register]), [ErrArgsMismatch].
func (r *Registry) Check(name string, args json.RawMessage) error {
	e, err := r.checkShape(name, args)
	if err != nil {
		return err
	}
	if e.check != nil {
		if err := e.check(args); err != nil {
			return fmt.Errorf("mutator %s: %w", name, err)
		}
	}
	return nil
}

// checkShape is Check without a typed mutator's decoding (which running it
// does anyway): the name, the registration and the JSON.
func (r *Registry) checkShape(name string, args json.RawMessage) (entry, error) {
	if !ValidName(name) {
		return entry{}, fmt.Errorf("%w: %q", ErrInvalidName, truncName(name))
	}
	e, err := r.lookup(name)
	if err != nil {
		return entry{}, err
	}
	if err := CheckArgs(args); err != nil {
		return entry{}, fmt.Errorf("mutator %s: %w", name, err)
	}
	return e, nil
}

// Run checks name and args, then calls the mutator inside tx. A failure of
// the mutator itself (its returned error, or a panic, which is recovered so
// that args from the network cannot crash a server) is returned as *[Error],
// and so are args that do not fit a typed mutator's argument type (the
// mutation is well-formed, so on the server that is a rejection); other
// validation failures are returned as from [Registry.Check]. It also looks
// the mutator up once, not twice as Check then Lookup would.
func (r *Registry) Run(ctx context.Context, tx Tx, name string, args json.RawMessage) (err error) {
	e, err := r.checkShape(name, args)
	if err != nil {
		return err
	}
	fn := e.fn
	defer func() {
		if p := recover(); p != nil {
			err = &Error{Name: name, Err: fmt.Errorf("%w: %v", ErrPanic, p)}
		}
	}()
	if err := fn(ctx, tx, args); err != nil {
		return &Error{Name: name, Err: err}
	}
	return nil
}

// ErrPanic is wrapped in the *[Error] that [Registry.Run] returns when a
// mutator panics.
var ErrPanic = errors.New("panic")

// Error is a mutator's own failure, as opposed to an unknown name or bad
// args: the mutation was well-formed but the app's logic refused it.
type Error struct {
	// Name is the mutator's name.
	Name string
	// Err is what the mutator returned.
	Err error
}

// Error returns "mutator <name>: <err>".
func (e *Error) Error() string {
	return "mutator " + e.Name + ": " + e.Err.Error()
}

// Unwrap returns the mutator's own error.
func (e *Error) Unwrap() error { return e.Err }

// truncName keeps error messages bounded when the name comes from input.
func truncName(name string) string {
	if len(name) > MaxNameLen+3 {
		return name[:MaxNameLen] + "..."
	}
	return name
}
