package replica

import (
	"context"
	"errors"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

func TestGateWaitsForReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		g := newGate()
		h1, h2 := newHolder(1, "test"), newHolder(2, "test")
		if err := g.enter(ctx, h1); err != nil {
			t.Fatal(err)
		}
		closed := make(chan error, 1)
		go func() { closed <- g.close(ctx, time.Hour, 10*time.Hour) }()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("gate closed with a reader inside")
		default:
		}
		// A new reader is held back while the gate is closing.
		entered := make(chan error, 1)
		go func() { entered <- g.enter(ctx, h2) }()
		synctest.Wait()
		select {
		case <-entered:
			t.Fatal("reader entered a closing gate")
		default:
		}
		g.leave(h1)
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
		g.leave(h2)
	})
}

// A reader that holds the gate and enters again (a second query while its
// first is open) must not deadlock against a closing gate: close backs off
// after its patience and lets it through.
func TestGateNestedReaderDoesNotDeadlock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		g := newGate()
		h1, h2 := newHolder(1, "test"), newHolder(2, "test")
		g.enter(ctx, h1)
		closed := make(chan error, 1)
		go func() { closed <- g.close(ctx, 50*time.Millisecond, time.Hour) }()
		synctest.Wait()
		if err := g.enter(ctx, h2); err != nil { // nested: waits out the patience
			t.Fatal(err)
		}
		g.leave(h2)
		g.leave(h1)
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		g.open()
	})
}

func TestGateCloseHonoursContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h1, h2 := newHolder(1, "test"), newHolder(2, "test")
		g.enter(context.Background(), h1)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := g.close(ctx, 50*time.Millisecond, time.Hour); err == nil {
			t.Fatal("close returned without the reader leaving")
		}
		// The gate is usable again.
		if err := g.enter(context.Background(), h2); err != nil {
			t.Fatal(err)
		}
		g.leave(h2)
		g.leave(h1)
	})
}

// A reader that never leaves makes close give up after its limit with
// ErrReadersBusy, naming the connection; the gate is open again.
func TestGateCloseGivesUpAfterLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := newHolder(3, `been in a transaction (began with Exec("BEGIN"))`)
		g.enter(context.Background(), h)
		err := g.close(context.Background(), 50*time.Millisecond, time.Second)
		if !errors.Is(err, ErrReadersBusy) {
			t.Fatalf("close: %v, want ErrReadersBusy", err)
		}
		if !strings.Contains(err.Error(), "DB() connection #3") || !strings.Contains(err.Error(), `Exec("BEGIN")`) {
			t.Fatalf("error does not say who holds the gate: %v", err)
		}
		h2 := newHolder(4, "test")
		if err := g.enter(context.Background(), h2); err != nil {
			t.Fatal(err)
		}
		g.leave(h2)
		g.leave(h)
		if g.readers() != 0 {
			t.Fatal("readers left behind")
		}
	})
}
