package replica

import (
	"context"
	"fmt"
	"sync"
)

// RejectedError is the outcome of a mutation the server rejected: its
// mutator failed there. The mutation counts as processed; its optimistic
// effect is gone after the rebase that brought the rejection.
type RejectedError struct {
	ID      uint64
	Name    string
	Message string // the server mutator's error
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("mutation %d (%s) rejected by the server: %s", e.ID, e.Name, e.Message)
}

// Handle follows one mutation until the server settles it.
type Handle struct {
	// ID is the mutation's id: gap-free per client, starting at 1.
	ID uint64
	// Name is the mutator's name.
	Name string

	mu       sync.Mutex
	localErr error
	done     chan struct{}
	result   error
	// fatal is the replica's fatal sync error: once set, the server will
	// not settle the mutation in this replica's life, and Wait says why.
	fatal *fatalSignal
}

func newHandle(id uint64, name string) *Handle {
	return &Handle{ID: id, Name: name, done: make(chan struct{})}
}

// LocalErr is the error of the mutator's latest local run (at Mutate, or at
// the latest replay), or nil. A local error does not stop the mutation: the
// server decides.
func (h *Handle) LocalErr() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.localErr
}

func (h *Handle) setLocalErr(err error) {
	h.mu.Lock()
	h.localErr = err
	h.mu.Unlock()
}

// Done is closed when the server has settled the mutation.
func (h *Handle) Done() <-chan struct{} { return h.done }

// Wait blocks until the server settles the mutation or ctx ends. It returns
// nil when the server applied it, a *RejectedError when the server's mutator
// failed, ErrClosed if the replica was closed first, the error that stopped
// the replica's sync loop (a refusal such as a wrong credential: the
// mutation stays queued for a later Open), or ctx's error.
func (h *Handle) Wait(ctx context.Context) error {
	select {
	case <-h.done:
		return h.outcome()
	case <-h.fatal.done():
		select {
		case <-h.done: // settled after all: that is the answer
			return h.outcome()
		default:
			return h.fatal.err
		}
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (h *Handle) outcome() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.result
}

func (h *Handle) settle(result error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.done:
		return
	default:
	}
	h.result = result
	close(h.done)
}
