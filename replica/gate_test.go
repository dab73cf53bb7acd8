package replica

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

func TestGateWaitsForReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		g := newGate()
		if err := g.enter(ctx); err != nil {
			t.Fatal(err)
		}
		closed := make(chan error, 1)
		go func() { closed <- g.close(ctx, time.Hour) }()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("gate closed with a reader inside")
		default:
		}
		// A new reader is held back while the gate is closing.
		entered := make(chan error, 1)
		go func() { entered <- g.enter(ctx) }()
		synctest.Wait()
		select {
		case <-entered:
			t.Fatal("reader entered a closing gate")
		default:
		}
		g.leave()
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		select {
		case <-entered:
			t.Fatal("reader entered a closed gate")
		default:
		}
		g.open()
		if err := <-entered; err != nil {
			t.Fatal(err)
		}
		g.leave()
	})
}

// A reader that holds the gate and enters again (a second query while its
// first is open) must not deadlock against a closing gate: close backs off
// after its patience and lets it through.
func TestGateNestedReaderDoesNotDeadlock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		g := newGate()
		g.enter(ctx)
		closed := make(chan error, 1)
		go func() { closed <- g.close(ctx, 50*time.Millisecond) }()
		synctest.Wait()
		if err := g.enter(ctx); err != nil { // nested: waits out the patience
			t.Fatal(err)
		}
		g.leave()
		g.leave()
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		g.open()
	})
}

func TestGateCloseHonoursContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		g.enter(context.Background())
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := g.close(ctx, 50*time.Millisecond); err == nil {
			t.Fatal("close returned without the reader leaving")
		}
		// The gate is usable again.
		if err := g.enter(context.Background()); err != nil {
			t.Fatal(err)
		}
		g.leave()
		g.leave()
	})
}
