// Package driver registers sqlrebase as a database/sql driver named
// "sqlrebase", so that code which takes a DSN or a *sql.DB (migration tools
// for the local database, sqlc-generated readers, an ORM's reads) works on a
// replica:
//
//	import _ "github.com/sqlrebase/sqlrebase/driver"
//
//	driver.RegisterMutators("default", reg) // once, at start-up
//	db, err := sql.Open("sqlrebase", "file:app.db?server=host:7878&db=demo&fingerprint=sha256:…")
//
// The DSN's parameters are those of [Config]; the credential comes from the
// environment (SQLREBASE_CREDENTIAL, or the variable credential_env= names)
// or from a source registered with [RegisterCredential] (asked on every
// connect, so that tokens that expire are renewed), never from the DSN.
//
// Every sql.Open of one path in a process shares one [replica.Replica] (a
// replica's files have one owner); the last *sql.DB of a path to be closed
// closes it. Connections of the *sql.DB read as DB() does: they see pending
// mutations, never a rebase half done, and may write only a local-only
// attached database. Replicated data changes through mutators, which such
// code can run with the SQL function
//
//	SELECT sqlrebase_mutate('addTodo', '{"id":"t1","title":"milk"}')
//
// It returns the mutation's id, or fails (and queues nothing) for an
// unknown mutator or args that are not valid for it. [Replica] returns the
// replica itself, for Status, Sync and Handle.
package driver

import (
	"context"
	"database/sql"
	sqldriver "database/sql/driver"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	sqlite3 "github.com/ncruces/go-sqlite3"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

// Name is the name the driver is registered under with database/sql.
const Name = "sqlrebase"

// MutateFunction is the SQL function that runs a mutation.
const MutateFunction = "sqlrebase_mutate"

// mutateTimeout bounds a sqlrebase_mutate call whose statement has no
// deadline of its own: Mutate only waits for the writer, never the network.
const mutateTimeout = 30 * time.Second

// Errors a caller may branch on.
var (
	// ErrUnknownRegistry: the DSN's mutators= names no registry.
	ErrUnknownRegistry = errors.New("sqlrebase driver: no mutator registry registered under that name")
	// ErrNoCredential: a DSN with a server whose credential is nowhere.
	ErrNoCredential = errors.New("sqlrebase driver: no credential for the server")
	// ErrConflict: a second sql.Open of a path already open in this process
	// with other settings; one replica cannot be two.
	ErrConflict = errors.New("sqlrebase driver: the path is open with other settings")
)

func init() { sql.Register(Name, Driver{}) }

// The driver's registrations and the replicas it shares, by path. This is
// the process-wide state that registering a database/sql driver implies.
var (
	mu          sync.Mutex
	registries  = map[string]*mutators.Registry{}
	credentials = map[string]func(context.Context) (string, error){}
	replicas    = map[string]*shared{}
)

// RegisterMutators makes reg the registry that DSNs with mutators=name use
// ("default" when they name none). It fails if name is taken.
func RegisterMutators(name string, reg *mutators.Registry) error {
	if name == "" || reg == nil {
		return errors.New("sqlrebase driver: RegisterMutators needs a name and a registry")
	}
	mu.Lock()
	defer mu.Unlock()
	if _, ok := registries[name]; ok {
		return fmt.Errorf("sqlrebase driver: a mutator registry is already registered as %q", name)
	}
	registries[name] = reg
	return nil
}

// RegisterCredential makes fn the credential source that DSNs with
// credential=name use. It is the replica's token source
// (replica.Remote.Token): called before every connection to the server, not
// once, so that a token that expires is replaced by a fresh one. An error
// it returns is retried with backoff (the replica's Status shows it),
// unless it wraps replica.ErrNoToken, which stops sync.
func RegisterCredential(name string, fn func(context.Context) (string, error)) error {
	if name == "" || fn == nil {
		return errors.New("sqlrebase driver: RegisterCredential needs a name and a func")
	}
	mu.Lock()
	defer mu.Unlock()
	if _, ok := credentials[name]; ok {
		return fmt.Errorf("sqlrebase driver: a credential source is already registered as %q", name)
	}
	credentials[name] = fn
	return nil
}

// Replica returns the replica that sql.Open of dsn (or of the same path)
// opened in this process, or false if none is open.
func Replica(dsn string) (*replica.Replica, bool) {
	cfg, err := ParseDSN(dsn)
	if err != nil {
		return nil, false
	}
	mu.Lock()
	defer mu.Unlock()
	sh, ok := replicas[cfg.Path]
	if !ok {
		return nil, false
	}
	return sh.r, true
}

// shared is one replica and the connectors (sql.DBs) that use it.
type shared struct {
	cfg  Config
	r    *replica.Replica
	refs int
}

// Driver is the database/sql driver. Use it through sql.Open.
type Driver struct{}

// Open is there for the driver interface; database/sql calls OpenConnector
// instead.
func (Driver) Open(dsn string) (sqldriver.Conn, error) {
	return nil, errors.New("sqlrebase driver: open with sql.Open, which shares one replica per path")
}

// OpenConnector parses dsn and opens its replica, or shares the one this
// process has open for its path.
func (Driver) OpenConnector(dsn string) (sqldriver.Connector, error) {
	cfg, err := ParseDSN(dsn)
	if err != nil {
		return nil, err
	}
	sh, err := acquire(context.Background(), cfg)
	if err != nil {
		return nil, err
	}
	inner, err := sh.r.Connector()
	if err != nil {
		release(sh)
		return nil, err
	}
	return &connector{sh: sh, inner: inner}, nil
}

// acquire returns the shared replica of cfg.Path, opening it first if need
// be. The lock is held across the open so that two sql.Opens of one path
// never race to open two replicas (the second would fail with ErrLocked).
func acquire(ctx context.Context, cfg Config) (*shared, error) {
	mu.Lock()
	defer mu.Unlock()
	if sh, ok := replicas[cfg.Path]; ok {
		if sh.cfg != cfg {
			return nil, fmt.Errorf("%w: %s", ErrConflict, cfg.Path)
		}
		sh.refs++
		return sh, nil
	}
	reg, ok := registries[cfg.Mutators]
	if !ok {
		return nil, fmt.Errorf("%w: %q (call driver.RegisterMutators first)", ErrUnknownRegistry, cfg.Mutators)
	}
	opts := replica.Options{Mutators: reg, Durability: cfg.Durability, LocalName: cfg.LocalName, LocalPath: cfg.LocalPath}
	if cfg.Server != "" {
		cred, token, err := credential(cfg)
		if err != nil {
			return nil, err
		}
		opts.Remote = &replica.Remote{Addr: cfg.Server, Database: cfg.Database, Credential: cred, Token: token,
			Fingerprint: cfg.Fingerprint, CAFile: cfg.CAFile, ServerName: cfg.ServerName}
	}
	r, err := replica.Open(ctx, cfg.Path, opts)
	if err != nil {
		return nil, err
	}
	sh := &shared{cfg: cfg, r: r, refs: 1}
	replicas[cfg.Path] = sh
	return sh, nil
}

// credential finds the credential cfg names: the static one from the
// environment, or the registered source as a token source, which the
// replica calls on every connect. Called with mu held.
func credential(cfg Config) (string, func(context.Context) (string, error), error) {
	if name := cfg.CredentialSource; name != "" {
		fn, ok := credentials[name]
		if !ok {
			return "", nil, fmt.Errorf("%w: no credential source registered as %q (driver.RegisterCredential)", ErrNoCredential, name)
		}
		return "", func(ctx context.Context) (string, error) {
			c, err := fn(ctx)
			if err != nil {
				return "", fmt.Errorf("%w: credential source %q: %w", ErrNoCredential, name, err)
			}
			return c, nil
		}, nil
	}
	c, ok := os.LookupEnv(cfg.CredentialEnv)
	if !ok || c == "" {
		return "", nil, fmt.Errorf("%w: environment variable %s is not set", ErrNoCredential, cfg.CredentialEnv)
	}
	return c, nil, nil
}

// release drops one reference; the last closes the replica.
func release(sh *shared) error {
	mu.Lock()
	sh.refs--
	last := sh.refs == 0
	if last && replicas[sh.cfg.Path] == sh {
		delete(replicas, sh.cfg.Path)
	}
	mu.Unlock()
	if last {
		return sh.r.Close()
	}
	return nil
}

// connector is one sql.DB's view of a shared replica.
type connector struct {
	sh     *shared
	inner  sqldriver.Connector
	closed sync.Once
}

// Connect opens a read connection of the replica with sqlrebase_mutate.
func (c *connector) Connect(ctx context.Context) (sqldriver.Conn, error) {
	conn, err := c.inner.Connect(ctx)
	if err != nil {
		return nil, err
	}
	raw, ok := conn.(interface{ Raw() *sqlite3.Conn })
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("sqlrebase driver: connection %T has no raw SQLite connection", conn)
	}
	r := c.sh.r
	// DIRECTONLY: a trigger or a view cannot run it behind the app's back.
	// Not DETERMINISTIC: every call is a new mutation.
	err = raw.Raw().CreateFunction(MutateFunction, 2, sqlite3.DIRECTONLY, func(fctx sqlite3.Context, args ...sqlite3.Value) {
		ctx := fctx.Conn().GetInterrupt()
		if ctx == nil || ctx.Done() == nil {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(context.Background(), mutateTimeout)
			defer cancel()
		}
		id, err := mutate(ctx, r, args)
		if err != nil {
			fctx.ResultError(err)
			return
		}
		fctx.ResultInt64(int64(id))
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("sqlrebase driver: register %s: %w", MutateFunction, err)
	}
	return conn, nil
}

// mutate runs sqlrebase_mutate(name, args).
func mutate(ctx context.Context, r *replica.Replica, args []sqlite3.Value) (uint64, error) {
	if args[0].Type() != sqlite3.TEXT {
		return 0, fmt.Errorf("%s: the first argument must be the mutator's name as text", MutateFunction)
	}
	var raw []byte
	switch args[1].Type() {
	case sqlite3.TEXT, sqlite3.BLOB:
		raw = []byte(args[1].Text())
	case sqlite3.NULL:
		raw = []byte("null")
	default:
		return 0, fmt.Errorf("%s: the second argument must be the args as JSON text", MutateFunction)
	}
	h, err := r.Mutate(ctx, args[0].Text(), raw)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", MutateFunction, err)
	}
	return h.ID, nil
}

// Driver returns the sqlrebase driver.
func (c *connector) Driver() sqldriver.Driver { return Driver{} }

// Close is called by the *sql.DB's Close: the last one of a path closes
// its replica.
func (c *connector) Close() error {
	var err error
	c.closed.Do(func() { err = release(c.sh) })
	return err
}
