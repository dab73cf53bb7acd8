package replica

import (
	"context"
	"sync"
	"time"
)

// gate keeps readers out of a rebase. Readers pass while it is open; closing
// it waits for the readers inside to leave and holds new ones back, so a
// reader sees the state before a rebase or after it, never in between.
//
// A reader that already holds the gate and enters again (a second query
// while its first is open) would deadlock against a plain RWMutex with a
// writer waiting. So close is patient only for a while: if the readers do not
// drain, it opens again for a moment, lets held-back readers through, and
// retries.
type gate struct {
	mu      sync.Mutex
	readers int
	closing bool
	closed  bool
	changed chan struct{} // closed and replaced on every state change
}

func newGate() *gate { return &gate{changed: make(chan struct{})} }

// signal wakes everyone waiting on a state change. Call with g.mu held.
func (g *gate) signal() {
	close(g.changed)
	g.changed = make(chan struct{})
}

// enter waits until the gate is open and counts the caller in.
func (g *gate) enter(ctx context.Context) error {
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
	g.readers++
	g.mu.Unlock()
	return nil
}

// leave counts a reader out.
func (g *gate) leave() {
	g.mu.Lock()
	g.readers--
	if g.readers == 0 {
		g.signal()
	}
	g.mu.Unlock()
}

// close waits until no reader is inside and keeps new ones out until open.
// patience bounds each wait for the readers to drain before backing off.
func (g *gate) close(ctx context.Context, patience time.Duration) error {
	for {
		g.mu.Lock()
		g.closing = true
		deadline := time.Now().Add(patience)
		for g.readers > 0 {
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
		if g.readers == 0 {
			g.closing, g.closed = false, true
			g.mu.Unlock()
			return nil
		}
		// Back off: let held-back readers in so the ones inside can finish.
		g.closing = false
		g.signal()
		g.mu.Unlock()
		select {
		case <-time.After(patience / 10):
		case <-ctx.Done():
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
