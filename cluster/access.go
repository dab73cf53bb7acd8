package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/server"
)

// DefaultAccessBucket is the KV bucket of the databases and their access
// records (server.AccessStore).
const DefaultAccessBucket = "sqlrebase-access"

// emptyAccessRecord is a new database's record: no credentials, no
// bindings (a JSON object, as server.CheckAccessRecord wants).
var emptyAccessRecord = []byte("{}")

// AccessConfig configures the access bucket. Zero values take the
// defaults named.
type AccessConfig struct {
	// Bucket is the KV bucket's name (DefaultAccessBucket).
	Bucket string
	// Replicas is the bucket's replication (1; 3 in a cluster).
	Replicas int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Access is the cluster's server.AccessStore: every database is one key
// of a KV bucket (its name mapped as Subject maps it), whose value is the
// JSON of its access.json. Every node watches the bucket and keeps the
// latest valid record of each key in memory, so a node knows every
// database created on any node, loads a record without a round trip, and
// hears of every change (server.Config.AccessStore's Watch) to apply it
// to the sessions it serves. A change is a compare-and-set on the key's
// revision, so two nodes' changes never overwrite each other: the loser
// gets a server.AccessConflictError with the winner's record and applies
// its change to that.
type Access struct {
	kv     jetstream.KeyValue
	bucket string
	log    *slog.Logger
	w      jetstream.KeyWatcher
	cancel context.CancelFunc
	done   chan struct{} // closed when the watch loop ends

	// mu guards the fields below. It is never held across I/O or while
	// a watcher's function runs.
	mu      sync.Mutex
	recs    map[string]server.AccessRecord // by database name: the latest valid record
	fns     map[int]func(string, server.AccessRecord)
	nextFn  int
	ready   chan struct{} // closed once the watch delivered the bucket's initial values
	isReady bool
}

var (
	_ server.AccessStore     = (*Access)(nil)
	_ server.AccessRefresher = (*Access)(nil)
)

// OpenAccess creates the access bucket, or opens it (retrying until ctx
// ends while a cluster elects its meta leader), and starts watching it. It
// returns once the records the bucket holds are in memory.
func OpenAccess(ctx context.Context, js jetstream.JetStream, cfg AccessConfig) (*Access, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = DefaultAccessBucket
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	kv, err := retry(ctx, func(ctx context.Context) (jetstream.KeyValue, error) {
		return js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      cfg.Bucket,
			Description: "sqlrebase: the databases and their credentials",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
		})
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: open access bucket %s: %w", cfg.Bucket, err)
	}
	wctx, cancel := context.WithCancel(context.Background()) // the watch outlives ctx
	w, err := kv.WatchAll(wctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("cluster: watch access bucket %s: %w", cfg.Bucket, err)
	}
	a := &Access{
		kv: kv, bucket: cfg.Bucket, log: cfg.Logger, w: w, cancel: cancel, done: make(chan struct{}),
		recs: map[string]server.AccessRecord{}, fns: map[int]func(string, server.AccessRecord){}, ready: make(chan struct{}),
	}
	go a.run()
	select {
	case <-a.ready:
		return a, nil
	case <-a.done:
		a.Close()
		return nil, fmt.Errorf("cluster: watch access bucket %s: ended before its initial values", cfg.Bucket)
	case <-ctx.Done():
		a.Close()
		return nil, fmt.Errorf("cluster: watch access bucket %s: %w", cfg.Bucket, ctx.Err())
	}
}

// Close stops the watch. Call it after the servers using the store closed.
func (a *Access) Close() {
	a.cancel()
	_ = a.w.Stop() // closes the updates channel: run ends
	<-a.done
}

// run takes the watch's entries until it stops.
func (a *Access) run() {
	defer close(a.done)
	for e := range a.w.Updates() {
		if e == nil { // the initial values are in
			a.mu.Lock()
			if !a.isReady {
				a.isReady = true
				close(a.ready)
			}
			a.mu.Unlock()
			continue
		}
		a.deliver(e)
	}
}

// accessEntry is what deliver needs of a watch entry (a
// jetstream.KeyValueEntry), so that tests can hand it any.
type accessEntry interface {
	Key() string
	Value() []byte
	Revision() uint64
	Operation() jetstream.KeyValueOp
}

// deliver takes one entry: a valid record later than the one held
// replaces it, and the watchers hear of it. A corrupt value, or a
// deletion (nothing sqlrebase writes), is logged and changes nothing.
func (a *Access) deliver(e accessEntry) {
	db := dbOfKey(e.Key())
	if e.Operation() != jetstream.KeyValuePut {
		a.log.Error("access record deleted from the bucket; the copy in memory stays", "db", db, "revision", e.Revision())
		return
	}
	if err := server.CheckAccessRecord(e.Value()); err != nil {
		a.log.Error("corrupt access record in the bucket; the copy in memory stays", "db", db, "revision", e.Revision(), "err", err)
		return
	}
	rec := server.AccessRecord{Value: bytes.Clone(e.Value()), Revision: e.Revision()}
	fns, ok := a.put(db, rec)
	if !ok {
		return // this node's own write, already held
	}
	for _, fn := range fns {
		fn(db, rec)
	}
}

// put makes rec db's record if it is later than the one held, and then
// returns the watchers to tell.
func (a *Access) put(db string, rec server.AccessRecord) ([]func(string, server.AccessRecord), bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if cur, ok := a.recs[db]; ok && cur.Revision >= rec.Revision {
		return nil, false
	}
	a.recs[db] = rec
	fns := make([]func(string, server.AccessRecord), 0, len(a.fns))
	for _, id := range slices.Sorted(maps.Keys(a.fns)) {
		fns = append(fns, a.fns[id])
	}
	return fns, true
}

// dbOfKey is the database a key names (token's inverse).
func dbOfKey(key string) string { return strings.ReplaceAll(key, "=", ".") }

// Databases lists the databases the bucket holds (as the watch has
// delivered them: no round trip).
func (a *Access) Databases(context.Context) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	names := make([]string, 0, len(a.recs))
	for db := range a.recs {
		names = append(names, db)
	}
	slices.Sort(names)
	return names, nil
}

// Create registers db with no credentials, unless some node did.
func (a *Access) Create(ctx context.Context, db string) error {
	rev, err := retry(ctx, func(ctx context.Context) (uint64, error) {
		return a.kv.Create(ctx, token(db), emptyAccessRecord)
	})
	if errors.Is(err, jetstream.ErrKeyExists) {
		// Known already, or soon: make sure it is before the caller
		// serves it. A KV get may be answered by a replica of the bucket
		// that has not applied the other node's create yet (direct gets),
		// so "not found" for a key known to exist is retried, bounded:
		// three nodes started at once with --db each failed now and then
		// with "unknown database" (cmd/sqlrebase's TestClusterFailover).
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		for {
			_, err := a.get(wctx, db)
			if !errors.Is(err, server.ErrUnknownDatabase) || wctx.Err() != nil {
				return err
			}
			select {
			case <-wctx.Done():
				return err
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	if err != nil {
		return fmt.Errorf("cluster: create database %s: %w", db, err)
	}
	a.put(db, server.AccessRecord{Value: emptyAccessRecord, Revision: rev})
	return nil
}

// Load returns db's record as the watch delivered it, or, for a key the
// watch has not delivered (yet), as the bucket holds it.
func (a *Access) Load(ctx context.Context, db string) (server.AccessRecord, error) {
	a.mu.Lock()
	rec, ok := a.recs[db]
	a.mu.Unlock()
	if ok {
		return rec, nil
	}
	return a.get(ctx, db)
}

// Refresh returns db's record as the bucket holds it now (a round trip:
// the server asks only before refusing a Hello).
func (a *Access) Refresh(ctx context.Context, db string) (server.AccessRecord, error) {
	return a.get(ctx, db)
}

// get reads db's record from the bucket, keeps it if it is valid and
// later than the one held, and returns it.
func (a *Access) get(ctx context.Context, db string) (server.AccessRecord, error) {
	e, err := retry(ctx, func(ctx context.Context) (jetstream.KeyValueEntry, error) {
		return a.kv.Get(ctx, token(db))
	})
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return server.AccessRecord{}, fmt.Errorf("%w: %q", server.ErrUnknownDatabase, db)
	}
	if err != nil {
		return server.AccessRecord{}, fmt.Errorf("cluster: access record of %s: %w", db, err)
	}
	rec := server.AccessRecord{Value: bytes.Clone(e.Value()), Revision: e.Revision()}
	if server.CheckAccessRecord(rec.Value) == nil {
		a.put(db, rec) // no watcher told: the caller has it
	}
	return rec, nil
}

// Save writes value as db's record if its revision is still rev (0: a
// record not yet in the bucket). A revision that moved is a
// *server.AccessConflictError with the record as it is now, unless that
// record is value itself (an attempt that landed though its reply was
// lost, or a spurious "wrong last sequence" on a replicated bucket): that
// is the save done.
func (a *Access) Save(ctx context.Context, db string, value []byte, rev uint64) (uint64, error) {
	key := token(db)
	next, err := retry(ctx, func(ctx context.Context) (uint64, error) {
		if rev == 0 {
			return a.kv.Create(ctx, key, value)
		}
		return a.kv.Update(ctx, key, value, rev)
	})
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		e, gerr := a.newerThan(ctx, key, rev)
		if gerr != nil {
			return 0, fmt.Errorf("cluster: save access record of %s: %w; reading it again: %w", db, err, gerr)
		}
		if e.Revision() > rev && bytes.Equal(e.Value(), value) {
			next, err = e.Revision(), nil
		} else {
			return 0, &server.AccessConflictError{Current: server.AccessRecord{Value: bytes.Clone(e.Value()), Revision: e.Revision()}}
		}
	}
	if err != nil {
		return 0, fmt.Errorf("cluster: save access record of %s: %w", db, err)
	}
	a.put(db, server.AccessRecord{Value: bytes.Clone(value), Revision: next})
	return next, nil
}

// staleReadWait bounds how long a save that lost its race waits for a
// read of the record newer than the revision it saved on.
const staleReadWait = 2 * time.Second

// newerThan reads key's entry until it is newer than rev, for at most
// staleReadWait, and returns the last one read. A refused save proves a
// revision after rev exists, but a KV get is a direct get, which any
// replica of the bucket may answer, also one that has not applied that
// revision yet: handed back as the conflict's record, the stale entry made
// the next attempt fail the same way, and sixteen in a row failed a Hello
// or ended a node at start-up ("the access record changed meanwhile",
// cmd/sqlrebase's multi-node tests, with three nodes started at once).
func (a *Access) newerThan(ctx context.Context, key string, rev uint64) (jetstream.KeyValueEntry, error) {
	wctx, cancel := context.WithTimeout(ctx, staleReadWait)
	defer cancel()
	for {
		e, err := retry(ctx, func(ctx context.Context) (jetstream.KeyValueEntry, error) { return a.kv.Get(ctx, key) })
		if err != nil || e.Revision() > rev {
			return e, err
		}
		select {
		case <-wctx.Done():
			return e, nil
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Watch calls fn with every record that changes from now on (from this
// node's connection or another's, its own saves excepted: the caller has
// those), one at a time, from the watch's goroutine.
func (a *Access) Watch(fn func(db string, rec server.AccessRecord)) (stop func()) {
	a.mu.Lock()
	id := a.nextFn
	a.nextFn++
	a.fns[id] = fn
	a.mu.Unlock()
	return func() {
		a.mu.Lock()
		delete(a.fns, id)
		a.mu.Unlock()
	}
}
