package mutators_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// BenchmarkDemoMutator is the demo mutator as the server's writer runs it,
// without the network, the commit or its fsync: Registry.Run on a Tx over
// a statement cache, inside one transaction per 1,000 mutations, three
// categories taking turns (so nearly every run is the upsert's update).
// ns/op is one mutation.
func BenchmarkDemoMutator(b *testing.B) {
	ctx := context.Background()
	db := openDB(b)
	conn, err := db.Conn(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	for _, q := range []string{"PRAGMA journal_mode=WAL", "PRAGMA synchronous=OFF", mutators.DemoSchema} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			b.Fatal(err)
		}
	}
	r := mutators.NewRegistry()
	if err := mutators.RegisterDemo(r); err != nil {
		b.Fatal(err)
	}
	q := mutators.NewStmtCache(conn, 16)
	defer q.Close()
	args := make([][]byte, 3)
	for i := range args {
		args[i] = mutators.CategoryArgs(fmt.Sprintf("cat-%d", i), 1)
	}
	if _, err := conn.ExecContext(ctx, "BEGIN"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := r.Run(ctx, mutators.NewTx(ctx, q), mutators.CreateCategoryOrIncrementIfExists, args[i%3]); err != nil {
			b.Fatal(err)
		}
		if i%1000 == 999 {
			if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
				b.Fatal(err)
			}
			if _, err := conn.ExecContext(ctx, "BEGIN"); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
		b.Fatal(err)
	}
}
