package server

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// BenchmarkCallerCost puts the price of carrying the caller into every
// server mutator beside the price of a mutation, in the same run:
//
//   - "push" is one demo mutation in a batch of 200 through Authority.Push
//     under the writer's never-done context (the reusable deadline path),
//     caller included: ns/op is per mutation;
//   - "wrap" is what runMutator adds for the caller: WithCaller on top of
//     the armed deadline, a CallerFrom and an Err through the wrapper (as
//     a mutator and go-sqlite3's progress handler make).
//
// The ratio wrap/push is the share of a mutation's time the caller costs.
func BenchmarkCallerCost(b *testing.B) {
	b.Run("push", func(b *testing.B) {
		a, err := OpenAuthority(context.Background(), filepath.Join(b.TempDir(), "server.db"), testRegistry(b), demoSetup)
		if err != nil {
			b.Fatal(err)
		}
		defer a.Close()
		const batch = 200
		ctx := context.Background()
		id := uint64(0)
		ms := make([]Mutation, batch)
		b.ResetTimer()
		for done := 0; done < b.N; done += batch {
			for i := range ms {
				id++
				ms[i] = upsert("c1", id, fmt.Sprintf("cat-%d", i%3), 1)
				ms[i].UserID, ms[i].Claims = "alice", map[string]any{"sub": "alice"}
			}
			if _, _, err := a.Push(ctx, ms); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("wrap", func(b *testing.B) {
		l := newMutatorLimit(context.Background()).arm(DefaultMutatorTimeout)
		defer l.disarm()
		m := Mutation{ClientID: "c1", UserID: "alice", Claims: map[string]any{"sub": "alice"}}
		b.ReportAllocs()
		for b.Loop() {
			ctx := mutators.WithCaller(l, m.caller())
			if c, ok := mutators.CallerFrom(ctx); !ok || c.UserID != "alice" {
				b.Fatal("no caller")
			}
			if ctx.Err() != nil {
				b.Fatal("limit fired")
			}
		}
	})
}
