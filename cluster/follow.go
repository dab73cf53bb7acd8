package cluster

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/server"
)

// The Owner is also the server's Follower (server/follower.go): for a
// database another node owns, this node follows the stream into its own
// copy and fans its versions out to its replicas, and forwards their
// pushes to the owner (forward.go). docs/CLUSTER.md, "Forwarding and
// fan-out".

var (
	_ server.Follower      = (*Owner)(nil)
	_ server.LeaseReleaser = (*Owner)(nil)
)

// Release implements server.LeaseReleaser: the server closed db here, so
// this node stops writing it and lets its lease go for any node to take.
func (o *Owner) Release(db string) {
	o.mu.Lock()
	w := o.dbs[db]
	o.mu.Unlock()
	if w != nil {
		o.logger.Debug("database closed here; releasing its lease", "db", db)
		o.drop(db, w, nil)
	}
}

// Holder implements server.Follower: the token of db's lease holder, ""
// if none.
func (o *Owner) Holder(ctx context.Context, db string) (string, error) {
	h, _, err := o.leases.Holder(ctx, db)
	return h, err
}

// Image implements server.Follower: db's latest image at path, from the
// snapshot and the stream (Restore, every version checked).
func (o *Owner) Image(ctx context.Context, db, path string) (server.FollowImage, error) {
	res, err := Restore(ctx, o.log, o.snaps, db, path)
	if err != nil {
		return server.FollowImage{}, err
	}
	return server.FollowImage{Version: res.Version, Checksum: res.Checksum}, nil
}

// Follow implements server.Follower: it finds the stream sequence of db's
// version after+1 and reads the subject from there with an ordered
// consumer (R1, in memory, no Raft group; it re-creates itself across a
// stream leader election), calling apply with each version in order.
func (o *Owner) Follow(ctx context.Context, db string, after uint64, apply func(version uint64, rec []byte) error) error {
	start, err := o.log.seqAfter(ctx, db, after)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, consumerCreateTimeout)
	cons, err := o.log.js.OrderedConsumer(cctx, o.log.stream.CachedInfo().Config.Name, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{Subject(db)},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    start,
	})
	cancel()
	if err != nil {
		return fmt.Errorf("cluster: follow %s: %w", db, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("cluster: follow %s: %w", db, err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	// The watchdog: an ordered consumer made on a just-formed R3 stream
	// was seen to deliver nothing for a whole run (the chaos suite's R3
	// mode, about one seed in six) while the subject moved on. So the
	// subject's tail is read every followStall, and a consumer that let a
	// whole period pass without delivering a version the tail holds is
	// dropped, and the caller follows again with a new one.
	var applied atomic.Uint64
	applied.Store(after)
	stalled := make(chan struct{})
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go o.watchFollow(wctx, db, &applied, func() { close(stalled); it.Stop() })
	for {
		m, err := it.Next()
		if err != nil {
			select {
			case <-stalled:
				return fmt.Errorf("cluster: follow %s: %w", db, errFollowStalled)
			default:
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("cluster: follow %s: %w", db, err)
		}
		v, err := strconv.ParseUint(m.Headers().Get(headerVersion), 10, 64)
		if err != nil || v == 0 {
			return fmt.Errorf("%w: %s", ErrBadEntry, m.Subject())
		}
		switch {
		case v <= after:
			continue // the consumer started before it, or delivered it again
		case v != after+1:
			return fmt.Errorf("%w: %s: version %d after %d", server.ErrFollowGap, db, v, after)
		}
		if err := apply(v, m.Data()); err != nil {
			return err
		}
		after = v
		applied.Store(v)
	}
}

// followStall is how long a follower's consumer may hold back a version
// the subject's tail already has before it is made again.
const followStall = 2 * time.Second

// consumerCreateTimeout bounds the making of a follower's consumer (a few
// milliseconds on a sound cluster). On a node restarted a moment before it
// waited out the JetStream API's 5 s, and meanwhile the copy stood still
// and the acks of its replicas' forwarded pushes waited for their versions
// (one replica resumed 8.7 s after a kill in TestClusterFailover); bounded
// here, the follower catches up with direct reads between tries
// (server.Follower.Versions).
const consumerCreateTimeout = time.Second

// errFollowStalled is a consumer the watchdog dropped.
var errFollowStalled = errors.New("the consumer delivered nothing the subject holds; following again")

// watchFollow reads db's tail every followStall and calls stalled once if
// applied has not moved in a whole period while the tail was ahead of it.
func (o *Owner) watchFollow(ctx context.Context, db string, applied *atomic.Uint64, stalled func()) {
	t := time.NewTicker(followStall)
	defer t.Stop()
	prev, behind := applied.Load(), false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := applied.Load()
		if behind && now == prev {
			o.logger.Warn("the follower's consumer stalled behind the stream; following again", "db", db, "applied", now)
			stalled()
			return
		}
		lctx, cancel := context.WithTimeout(ctx, followStall)
		last, err := o.log.Last(lctx, db)
		cancel()
		prev, behind = now, err == nil && last.Version > now
	}
}

// seqAfter is the stream sequence to read db's versions after version
// after from: the sequence of version after+1's entry, or, if the subject
// does not reach it yet, the one after the subject's last entry. The
// subject's versions grow with their sequences, so it is found by a binary
// search of direct gets (about 20 for a million entries). ErrFollowGap if
// the subject's entries start after after+1 (trimmed behind a snapshot).
func (l *Log) seqAfter(ctx context.Context, db string, after uint64) (uint64, error) {
	last, err := l.Last(ctx, db)
	if err != nil {
		return 0, err
	}
	if last.Version <= after {
		return last.Seq + 1, nil
	}
	lo, hi := uint64(1), last.Seq
	for lo < hi {
		mid := lo + (hi-lo)/2
		es, err := l.Read(ctx, db, mid, 1)
		if err != nil {
			return 0, err
		}
		if len(es) == 0 {
			return 0, fmt.Errorf("cluster: %s: no entry at or after seq %d below its last (%d)", db, mid, last.Seq)
		}
		if es[0].Version > after {
			hi = mid
		} else {
			lo = es[0].Seq + 1
		}
	}
	es, err := l.Read(ctx, db, lo, 1)
	if err != nil {
		return 0, err
	}
	if len(es) == 0 {
		return 0, fmt.Errorf("cluster: %s: no entry at or after seq %d", db, lo)
	}
	if es[0].Version != after+1 {
		return 0, fmt.Errorf("%w: %s: the subject starts at version %d, not %d", server.ErrFollowGap, db, es[0].Version, after+1)
	}
	return es[0].Seq, nil
}

// notOwner wraps a lease held elsewhere as the server's ErrNotOwner, so
// that the server follows the database instead of failing its open.
func notOwner(err error) error {
	if errors.Is(err, ErrLeaseHeld) {
		return fmt.Errorf("%w: %w", server.ErrNotOwner, err)
	}
	return err
}

// Versions implements server.Follower: it reads db's records after version
// after, through version through (0: to the subject's end), with direct gets, as a restore does,
// and calls apply with each. No consumer: on a node that restarted a
// moment ago, creating one waited out its context (TestClusterFailover:
// two refills of a new owner's change log, a second each), while direct
// gets answered. server.ErrFollowGap: the subject does not hold them all.
func (o *Owner) Versions(ctx context.Context, db string, after, through uint64, apply func(version uint64, rec []byte) error) error {
	toTail := through == 0
	if toTail {
		through = math.MaxUint64
	}
	if after >= through {
		return nil
	}
	seq, err := o.log.seqAfter(ctx, db, after)
	if err != nil {
		return err
	}
	for after < through {
		es, err := o.log.Read(ctx, db, seq, int(min(through-after, restoreChunk)))
		if err != nil {
			return err
		}
		if len(es) == 0 {
			if toTail {
				return nil
			}
			return fmt.Errorf("%w: %s: the log ends before version %d", server.ErrFollowGap, db, after+1)
		}
		for _, e := range es {
			seq = e.Seq + 1
			switch {
			case e.Version <= after:
				continue
			case e.Version != after+1:
				return fmt.Errorf("%w: %s: version %d after %d", server.ErrFollowGap, db, e.Version, after)
			}
			if err := apply(e.Version, e.Rec); err != nil {
				return err
			}
			if after = e.Version; after == through {
				return nil
			}
		}
	}
	return nil
}
