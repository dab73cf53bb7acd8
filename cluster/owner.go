package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// Owner is one node's side of the one-owner rule, and the cluster's
// server.VersionLog: for each database this node writes, it holds the
// database's lease (renewed every TTL/3) and its fenced Appender, and it
// appends every version to the stream before the server may acknowledge
// it. A database whose lease another node holds cannot be opened for
// writing here (its first version is refused with ErrLeaseHeld); one whose
// lease is lost, or whose append is fenced or fails, is dropped: its
// lease is released and every later version refused until the server
// reopens the database (at once: it asks Fresh again). It is also the server's LocalCache: a database
// opens here only once this node holds its lease and the local file is
// the stream's tail, restored from the snapshot and the stream if not.
type Owner struct {
	log    *Log
	leases *Leases
	snaps  *Snapshots // nil: restores start from the empty database
	token  string
	logger *slog.Logger
	ctx    context.Context // ends at Close: the lease runners' life
	cancel context.CancelFunc

	mu      sync.Mutex // guards dbs and handler; a leaf, never held across I/O
	dbs     map[string]*owned
	handler ForwardHandler // runs forwarded pushes (forward.go)
	wg      sync.WaitGroup
}

type owned struct {
	lease *Lease
	ap    *Appender
	sub   *nats.Subscription // the forwarded pushes, while the lease is held (nil: none)
}

// NewOwner makes node's owner on the given log, leases and snapshots (nil:
// none; a restore then replays the whole stream). Its token (a NewToken of
// node) names it in the leases and on every entry it appends.
func NewOwner(log *Log, leases *Leases, snaps *Snapshots, node string, logger *slog.Logger) *Owner {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Owner{log: log, leases: leases, snaps: snaps, token: NewToken(node), logger: logger, ctx: ctx, cancel: cancel, dbs: map[string]*owned{}}
}

// Token is the owner's lease token.
func (o *Owner) Token() string { return o.token }

// Append implements server.VersionLog: it appends db's version to the
// stream, fenced, while this node holds db's lease, and returns nil only
// once JetStream acknowledged it.
func (o *Owner) Append(ctx context.Context, db string, version uint64, rec []byte) error {
	w, err := o.writer(ctx, db)
	if err != nil {
		return err
	}
	if !w.lease.Valid() {
		err := w.lease.Err()
		if err == nil {
			err = fmt.Errorf("%w: %s: not renewed within its TTL", ErrLeaseLost, db)
		}
		o.drop(db, w, err)
		return err
	}
	if _, err := w.ap.Append(ctx, version, rec); err != nil {
		if errors.Is(err, ErrFenced) || errors.Is(err, ErrAppendFailed) {
			o.drop(db, w, err)
		}
		return err
	}
	return nil
}

// Fresh implements server.LocalCache: it takes db's lease (ErrLeaseHeld if
// another node holds it) and makes its Appender, then reports whether the
// local file at version and checksum is the subject's last entry: the same
// version, and that entry's checksum after. An empty subject is matched
// only by a new file (version 0): a file with versions the stream lacks
// is not served.
func (o *Owner) Fresh(ctx context.Context, db string, version, checksum uint64) (bool, error) {
	w, err := o.writer(ctx, db)
	if err != nil {
		return false, notOwner(err)
	}
	seq, last := w.ap.Last()
	if last == 0 || version != last {
		return version == last, nil
	}
	es, err := o.log.Read(ctx, db, seq, 1)
	if err != nil {
		return false, err
	}
	if len(es) != 1 || es[0].Seq != seq || len(es[0].Rec) < 8 {
		return false, fmt.Errorf("%w: %s: the subject's last entry (seq %d) is not readable", ErrBrokenChain, db, seq)
	}
	ev, err := protocol.DecodeEncodedVersion(es[0].Rec[8:], protocol.DefaultLimits)
	if err != nil {
		return false, fmt.Errorf("%w: %s version %d: %w", ErrBrokenChain, db, last, err)
	}
	if ev.Version != last {
		return false, fmt.Errorf("%w: %s: entry of version %d holds version %d", ErrBrokenChain, db, last, ev.Version)
	}
	return ev.PostChecksum == checksum, nil
}

// Restore implements server.LocalCache: it rebuilds db's file at path from
// the latest snapshot and the stream (Restore), checked against the chain.
// With nothing in the stream yet it leaves path absent, so the server makes
// version 1 (which this node then appends first). Call Fresh first: the
// lease must be held while the file is rebuilt.
func (o *Owner) Restore(ctx context.Context, db, path string) error {
	o.mu.Lock()
	w := o.dbs[db]
	o.mu.Unlock()
	if w == nil {
		return fmt.Errorf("%w: %s: restore without the lease", ErrLeaseLost, db)
	}
	if _, last := w.ap.Last(); last == 0 {
		return nil
	}
	res, err := Restore(ctx, o.log, o.snaps, db, path)
	if err != nil {
		return err
	}
	o.logger.Info("restored database from the stream", "db", db, "version", res.Version, "from_snapshot", res.FromSnap)
	return nil
}

// Drop implements server.LocalCache: the server could not open db after
// Fresh took its lease (why), so this node lets the lease go for another
// node to take, instead of renewing a lease for a database it does not
// serve.
func (o *Owner) Drop(db string, why error) {
	o.mu.Lock()
	w := o.dbs[db]
	o.mu.Unlock()
	if w != nil {
		o.logger.Warn("could not open a database after taking its lease; releasing it", "db", db, "err", why)
		o.drop(db, w, why)
	}
}

// writer returns db's lease and appender, taking the lease first if this
// node does not hold it. A database's versions come from its one writer
// goroutine, so two calls for one database never race.
func (o *Owner) writer(ctx context.Context, db string) (*owned, error) {
	o.mu.Lock()
	w := o.dbs[db]
	o.mu.Unlock()
	if w != nil {
		return w, nil
	}
	if o.ctx.Err() != nil {
		return nil, fmt.Errorf("cluster: owner closed")
	}
	lease, err := o.leases.Acquire(ctx, db, o.token)
	if err != nil {
		return nil, err
	}
	ap, err := o.log.NewAppender(ctx, db, o.token)
	if err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		lease.Release(rctx)
		cancel()
		return nil, err
	}
	w = &owned{lease: lease, ap: ap}
	if w.sub, err = o.serveForwards(db); err != nil {
		// Pushes from other nodes cannot reach this one: it serves its
		// own sessions, and the others' fail over to it.
		o.logger.Warn("subscribe to forwarded pushes", "db", db, "err", err)
	}
	o.mu.Lock()
	o.dbs[db] = w
	o.mu.Unlock()
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		lease.Run(o.ctx, func(err error) {
			o.logger.Warn("lost the lease of a database; its writer stops", "db", db, "err", err)
			o.drop(db, w, err)
		})
	}()
	o.logger.Info("own database", "db", db, "token", o.token, "after_version", ap.lastVersion)
	return w, nil
}

// drop forgets db's writer and releases its lease (a no-op if it is lost).
func (o *Owner) drop(db string, w *owned, why error) {
	o.mu.Lock()
	if o.dbs[db] == w {
		delete(o.dbs, db)
	}
	o.mu.Unlock()
	if w.sub != nil {
		w.sub.Unsubscribe()
	}
	ctx, cancel := context.WithTimeout(o.ctx, time.Second)
	defer cancel()
	if err := w.lease.Release(ctx); err != nil {
		o.logger.Warn("release lease", "db", db, "err", err, "after", why)
	}
}

// Owns reports whether this node holds a working lease on db.
func (o *Owner) Owns(db string) bool {
	o.mu.Lock()
	w := o.dbs[db]
	o.mu.Unlock()
	return w != nil && w.lease.Valid() && w.ap.Err() == nil
}

// Close releases every lease this owner holds, so that other nodes may
// take the databases over at once, and stops the renewals. Close the
// server first: a version appended after Close is refused.
func (o *Owner) Close(ctx context.Context) error {
	// No more forwarded pushes: their goroutines count in wg.
	o.mu.Lock()
	for _, w := range o.dbs {
		if w.sub != nil {
			w.sub.Unsubscribe()
		}
	}
	o.mu.Unlock()
	// Stop the renewals first: a renewal racing the release would find
	// the lease released and report it lost.
	o.cancel()
	o.wg.Wait()
	o.mu.Lock()
	dbs := o.dbs
	o.dbs = map[string]*owned{}
	o.mu.Unlock()
	var errs []error
	for _, w := range dbs {
		errs = append(errs, w.lease.Release(ctx))
	}
	return errors.Join(errs...)
}
