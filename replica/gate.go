package replica

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// gate keeps readers out of a rebase. Readers pass while it is open; closing
// it waits for the readers inside to leave and holds new ones back, so a
// reader sees the state before a rebase or after it, never in between.
//
// A reader is a DB() connection that holds a SQLite read (or local write)
// transaction: from its statement's start until it is back in autocommit
// with no cursor open (see readConn). Each connection holds the gate at
// most once, however many statements it runs meanwhile.
//
// Lock order (see Replica): a rebase closes the gate before it takes the
// writer lock, and nothing that holds the writer lock ever waits for the
// gate. So a reader may call Mutate, Status, Pending or Handle while it
// holds the gate: they never wait for a rebase that waits for that reader.
//
// A reader that holds the gate on one connection and starts a statement on
// another (a second query on the pool while its first cursor is open) would
// deadlock against a plain RWMutex with a writer waiting. So close is
// patient only for a while: if the readers do not drain, it opens again for
// a moment, lets held-back readers through, and retries; after limit in all
// it gives up with ErrReadersBusy, naming who holds the gate.
type gate struct {
	mu      sync.Mutex
	holders map[*holder]struct{}
	closing bool
	closed  bool
	changed chan struct{} // closed and replaced on every state change
}

// holder is one reader inside the gate: which connection, since when, and
// why (what its transaction or cursor began with), for ErrReadersBusy.
type holder struct {
	conn  int64
	since time.Time
	what  atomic.Pointer[string]
}

func newHolder(conn int64, what string) *holder {
	h := &holder{conn: conn, since: time.Now()}
	h.what.Store(&what)
	return h
}

func (h *holder) describe() string {
	return fmt.Sprintf("DB() connection #%d has %s since %s", h.conn, *h.what.Load(), h.since.UTC().Format("15:04:05.000"))
}

func newGate() *gate { return &gate{changed: make(chan struct{}), holders: map[*holder]struct{}{}} }

// signal wakes everyone waiting on a state change. Call with g.mu held.
func (g *gate) signal() {
	close(g.changed)
	g.changed = make(chan struct{})
}

// enter waits until the gate is open and counts h in.
func (g *gate) enter(ctx context.Context, h *holder) error {
	g.mu.Lock()
	for g.closing || g.closed {
		ch := g.changed
		g.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		g.mu.Lock()
	}
	g.holders[h] = struct{}{}
	g.mu.Unlock()
	return nil
}

// leave counts h out.
func (g *gate) leave(h *holder) {
	g.mu.Lock()
	delete(g.holders, h)
	if len(g.holders) == 0 {
		g.signal()
	}
	g.mu.Unlock()
}

// readers is how many are inside.
func (g *gate) readers() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.holders)
}

// busyLocked says who holds the gate, oldest first. Call with g.mu held.
func (g *gate) busyLocked(waited time.Duration) error {
	hs := make([]*holder, 0, len(g.holders))
	for h := range g.holders {
		hs = append(hs, h)
	}
	sort.Slice(hs, func(i, j int) bool { return hs[i].since.Before(hs[j].since) })
	var b strings.Builder
	for i, h := range hs {
		if i == 3 {
			fmt.Fprintf(&b, "; and %d more", len(hs)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(h.describe())
	}
	return fmt.Errorf("%w: waited %s: %s", ErrReadersBusy, waited.Round(time.Millisecond), b.String())
}

// close waits until no reader is inside and keeps new ones out until open.
// patience bounds each wait for the readers to drain before backing off;
// limit bounds the whole wait (ErrReadersBusy), ctx too.
func (g *gate) close(ctx context.Context, patience, limit time.Duration) error {
	start := time.Now()
	giveUp := start.Add(limit)
	for {
		g.mu.Lock()
		g.closing = true
		deadline := time.Now().Add(patience)
		if deadline.After(giveUp) {
			deadline = giveUp
		}
		for len(g.holders) > 0 {
			remaining := time.Until(deadline)
			if remaining <= 0 {
				break
			}
			ch := g.changed
			g.mu.Unlock()
			t := time.NewTimer(remaining)
			select {
			case <-ch:
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				g.mu.Lock()
				g.closing = false
				g.signal()
				g.mu.Unlock()
				return ctx.Err()
			}
			t.Stop()
			g.mu.Lock()
		}
		if len(g.holders) == 0 {
			g.closing, g.closed = false, true
			g.mu.Unlock()
			return nil
		}
		// Back off: let held-back readers in so the ones inside can finish.
		g.closing = false
		g.signal()
		if !time.Now().Before(giveUp) {
			err := g.busyLocked(time.Since(start))
			g.mu.Unlock()
			return err
		}
		g.mu.Unlock()
		t := time.NewTimer(patience / 10)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}

// open lets readers in again.
func (g *gate) open() {
	g.mu.Lock()
	g.closed = false
	g.signal()
	g.mu.Unlock()
}
