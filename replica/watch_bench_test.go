package replica

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// BenchmarkLiveQueries: 1,000 live queries over 100 tables, and a one-row
// server change to one table. It reports the time from the version's
// arrival (Rebase) to the last affected delivery, how many queries re-ran,
// and, in the same run, the time to re-run all 1,000 (the naive way).
func BenchmarkLiveQueries(b *testing.B) {
	const tables, queries = 100, 1000
	ctx := context.Background()
	reg := testRegistry(b)
	a, err := server.OpenAuthority(ctx, filepath.Join(b.TempDir(), "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
		var ddl strings.Builder
		for i := 0; i < tables; i++ {
			fmt.Fprintf(&ddl, "CREATE TABLE t%d (id INTEGER PRIMARY KEY, v INTEGER); INSERT INTO t%d VALUES (1, 0);", i, i)
		}
		_, err := tx.Exec(ddl.String())
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	r := openReplica(b, filepath.Join(b.TempDir(), "r.db"), reg)
	other := openReplica(b, filepath.Join(b.TempDir(), "o.db"), reg)
	catchUp(b, a, r)
	catchUp(b, a, other)
	qs := make([]*LiveQuery, queries)
	for i := range qs {
		if qs[i], err = r.Watch(ctx, fmt.Sprintf("SELECT id, v, %d FROM t%d", i, i%tables)); err != nil {
			b.Fatal(err)
		}
		defer qs[i].Close()
	}
	for _, q := range qs {
		if _, err := q.Next(ctx); err != nil {
			b.Fatal(err)
		}
	}
	// Build the page map (the first version with watchers re-runs all).
	catchUp(b, a, other)
	mustMutate(b, other, "exec", execArgs("UPDATE t1 SET v = v + 1"))
	push(b, a, other)
	catchUp(b, a, r)
	for i := 1; i < queries; i += tables {
		qs[i].Next(ctx)
	}
	time.Sleep(200 * time.Millisecond)
	var deliver, naive time.Duration
	var runs int64
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		before := int64(0)
		for _, q := range qs {
			before += q.runs.Load()
		}
		mustMutate(b, other, "exec", execArgs("UPDATE t0 SET v = v + 1"))
		sets, err := a.Since(r.Status().Version)
		if err != nil {
			b.Fatal(err)
		}
		if ps := push(b, a, other); ps != nil {
			sets = append(sets, ps)
		}
		start := time.Now()
		if err := r.Rebase(ctx, sets...); err != nil {
			b.Fatal(err)
		}
		for i := 0; i < queries; i += tables {
			if _, err := qs[i].Next(ctx); err != nil {
				b.Fatal(err)
			}
		}
		deliver += time.Since(start)
		b.StopTimer()
		time.Sleep(50 * time.Millisecond) // let any stray re-run show
		after := int64(0)
		for _, q := range qs {
			after += q.runs.Load()
		}
		runs += after - before
		// The naive way: re-run every query.
		start = time.Now()
		for _, q := range qs {
			rows, err := r.DB().QueryContext(ctx, q.query)
			if err != nil {
				b.Fatal(err)
			}
			for rows.Next() {
			}
			rows.Close()
		}
		naive += time.Since(start)
		catchUp(b, a, other)
		b.StartTimer()
	}
	b.ReportMetric(float64(deliver.Microseconds())/float64(b.N), "µs-to-last-delivery")
	b.ReportMetric(float64(runs)/float64(b.N), "queries-rerun")
	b.ReportMetric(float64(naive.Microseconds())/float64(b.N), "µs-rerun-all-1000")
}
