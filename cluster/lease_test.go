package cluster

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func openLeases(t *testing.T, ttl time.Duration) *Leases {
	t.Helper()
	_, _, js := single(t)
	ls, err := OpenLeases(bounded(t, 20*time.Second), js, LeaseConfig{TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

// acquireWithin tries to acquire until it succeeds or d has passed, and
// returns how long it took.
func acquireWithin(t *testing.T, ls *Leases, db, holder string, d time.Duration) (*Lease, time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		le, err := ls.Acquire(bounded(t, 5*time.Second), db, holder)
		if err == nil {
			return le, time.Since(start)
		}
		if !errors.Is(err, ErrLeaseHeld) {
			t.Fatal(err)
		}
		if time.Since(start) > d {
			t.Fatalf("%s could not acquire %s within %v: %v", holder, db, d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLeaseHeldRenewedExpired(t *testing.T) {
	const ttl = time.Second
	ls := openLeases(t, ttl)
	ctx := bounded(t, 30*time.Second)
	a, err := ls.Acquire(ctx, "app.db", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Acquire(ctx, "app.db", "node-b"); !errors.Is(err, ErrLeaseHeld) || !strings.Contains(err.Error(), "node-a") {
		t.Fatalf("second acquire: %v, want ErrLeaseHeld naming node-a", err)
	}
	// Renewed every TTL/3, it outlives its TTL several times over: the
	// renewal carries the TTL and the CAS.
	for range 9 {
		time.Sleep(ttl / 3)
		if err := a.Renew(ctx); err != nil {
			t.Fatalf("renew: %v", err)
		}
	}
	if _, err := ls.Acquire(ctx, "app.db", "node-b"); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("acquire of a renewed lease after 3 TTLs: %v, want ErrLeaseHeld", err)
	}
	if !a.Valid() {
		t.Fatal("a renewed lease is not valid")
	}
	// Not renewed, it expires: another node takes it, within a bound.
	b, took := acquireWithin(t, ls, "app.db", "node-b", 5*ttl)
	t.Logf("lease taken over %v after the last renewal's wait began", took)
	if a.Valid() {
		t.Fatal("the holder still counts on a lease it did not renew for a TTL")
	}
	if err := a.Renew(ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("the old holder's renewal: %v, want ErrLeaseLost", err)
	}
	if who, _, err := ls.Holder(ctx, "app.db"); err != nil || who != "node-b" {
		t.Fatalf("holder = %q, %v; want node-b", who, err)
	}
	if err := b.Renew(ctx); err != nil {
		t.Fatalf("the new holder's renewal: %v", err)
	}
	// The old holder's release cannot delete the new holder's lease.
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if who, _, _ := ls.Holder(ctx, "app.db"); who != "node-b" {
		t.Fatalf("after the old holder's release, holder = %q", who)
	}
}

func TestLeaseRenewRefusedWhenTakenOver(t *testing.T) {
	ls := openLeases(t, time.Second)
	ctx := bounded(t, 30*time.Second)
	a, err := ls.Acquire(ctx, "db", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	// Someone writes the key under the holder (an operator, a bug): the
	// CAS refuses the holder's renewal, and the lease is lost for good.
	if _, err := ls.kv.Put(ctx, "db", []byte("node-x")); err != nil {
		t.Fatal(err)
	}
	if err := a.Renew(ctx); !errors.Is(err, ErrLeaseLost) || !strings.Contains(err.Error(), "node-x") {
		t.Fatalf("renew after a takeover: %v, want ErrLeaseLost naming node-x", err)
	}
	if err := a.Renew(ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("second renew: %v, want ErrLeaseLost", err)
	}
	if a.Valid() {
		t.Fatal("a lost lease is valid")
	}
}

func TestLeaseReleaseLetsAnotherInAtOnce(t *testing.T) {
	ls := openLeases(t, 30*time.Second) // far longer than the test: only a release lets b in
	ctx := bounded(t, 20*time.Second)
	a, err := ls.Acquire(ctx, "db", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Acquire(ctx, "db", "node-b"); err != nil {
		t.Fatalf("acquire after release: %v", err)
	}
	if err := a.Renew(ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("renew after release: %v, want ErrLeaseLost", err)
	}
}

func TestLeaseRunKeepsItAndReportsLoss(t *testing.T) {
	const ttl = time.Second
	ls := openLeases(t, ttl)
	ctx := bounded(t, 30*time.Second)
	a, err := ls.Acquire(ctx, "db", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan error, 1)
	rctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan struct{})
	go func() { a.Run(rctx, func(err error) { lost <- err }); close(done) }()
	time.Sleep(3 * ttl)
	if _, err := ls.Acquire(ctx, "db", "node-b"); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("acquire while Run renews: %v, want ErrLeaseHeld", err)
	}
	if err := ls.kv.Delete(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-lost:
		if !errors.Is(err, ErrLeaseLost) {
			t.Fatalf("lost with %v", err)
		}
	case <-time.After(3 * ttl):
		t.Fatal("Run did not report the lost lease within 3 TTLs")
	}
	select {
	case <-done:
	case <-time.After(ttl):
		t.Fatal("Run did not return after the loss")
	}
}

func TestLeaseTTLBelowMinimumRefused(t *testing.T) {
	_, _, js := single(t)
	if _, err := OpenLeases(bounded(t, 10*time.Second), js, LeaseConfig{TTL: 100 * time.Millisecond}); err == nil {
		t.Fatal("a 100 ms lease TTL was accepted")
	}
}
