package server

import (
	"context"
	"fmt"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// Bookkeeping collection. The reserved tables grow with every client that
// ever pushed (its last mutation id) and every rejection; a client that
// never comes back would keep its rows forever. The server records each
// client's last push (mutators.TableActivity, to the hour) and, at most
// once per CollectEvery, deletes the records of clients away longer than
// ClientTTL. The deletion is a change to the replicated database, so it is
// made inside a batch the writer commits anyway: it ships to replicas in
// that version like any other change.
const (
	// DefaultClientTTL is how long after its last push a client's records
	// are kept (30 days).
	DefaultClientTTL = 30 * 24 * time.Hour
	// CollectEvery is the least time between two collections.
	CollectEvery = time.Hour
)

// gcState is the authority's collection schedule (guarded by its mu).
type gcState struct {
	last time.Time // when the last committed collection ran (zero: never)
	due  bool      // the batch in progress ran a collection
}

// collectDue decides whether a batch at now runs a collection: never with
// a negative ttl, otherwise once per CollectEvery.
func collectDue(ttl time.Duration, last, now time.Time) bool {
	return ttl >= 0 && (last.IsZero() || now.Sub(last) >= CollectEvery)
}

// now is the authority's clock (AuthorityOptions.Now).
func (a *Authority) now() time.Time {
	if a.opts.Now != nil {
		return a.opts.Now()
	}
	return time.Now()
}

// bookkeep runs in a batch's transaction: it records the push time of
// the clients that pushed, and collects the records of clients away
// longer than the TTL if a collection is due.
func (a *Authority) bookkeep(ctx context.Context, clients map[string]uint64) error {
	now := a.now()
	for c := range clients {
		if err := mutators.TouchClient(ctx, a.q, c, now.Unix()); err != nil {
			return err
		}
	}
	a.gc.due = collectDue(a.opts.ClientTTL, a.gc.last, now)
	if !a.gc.due {
		return nil
	}
	if _, err := mutators.CollectClients(ctx, a.q, now.Unix(), now.Add(-a.opts.ClientTTL).Unix()); err != nil {
		return fmt.Errorf("collect clients: %w", err)
	}
	return nil
}

// collected notes a batch's commit: its collection, if it ran one, counts.
func (a *Authority) collected() {
	if a.gc.due {
		a.gc.last, a.gc.due = a.now(), false
	}
}

// upgradeReserved adds the reserved tables a database made by an older
// build lacks, as a version of its own.
func (a *Authority) upgradeReserved(ctx context.Context) error {
	ok, err := mutators.HasActivityTable(ctx, a.conn)
	if err != nil || ok {
		return err
	}
	if _, err := a.commit(ctx, func(tx mutators.Tx) error {
		_, err := tx.Exec(mutators.ReservedSchema)
		return err
	}); err != nil {
		return fmt.Errorf("add %s: %w", mutators.TableActivity, err)
	}
	return nil
}
