package server

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// fakeClock is a settable clock for Config.Now / AuthorityOptions.Now.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

func TestCollectDue(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		ttl       time.Duration
		last, now time.Time
		want      bool
	}{
		{DefaultClientTTL, time.Time{}, t0, true},
		{DefaultClientTTL, t0, t0.Add(CollectEvery - time.Second), false},
		{DefaultClientTTL, t0, t0.Add(CollectEvery), true},
		{-1, time.Time{}, t0, false},
		{-1, t0, t0.Add(48 * time.Hour), false},
	}
	for _, c := range cases {
		if got := collectDue(c.ttl, c.last, c.now); got != c.want {
			t.Errorf("collectDue(%v, %v, %v) = %v, want %v", c.ttl, c.last, c.now, got, c.want)
		}
	}
}

func rowsOf(t *testing.T, a *Authority, table, client string) int {
	t.Helper()
	var n int
	if err := a.conn.QueryRowContext(context.Background(), `SELECT count(*) FROM `+table+` WHERE client_id = ?`, client).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCollectClients: with an injected clock, the records of a client away
// longer than ClientTTL (its last mutation id, rejections and activity)
// are deleted by a later batch, in that batch's version; a client that
// pushed within the TTL keeps its records, and a collection runs at most
// once per CollectEvery.
func TestCollectClients(t *testing.T) {
	clock := newFakeClock()
	a, err := OpenAuthorityWith(context.Background(), filepath.Join(t.TempDir(), "server.db"), testRegistry(t), demoSetup,
		AuthorityOptions{ClientTTL: 30 * 24 * time.Hour, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	push(t, a, upsert("alice", 1, "Food", 1), Mutation{ClientID: "alice", ID: 2, Name: "fail"}, upsert("bob", 1, "Food", 1))
	if rowsOf(t, a, mutators.TableRejections, "alice") != 1 || rowsOf(t, a, mutators.TableClients, "alice") != 1 {
		t.Fatal("alice's records were not written")
	}
	clock.Advance(29 * 24 * time.Hour)
	push(t, a, upsert("bob", 2, "Food", 1)) // bob stays; alice is 29 days away: kept
	if rowsOf(t, a, mutators.TableClients, "alice") != 1 {
		t.Fatal("alice collected before her TTL")
	}
	clock.Advance(2 * 24 * time.Hour)
	v := a.Version()
	push(t, a, upsert("bob", 3, "Food", 1))
	for _, tb := range []string{mutators.TableClients, mutators.TableRejections, mutators.TableActivity} {
		if n := rowsOf(t, a, tb, "alice"); n != 0 {
			t.Fatalf("%s still has %d rows of alice", tb, n)
		}
	}
	if rowsOf(t, a, mutators.TableClients, "bob") != 1 || a.Version() != v+1 {
		t.Fatalf("bob's records, or the version (%d after %d)", a.Version(), v)
	}
	if lmid, _ := mutators.LastMutationID(context.Background(), a.conn, "alice"); lmid != 0 {
		t.Fatalf("alice's last mutation id %d after collection", lmid)
	}
	// Within the hour, no collection: carol is 31 days old (her row is
	// written by hand), but stays until an hour has passed.
	if _, err := a.conn.ExecContext(context.Background(), `INSERT INTO `+mutators.TableActivity+` VALUES ('carol', ?)`, clock.Now().Add(-31*24*time.Hour).Unix()); err != nil {
		t.Fatal(err)
	}
	clock.Advance(30 * time.Minute)
	push(t, a, upsert("bob", 4, "Food", 1))
	if rowsOf(t, a, mutators.TableActivity, "carol") != 1 {
		t.Fatal("collected twice within CollectEvery")
	}
	clock.Advance(30 * time.Minute)
	push(t, a, upsert("bob", 5, "Food", 1))
	if rowsOf(t, a, mutators.TableActivity, "carol") != 0 {
		t.Fatal("not collected after CollectEvery")
	}
}
