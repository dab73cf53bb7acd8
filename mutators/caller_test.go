package mutators

import (
	"context"
	"errors"
	"testing"
)

type otherKey struct{}

// TestCaller: CallerFrom finds the innermost caller, nothing where none was
// set, and the wrapper passes other values, cancellation and its cause
// through to the parent.
func TestCaller(t *testing.T) {
	if _, ok := CallerFrom(context.Background()); ok {
		t.Fatal("a caller in a bare context")
	}
	cause := errors.New("stopped")
	parent, cancel := context.WithCancelCause(context.WithValue(context.Background(), otherKey{}, "v"))
	outer := WithCaller(parent, Caller{ClientID: "c1", UserID: "alice", Claims: map[string]any{"role": "admin"}})
	inner := WithCaller(outer, Caller{ClientID: "c2", UserID: "bob"})
	if c, ok := CallerFrom(outer); !ok || c.ClientID != "c1" || c.UserID != "alice" || c.Claims["role"] != "admin" {
		t.Fatalf("outer caller %+v, %v", c, ok)
	}
	if c, ok := CallerFrom(inner); !ok || c.ClientID != "c2" || c.UserID != "bob" || c.Claims != nil {
		t.Fatalf("inner caller %+v, %v", c, ok)
	}
	if inner.Value(otherKey{}) != "v" {
		t.Fatal("the wrapper hides the parent's values")
	}
	if inner.Err() != nil {
		t.Fatal("done before the parent")
	}
	cancel(cause)
	<-inner.Done()
	if !errors.Is(inner.Err(), context.Canceled) || context.Cause(inner) != cause {
		t.Fatalf("after cancel: err %v, cause %v", inner.Err(), context.Cause(inner))
	}
}
