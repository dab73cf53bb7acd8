package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// BenchmarkSavepointRebase is BenchmarkRebase of package replica on the
// savepoint engine: P pending demo mutations, each on a row of its own, and
// one server change by another client on another row, given as the SQL the
// demo mutator runs. A rebase ends with the same P mutations pending and the
// server's statement is an upsert, so every iteration starts from the same
// shape and needs no set-up.
func BenchmarkSavepointRebase(b *testing.B) {
	ctx := context.Background()
	for _, p := range []int{0, 1, 10, 100, 1000} {
		b.Run(fmt.Sprintf("pending=%d/server=1", p), func(b *testing.B) {
			e := openEngine(b, filepath.Join(b.TempDir(), "client.db"))
			// The server's version 1: the schema.
			if err := e.Rebase(ctx, []string{mutators.DemoSchema}, 0); err != nil {
				b.Fatal(err)
			}
			for i := range p {
				if err := e.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists,
					mutators.CategoryArgs(fmt.Sprintf("local-%d", i), 1)); err != nil {
					b.Fatal(err)
				}
			}
			server := DemoSQL("server", 1)
			b.ResetTimer()
			for range b.N {
				if err := e.Rebase(ctx, server, 0); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if got := count(b, e.Conn(), "server"); got != int64(b.N) {
				b.Fatalf("server row has count %d after %d rebases", got, b.N)
			}
			if e.Pending() != p {
				b.Fatalf("%d pending, want %d", e.Pending(), p)
			}
		})
	}
}
