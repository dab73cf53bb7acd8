package server

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// mutatorLimit is the context a mutator runs under when the writer's own
// context can never be cancelled (the network server's writer): one
// deadline, armed before each mutator and disarmed after it, with one timer
// for the authority's life. context.WithTimeout per mutator cost 6% of the
// writer's CPU at 70,000 mutations/s (a timer and a channel each); arming
// this one costs a timer Reset. Once it fires, the next arm makes a new one:
// a context that is done stays done.
type mutatorLimit struct {
	context.Context // the writer's: never done
	timer           *time.Timer
	done            chan struct{}
	once            sync.Once
	fired           atomic.Bool
}

func newMutatorLimit(parent context.Context) *mutatorLimit {
	l := &mutatorLimit{Context: parent, done: make(chan struct{})}
	l.timer = time.AfterFunc(time.Hour, l.fire)
	l.timer.Stop()
	return l
}

func (l *mutatorLimit) fire() {
	l.once.Do(func() {
		l.fired.Store(true)
		close(l.done)
	})
}

// Done is closed when the limit fires.
func (l *mutatorLimit) Done() <-chan struct{} { return l.done }

// Err is context.DeadlineExceeded once the limit fired. go-sqlite3's
// progress handler calls it while a statement runs: an atomic load.
func (l *mutatorLimit) Err() error {
	if l.fired.Load() {
		return context.DeadlineExceeded
	}
	return nil
}

// arm starts the limit for the next mutator and returns the context to run
// it under: l, or a new limit if l has fired.
func (l *mutatorLimit) arm(d time.Duration) *mutatorLimit {
	if l.fired.Load() {
		l = newMutatorLimit(l.Context)
	}
	l.timer.Reset(d)
	return l
}

// disarm stops the limit and reports whether it fired.
func (l *mutatorLimit) disarm() (fired bool) {
	l.timer.Stop()
	return l.fired.Load()
}
