package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// LiveResult is one sample of RunLive.
type LiveResult struct {
	// Deliver is from the version's arrival (the rebase starting) to the
	// last affected live query's new result.
	Deliver time.Duration
	// Reran is how many live queries ran again for the change.
	Reran int64
	// Naive is the time to re-run every query, the way an app without live
	// queries reacts to OnChange.
	Naive time.Duration
}

// RunLive measures live queries: queries live queries spread over tables
// tables, and samples one-row server changes to one table, each applied by a
// rebase; per sample, the time to the last affected delivery, how many
// queries re-ran, and the time to re-run them all.
func RunLive(ctx context.Context, dir string, tables, queries, samples int) ([]LiveResult, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return nil, err
	}
	a, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
		var ddl strings.Builder
		for i := range tables {
			fmt.Fprintf(&ddl, "CREATE TABLE t%d (id INTEGER PRIMARY KEY, v INTEGER); INSERT INTO t%d VALUES (1, 0);", i, i)
		}
		_, err := tx.Exec(ddl.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	defer a.Close()
	r, err := replica.Open(ctx, filepath.Join(dir, "replica.db"), replica.Options{Mutators: reg})
	if err != nil {
		return nil, err
	}
	defer r.Close()
	catchUp := func() error {
		sets, err := a.Since(r.Status().Version)
		if err != nil {
			return err
		}
		return r.Rebase(ctx, sets...)
	}
	change := func(table int) error {
		_, err := a.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(fmt.Sprintf("UPDATE t%d SET v = v + 1", table))
			return err
		})
		return err
	}
	if err := catchUp(); err != nil {
		return nil, err
	}
	qs := make([]*replica.LiveQuery, queries)
	defer func() {
		for _, q := range qs {
			if q != nil {
				q.Close()
			}
		}
	}()
	for i := range qs {
		if qs[i], err = r.Watch(ctx, fmt.Sprintf("SELECT id, v, %d FROM t%d", i, i%tables)); err != nil {
			return nil, err
		}
		if _, err := qs[i].Next(ctx); err != nil {
			return nil, err
		}
	}
	// The first version with live queries open builds the page map and
	// re-runs them all: not a sample.
	if err := change(1 % tables); err != nil {
		return nil, err
	}
	if err := catchUp(); err != nil {
		return nil, err
	}
	for i := 1 % tables; i < queries; i += tables {
		if _, err := qs[i].Next(ctx); err != nil {
			return nil, err
		}
	}
	time.Sleep(200 * time.Millisecond)
	runs := func() (n int64) {
		for _, q := range qs {
			n += q.Runs()
		}
		return n
	}
	var out []LiveResult
	for range samples {
		before := runs()
		if err := change(0); err != nil {
			return nil, err
		}
		start := time.Now()
		if err := catchUp(); err != nil {
			return nil, err
		}
		for i := 0; i < queries; i += tables {
			if _, err := qs[i].Next(ctx); err != nil {
				return nil, err
			}
		}
		var s LiveResult
		s.Deliver = time.Since(start)
		time.Sleep(50 * time.Millisecond) // let a stray re-run show
		s.Reran = runs() - before
		start = time.Now()
		for i := range queries {
			rows, err := r.DB().QueryContext(ctx, fmt.Sprintf("SELECT id, v, %d FROM t%d", i, i%tables))
			if err != nil {
				return nil, err
			}
			for rows.Next() {
			}
			rows.Close()
		}
		s.Naive = time.Since(start)
		out = append(out, s)
	}
	return out, nil
}

// LiveSection is the live-query section of the suite: 1,000 live queries
// over 100 tables and a one-row server change to one table, against
// re-running all 1,000 in the same run.
func LiveSection(samples int) Section {
	return Section{Name: "live", Run: func(ctx context.Context, env *Env) ([]Result, error) {
		var ours, naive, reran []float64
		for run := range max(1, env.Config.Runs) {
			env.Progress("live: run %d", run+1)
			res, err := RunLive(ctx, filepath.Join(env.Dir, fmt.Sprintf("live-r%d", run)), 100, 1000, samples)
			if err != nil {
				return nil, err
			}
			var d, n, k []float64
			for _, s := range res {
				d = append(d, float64(s.Deliver)/float64(time.Millisecond))
				n = append(n, float64(s.Naive)/float64(time.Millisecond))
				k = append(k, float64(s.Reran))
			}
			slices.Sort(d)
			slices.Sort(n)
			slices.Sort(k)
			ours, naive, reran = append(ours, median(d)), append(naive, median(n)), append(reran, median(k))
		}
		note, _ := json.Marshal(reran)
		return []Result{pairResult("live", "1,000 live queries over 100 tables, one-row server change to one table", map[string]int{"clients": 1}, "ms",
			"to the last affected delivery", ours, "re-running all 1,000", naive,
			fmt.Sprintf("queries re-run per change, median of each run: %s (the changed table has 10)", note))}, nil
	}}
}
