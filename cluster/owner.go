package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
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
	node   string // this node's name: its NATS server's, when the server is embedded
	// placeKick asks the leader placement for a check now (placement.go).
	placeKick chan struct{}
	// ownsSub answers the peers' placement how many databases this node
	// owns (answerOwns); nil if it could not subscribe.
	ownsSub *nats.Subscription
	logger  *slog.Logger
	ctx     context.Context // ends at Close: the lease runners' life
	cancel  context.CancelFunc

	// Lock order: mu, then an owned's smu; neither is held across I/O.
	mu      sync.Mutex // guards dbs, handler, src, policy, and wg.Add against Close
	dbs     map[string]*owned
	handler ForwardHandler // runs forwarded pushes (forward.go)
	src     SnapshotSource // nil: no snapshots written
	policy  SnapshotPolicy
	wg      sync.WaitGroup
}

type owned struct {
	lease *Lease
	ap    *Appender
	sub   *nats.Subscription // the forwarded pushes, while the lease is held (nil: none)
	// appended is set by the first version appended under this lease:
	// until then the database needs its takeover version (NeedsTakeover).
	appended atomic.Bool

	snapOn bool       // a snapshot source was set when the lease was taken
	smu    sync.Mutex // guards snap and recent; a leaf
	snap   snapState
	recent [recentVersions]appendedVersion // a ring, by version
}

// appendedVersion is what the snapshot writer needs of a version this
// owner appended: its stream sequence and checksum after.
type appendedVersion struct {
	version, seq, checksum uint64
}

// recentVersions is how many appended versions an owned database keeps
// the sequence of: a snapshot pins the latest version when it opens,
// normally a few versions after the one that triggered it; an older one
// is looked up in the stream (entryOf).
const recentVersions = 64

// snapshotTimeout bounds one snapshot: pinning, the object-store put of
// the image and the trim.
const snapshotTimeout = 2 * time.Minute

// SnapshotSource gives the owner a database's image to snapshot: a
// *server.Server is one. WithAuthority holds the database open while fn
// runs; the owner pins the image there with Authority.OpenSnapshot.
type SnapshotSource interface {
	WithAuthority(ctx context.Context, name string, fn func(*server.Authority) error) error
}

// NewOwner makes node's owner on the given log, leases and snapshots (nil:
// none; a restore then replays the whole stream). Its token (a NewToken of
// node) names it in the leases and on every entry it appends. While it
// owns databases it checks, every placementEvery, whether its node leads
// the version stream or the lease bucket, and hands that leadership to a
// node that owns fewer (placement.go); node must so be the name of the
// embedded NATS server, if there is one.
func NewOwner(log *Log, leases *Leases, snaps *Snapshots, node string, logger *slog.Logger) *Owner {
	return newOwner(log, leases, snaps, node, logger, placementEvery)
}

// newOwner is NewOwner with the period of its leader placement's checks
// (a test sets an hour, so that a check it sees can only have been one
// the owner asked for).
func newOwner(log *Log, leases *Leases, snaps *Snapshots, node string, logger *slog.Logger, placeEvery time.Duration) *Owner {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	o := &Owner{log: log, leases: leases, snaps: snaps, token: NewToken(node), node: node, placeKick: make(chan struct{}, 1), logger: logger, ctx: ctx, cancel: cancel, dbs: map[string]*owned{}}
	var err error
	if o.ownsSub, err = o.answerOwns(); err != nil {
		// The peers then leave this node out of their placement: it is
		// never handed a leadership, which costs a fail-over time, not
		// correctness.
		logger.Warn("cluster: cannot answer the peers' leader placement", "err", err)
	}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		o.runPlacement(placeEvery)
	}()
	return o
}

// SetSnapshotSource makes the owner write snapshots of the databases it
// owns, from src, when p says (zero fields: the defaults), and trim the
// stream behind each (docs/CLUSTER.md, "Snapshots and trimming"). Each
// runs on a goroutine of its own, at most one per database at a time, so
// an append never waits for one. Without snapshots (no Snapshots given to
// NewOwner) it does nothing. Call it before the databases open: a
// database taken over before keeps no snapshots until it is taken again.
func (o *Owner) SetSnapshotSource(src SnapshotSource, p SnapshotPolicy) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.snaps != nil {
		o.src, o.policy = src, p
	}
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
	seq, err := w.ap.Append(ctx, version, rec)
	if err != nil {
		if errors.Is(err, ErrFenced) || errors.Is(err, ErrAppendFailed) {
			o.drop(db, w, err)
		}
		return err
	}
	if !w.appended.Swap(true) {
		// The first version under this lease (the takeover's): the
		// database serves now, so the leader placement may move the log
		// groups' leaders without stalling its restore.
		o.kickPlacement()
	}
	o.appended(db, w, version, seq, rec)
	return nil
}

// NeedsTakeover implements server.Takeover: db, just opened here, needs a
// takeover version while this node holds its lease and has appended
// nothing under it. That first append is what fences a deposed owner that
// has not noticed (its expected sequence is the old tail); without it, the
// old owner's next append would land, and this node, serving the old tail,
// would learn of it only at its own first push.
func (o *Owner) NeedsTakeover(db string) bool {
	o.mu.Lock()
	w := o.dbs[db]
	o.mu.Unlock()
	return w != nil && !w.appended.Load()
}

// appended records an acknowledged version for the snapshot writer and
// starts a snapshot if the policy says one is due. It never waits for
// one: the writer's path goes on at once.
func (o *Owner) appended(db string, w *owned, version, seq uint64, rec []byte) {
	if !w.snapOn || len(rec) < 8 {
		return
	}
	ev, err := protocol.DecodeEncodedVersion(rec[8:], protocol.DefaultLimits)
	if err != nil {
		return // not a server's version (a test's); nothing to snapshot by
	}
	w.smu.Lock()
	w.recent[version%recentVersions] = appendedVersion{version: version, seq: seq, checksum: ev.PostChecksum}
	start := w.snap.appended(uint64(len(rec)), uint64(ev.DBSize)*uint64(ev.PageSize))
	w.smu.Unlock()
	if !start {
		return
	}
	o.mu.Lock()
	src := o.src
	if src == nil || o.ctx.Err() != nil {
		o.mu.Unlock()
		w.smu.Lock()
		w.snap.finished(false)
		w.smu.Unlock()
		return
	}
	o.wg.Add(1) // under mu: Close cancels under it, so no Add follows its Wait
	o.mu.Unlock()
	go func() {
		defer o.wg.Done()
		ctx, cancel := context.WithTimeout(o.ctx, snapshotTimeout)
		defer cancel()
		info, err := o.writeSnapshot(ctx, src, db, w)
		w.smu.Lock()
		w.snap.finished(err == nil)
		w.smu.Unlock()
		if err != nil {
			o.logger.Warn("snapshot failed; the next one is tried later", "db", db, "err", err)
			return
		}
		o.logger.Info("snapshot stored, stream trimmed behind it", "db", db, "version", info.Version, "seq", info.Seq, "pages", info.Pages)
	}()
}

// appendedAt is the sequence and checksum of version v, if this owner
// appended it recently.
func (w *owned) appendedAt(v uint64) (appendedVersion, bool) {
	w.smu.Lock()
	defer w.smu.Unlock()
	a := w.recent[v%recentVersions]
	return a, a.version == v && v != 0
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
// the stream, checked against the chain: from the file the server set
// aside (path + ".stale") if that is at a version of the stream with the
// stream's checksum there (a cache only behind: only the versions after it
// are applied), else from the latest snapshot (Restore).
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
	// The file the server just set aside is usually only behind: start
	// from it if it is a version of the stream.
	res, err := restoreBehind(ctx, o.log, db, path, path+".stale")
	if err != nil {
		if !errors.Is(err, errNoLocal) {
			o.logger.Info("the set-aside file is not a version of the stream; restoring in full", "db", db, "why", err)
		}
		if res, err = Restore(ctx, o.log, o.snaps, db, path); err != nil {
			return err
		}
	}
	o.logger.Info("restored database from the stream", "db", db, "version", res.Version,
		"from_snapshot", res.FromSnap, "from_file", res.FromFile, "applied", res.Applied)
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
	src, policy := o.src, o.policy
	o.mu.Unlock()
	if src != nil {
		// Versions since the stored snapshot count toward the next one, so
		// that a database whose owner changes often is still snapshotted.
		since := ap.lastVersion
		if info, err := o.snaps.Info(ctx, db); err == nil && info.Version <= since {
			since -= info.Version
		}
		w.snap, w.snapOn = newSnapState(policy, since), true
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
	if o.ownsSub != nil {
		o.ownsSub.Unsubscribe()
	}
	o.mu.Lock()
	for _, w := range o.dbs {
		if w.sub != nil {
			w.sub.Unsubscribe()
		}
	}
	o.mu.Unlock()
	// Stop the renewals and snapshots first: a renewal racing the release
	// would find the lease released and report it lost.
	o.mu.Lock()
	o.cancel()
	o.mu.Unlock()
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
