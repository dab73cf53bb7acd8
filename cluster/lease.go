package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// LeaseConfig configures the lease bucket. Zero values take the defaults
// named.
type LeaseConfig struct {
	// Bucket is the KV bucket's name (DefaultLeaseBucket).
	Bucket string
	// TTL is a lease's life without a renewal (DefaultLeaseTTL; at least
	// MinLeaseTTL). Holders renew every TTL/3.
	TTL time.Duration
	// Replicas is the bucket's replication (1; 3 in a cluster).
	Replicas int
}

// Leases is the bucket of the databases' leases: one key per database,
// whose value is the holder's token, with a per-key TTL.
type Leases struct {
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	bucket string
	ttl    time.Duration
}

// OpenLeases creates the lease bucket, or opens it, retrying until ctx
// ends while a cluster elects its meta leader.
func OpenLeases(ctx context.Context, js jetstream.JetStream, cfg LeaseConfig) (*Leases, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = DefaultLeaseBucket
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultLeaseTTL
	}
	if cfg.TTL < MinLeaseTTL {
		return nil, fmt.Errorf("cluster: lease TTL %v is below JetStream's minimum %v", cfg.TTL, MinLeaseTTL)
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	kv, err := retry(ctx, func(ctx context.Context) (jetstream.KeyValue, error) {
		return js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      cfg.Bucket,
			Description: "sqlrebase: one owner per database",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
			// Enables per-message TTLs on the bucket, and keeps the marker
			// an expiry leaves for one TTL (watchers see the lease go).
			LimitMarkerTTL: cfg.TTL,
		})
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: open lease bucket %s: %w", cfg.Bucket, err)
	}
	return &Leases{js: js, kv: kv, bucket: cfg.Bucket, ttl: cfg.TTL}, nil
}

// TTL is the leases' life without a renewal.
func (ls *Leases) TTL() time.Duration { return ls.ttl }

// NewToken makes a lease holder's token: the node's name and 64 random
// bits, so that a restarted node never mistakes its predecessor's lease
// (or log entries) for its own.
func NewToken(node string) string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return node + "-" + hex.EncodeToString(b[:])
}

// Holder returns who holds db's lease, and its revision; "" if nobody does.
func (ls *Leases) Holder(ctx context.Context, db string) (string, uint64, error) {
	e, err := ls.kv.Get(ctx, token(db))
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return "", 0, nil
	}
	if err != nil {
		return "", 0, fmt.Errorf("cluster: lease of %s: %w", db, err)
	}
	return string(e.Value()), e.Revision(), nil
}

// Lease is one holder's lease on one database.
type Lease struct {
	ls     *Leases
	db     string
	key    string
	holder string

	// writeMu serialises renewals and the release (network calls); mu,
	// under it, guards the fields and is never held across I/O, so that
	// Valid never waits behind a renewal.
	writeMu sync.Mutex
	mu      sync.Mutex
	rev     uint64    // the key's revision this holder wrote last (written under both locks)
	renewed time.Time // when the last successful write was sent (monotonic)
	lost    error     // sticky
}

// setLost records why the lease is lost (the first reason stays) and
// returns it.
func (le *Lease) setLost(err error) error {
	le.mu.Lock()
	defer le.mu.Unlock()
	if le.lost == nil {
		le.lost = err
	}
	return le.lost
}

// Acquire takes db's lease for holder (a NewToken) with a create: it
// succeeds only if nobody holds the lease (no key, or a released or
// expired one). A held lease gives ErrLeaseHeld, naming the holder.
func (ls *Leases) Acquire(ctx context.Context, db, holder string) (*Lease, error) {
	start := time.Now()
	rev, err := ls.kv.Create(ctx, token(db), []byte(holder), jetstream.KeyTTL(ls.ttl))
	// A create that lost a race to another is a wrong last sequence, not
	// ErrKeyExists, on a replicated bucket (10164, which the client does
	// not map): the lease is held all the same
	// (TestLeaseAcquireRaceOnAReleasedLease).
	if errors.Is(err, jetstream.ErrKeyExists) || isWrongLastSeq(err) {
		who, _, _ := ls.Holder(ctx, db)
		return nil, fmt.Errorf("%w: %s is held by %q", ErrLeaseHeld, db, who)
	}
	if err != nil {
		return nil, fmt.Errorf("cluster: acquire lease of %s: %w", db, err)
	}
	return &Lease{ls: ls, db: db, key: token(db), holder: holder, rev: rev, renewed: start}, nil
}

// Holder is the token this lease was taken with.
func (le *Lease) Holder() string { return le.holder }

// Valid reports whether the holder may still count on its lease by its
// own clock: less than a TTL since the last successful renewal was sent.
// JetStream starts the TTL when it stores the renewal, after it was sent,
// so the holder stops believing before the bucket lets anyone else in.
func (le *Lease) Valid() bool {
	le.mu.Lock()
	defer le.mu.Unlock()
	return le.lost == nil && time.Since(le.renewed) < le.ls.ttl
}

// Err is why the lease was lost; nil while it is held.
func (le *Lease) Err() error {
	le.mu.Lock()
	defer le.mu.Unlock()
	return le.lost
}

// Renew extends the lease by a TTL: a CAS write on the revision this holder
// wrote last, carrying the TTL. (kv.Update cannot be used: it carries no
// TTL, and an update without one makes the key eternal; nats-server
// #6959.) Refused, or late by the holder's own clock: ErrLeaseLost, and
// the lease stays lost. Another failure (no quorum, a timeout) is returned
// as it is, and the caller retries until Valid turns false.
func (le *Lease) Renew(ctx context.Context) error {
	le.writeMu.Lock()
	defer le.writeMu.Unlock()
	le.mu.Lock()
	lost, renewed := le.lost, le.renewed
	le.mu.Unlock()
	if lost != nil {
		return lost
	}
	if since := time.Since(renewed); since >= le.ls.ttl {
		return le.setLost(fmt.Errorf("%w: %s: not renewed for %v", ErrLeaseLost, le.db, since.Round(time.Millisecond)))
	}
	start := time.Now()
	rev, err := le.write(ctx, le.rev)
	if err != nil && isWrongLastSeq(err) {
		rev, err = le.resolve(ctx, err)
	}
	if errors.Is(err, ErrLeaseLost) {
		return le.setLost(err)
	}
	if err != nil {
		return fmt.Errorf("cluster: renew lease of %s: %w", le.db, err)
	}
	le.mu.Lock()
	defer le.mu.Unlock()
	if le.lost != nil {
		return le.lost
	}
	le.rev, le.renewed = rev, start
	return nil
}

func (le *Lease) write(ctx context.Context, rev uint64) (uint64, error) {
	m := &nats.Msg{Subject: "$KV." + le.ls.bucket + "." + le.key, Data: []byte(le.holder), Header: nats.Header{}}
	ack, err := le.ls.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(le.ls.ttl))
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
}

// resolve decides a refused renewal by the key's current entry: ours at a
// newer revision (an earlier attempt landed) is held; ours at our revision
// (a spurious 10164 of a replicated bucket) is retried once; anything else
// (another holder, an expiry marker, a deletion) is lost.
func (le *Lease) resolve(ctx context.Context, cause error) (uint64, error) {
	e, err := le.ls.kv.Get(ctx, le.key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted):
		return 0, fmt.Errorf("%w: %s: the lease expired or was released", ErrLeaseLost, le.db)
	case err != nil:
		return 0, fmt.Errorf("%w (and reading the lease: %w)", cause, err)
	case string(e.Value()) != le.holder:
		return 0, fmt.Errorf("%w: %s is held by %q", ErrLeaseLost, le.db, e.Value())
	case e.Revision() != le.rev:
		return e.Revision(), nil
	}
	rev, err := le.write(ctx, le.rev)
	if err != nil && isWrongLastSeq(err) {
		return 0, fmt.Errorf("%w: %s: renewal refused twice: %w", ErrLeaseLost, le.db, err)
	}
	return rev, err
}

// Run renews the lease every TTL/3 until ctx ends or the lease is lost;
// then it calls lost once with the reason (not when ctx ended). A renewal
// that fails for another reason is retried at the next tick, and the lease
// is lost once a TTL has passed without one.
func (le *Lease) Run(ctx context.Context, lost func(error)) {
	t := time.NewTicker(le.ls.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, le.ls.ttl/3)
		err := le.Renew(rctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrLeaseLost) {
			if lost != nil {
				lost(err)
			}
			return
		}
	}
}

// Release gives the lease up at once, so that another node may acquire it
// without waiting for the TTL: a delete on the holder's revision, so that
// it cannot delete a lease someone else took meanwhile.
func (le *Lease) Release(ctx context.Context) error {
	le.writeMu.Lock()
	defer le.writeMu.Unlock()
	le.mu.Lock()
	was := le.lost
	if was == nil {
		le.lost = fmt.Errorf("%w: %s: released", ErrLeaseLost, le.db)
	}
	le.mu.Unlock()
	if was != nil {
		return nil
	}
	err := le.ls.kv.Delete(ctx, le.key, jetstream.LastRevision(le.rev))
	if err != nil && isWrongLastSeq(err) {
		return nil // not ours any more: nothing to release
	}
	if err != nil {
		return fmt.Errorf("cluster: release lease of %s: %w", le.db, err)
	}
	return nil
}
