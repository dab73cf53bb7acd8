package main

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// mailbox is an unbounded FIFO that pipes deliver into and one consumer
// drains. It is unbounded so that a slow consumer (a rebase in progress)
// never blocks the simulated wire, and so that the consumer can take every
// message that is waiting at once: a replica rebases on all the versions
// that have arrived in one go, as the design asks.
type mailbox[T any] struct {
	mu    sync.Mutex
	items []T
	ready chan struct{} // capacity 1: "something arrived since the last take"
}

func newMailbox[T any]() *mailbox[T] {
	return &mailbox[T]{ready: make(chan struct{}, 1)}
}

// put appends v and wakes the consumer.
func (m *mailbox[T]) put(v T) {
	m.mu.Lock()
	m.items = append(m.items, v)
	m.mu.Unlock()
	select {
	case m.ready <- struct{}{}:
	default:
	}
}

// takeAll removes and returns everything waiting, oldest first.
func (m *mailbox[T]) takeAll() []T {
	m.mu.Lock()
	defer m.mu.Unlock()
	items := m.items
	m.items = nil
	return items
}

// network counts the messages that are on a wire or waiting in a mailbox,
// so that the demo can tell when everything has settled. A message counts
// until its consumer calls done: "delivered" is not "handled".
type network struct {
	inFlight atomic.Int64
}

// done marks n messages as handled by their consumer.
func (n *network) done(count int) { n.inFlight.Add(-int64(count)) }

// idle reports whether no message is on a wire or waiting to be handled.
func (n *network) idle() bool { return n.inFlight.Load() == 0 }

// timed is a message with the time it reaches the other end.
type timed[T any] struct {
	at time.Time
	v  T
}

// pipe is one direction of a simulated link: every message arrives latency
// after it was sent, in the order sent (the latency is the same for all
// messages of a pipe, so FIFO order and arrival order agree).
type pipe[T any] struct {
	net     *network
	latency time.Duration
	to      *mailbox[T]

	mu   sync.Mutex
	q    []timed[T]
	wake chan struct{} // capacity 1: the queue went from empty to non-empty
}

func newPipe[T any](net *network, latency time.Duration, to *mailbox[T]) *pipe[T] {
	return &pipe[T]{net: net, latency: latency, to: to, wake: make(chan struct{}, 1)}
}

// send puts v on the wire. It never blocks: a sender must not be slowed
// down by the latency of its link.
func (p *pipe[T]) send(v T) {
	p.net.inFlight.Add(1)
	p.mu.Lock()
	p.q = append(p.q, timed[T]{at: time.Now().Add(p.latency), v: v})
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// run delivers messages as their time comes until ctx ends. Messages still
// on the wire then are lost, as on a real network that goes down.
func (p *pipe[T]) run(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		p.mu.Lock()
		if len(p.q) == 0 {
			p.mu.Unlock()
			select {
			case <-p.wake:
				continue
			case <-ctx.Done():
				return
			}
		}
		head := p.q[0]
		if wait := time.Until(head.at); wait > 0 {
			p.mu.Unlock()
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				return
			}
			continue
		}
		p.q = p.q[1:]
		p.mu.Unlock()
		p.to.put(head.v)
	}
}

// link is the simulated connection between one client and the authority:
// two pipes with the same latency.
type link[Up, Down any] struct {
	up   *pipe[Up]
	down *pipe[Down]
}

// run runs both directions until ctx ends.
func (l *link[Up, Down]) run(ctx context.Context, wg *sync.WaitGroup) {
	wg.Go(func() { l.up.run(ctx) })
	wg.Go(func() { l.down.run(ctx) })
}
