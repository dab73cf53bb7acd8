package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"github.com/sqlrebase/sqlrebase/replica"
)

// durabilityNote is said next to every comparison of local writes with the
// savepoint engine: the two do not promise the same thing.
const durabilityNote = "ours: queued and committed, survives kill -9 (Durability Normal); savepoint: nothing committed, lost on a crash"

// perOp is a sampler that times ops mutations in a row, together (per-op
// clock reads would be a noticeable part of a 20 µs op), and returns the
// time of one; reset runs first, untimed, to clear what the previous
// sample left pending.
func perOp(ops int, mut func(i int) Mutation, fn func(Mutation) error, reset func() error) sampler {
	return func(ctx context.Context) (time.Duration, error) {
		if err := reset(); err != nil {
			return 0, err
		}
		d, err := timed(func() error {
			for i := range ops {
				if err := fn(mut(i)); err != nil {
					return err
				}
			}
			return nil
		})
		return d / time.Duration(ops), err
	}
}

// mutateSamplers are perOp samplers of local mutations on ours (which
// pushes and rebases away its own pending work before each sample) and on
// the savepoint engine (whose server acknowledges its own). mutO and mutB
// give each engine its sequence. flush clears the last sample's pending
// work on both.
func mutateSamplers(ctx context.Context, ops int, o *ours, b *baseline, mutO, mutB func(i int) Mutation) (oursS, spS sampler, flush func() error) {
	var unacked []Mutation
	ackB := func() error {
		err := b.ackAll(ctx, unacked)
		unacked = unacked[:0]
		return err
	}
	oursS = perOp(ops, mutO, func(m Mutation) error { return o.mutate(ctx, m) }, func() error { return o.pushOwn(ctx) })
	spS = perOp(ops, mutB, func(m Mutation) error { unacked = append(unacked, m); return b.mutate(ctx, m) }, ackB)
	flush = func() error {
		if err := o.pushOwn(ctx); err != nil {
			return err
		}
		return ackB()
	}
	return oursS, spS, flush
}

// runMutate times one local mutation: ours against the savepoint engine,
// and ours against plain go-sqlite3 doing the same write.
func runMutate(ctx context.Context, env *Env) ([]Result, error) {
	cfg := env.Config
	var out []Result
	type workload struct {
		name  string
		setup [][]string
		mut   func(i int) Mutation
	}
	for _, w := range []workload{
		{"seed", nil, func(int) Mutation { return demoMutation("bench", 1) }},
		{"counter", [][]string{countersSetup(16)}, func(i int) Mutation {
			return Mutation{CounterAdd, mustJSON(CounterArgs{ID: int64(i%16 + 1), Delta: 1})}
		}},
	} {
		env.Progress("mutate: %s", w.name)
		dir := filepath.Join(env.Dir, w.name)
		o, err := openOurs(ctx, filepath.Join(dir, "ours"), env.Registry, replica.Normal, w.setup)
		if err != nil {
			return nil, err
		}
		defer o.close()
		b, err := openBaseline(ctx, filepath.Join(dir, "savepoint.db"), env.Registry, w.setup)
		if err != nil {
			return nil, err
		}
		defer b.close()
		p, err := openPlain(ctx, filepath.Join(dir, "plain.db"), "NORMAL", w.setup)
		if err != nil {
			return nil, err
		}
		defer p.close()

		ops := max(1, cfg.MutateOps)
		oursS, spS, _ := mutateSamplers(ctx, ops, o, b, w.mut, w.mut)
		plainS := perOp(ops, w.mut, func(m Mutation) error { return p.mutate(ctx, m) }, func() error { return nil })

		a, s, err := measurePair(ctx, cfg.Runs, 1, "µs", oursS, spS)
		if err != nil {
			return nil, fmt.Errorf("mutate %s: %w", w.name, err)
		}
		out = append(out, pairResult("mutate", label("mutate", w.name), nil, "µs", "ours", a, "savepoint", s, durabilityNote))
		a, s, err = measurePair(ctx, cfg.Runs, 1, "µs", oursS, plainS)
		if err != nil {
			return nil, fmt.Errorf("mutate %s: %w", w.name, err)
		}
		out = append(out, pairResult("mutate", label("mutate", w.name, "vs plain autocommit"), nil, "µs", "ours", a, "plain", s,
			"plain: go-sqlite3 alone, WAL, synchronous=NORMAL, the same statements autocommitted; target ≤ 1.5"))
	}

	// Durability Full against plain SQLite with synchronous=FULL: both
	// fsync every commit.
	env.Progress("mutate: durability Full")
	dir := filepath.Join(env.Dir, "full")
	setup := [][]string{countersSetup(16)}
	o, err := openOurs(ctx, filepath.Join(dir, "ours"), env.Registry, replica.Full, setup)
	if err != nil {
		return nil, err
	}
	defer o.close()
	p, err := openPlain(ctx, filepath.Join(dir, "plain.db"), "FULL", setup)
	if err != nil {
		return nil, err
	}
	defer p.close()
	ops := max(1, cfg.MutateOps/4)
	mut := func(i int) Mutation {
		return Mutation{CounterAdd, mustJSON(CounterArgs{ID: int64(i%16 + 1), Delta: 1})}
	}
	a, s, err := measurePair(ctx, cfg.Runs, 1, "µs",
		perOp(ops, mut, func(m Mutation) error { return o.mutate(ctx, m) }, func() error { return o.pushOwn(ctx) }),
		perOp(ops, mut, func(m Mutation) error { return p.mutate(ctx, m) }, func() error { return nil }))
	if err != nil {
		return nil, fmt.Errorf("mutate, durability Full: %w", err)
	}
	out = append(out, pairResult("mutate", "mutate, counter, durability Full vs plain synchronous=FULL", nil, "µs", "ours", a, "plain", s,
		"both fsync every commit (ours: the queue and the WAL commit)"))
	return out, nil
}

// serverMuts are the k mutations of the other client in one server batch
// of the seed workload: upserts on a few rows of its own.
func serverMuts(k, seq int) []Mutation {
	muts := make([]Mutation, k)
	for j := range k {
		muts[j] = demoMutation(fmt.Sprintf("server-%d", (seq+j)%16), 1)
	}
	return muts
}

// rebaseSamplers returns the samplers of one rebase on each engine: the
// other client's k mutations arrive (one server version for ours, their SQL
// for the savepoint engine), then the timed rebase drops the pending state,
// applies them and replays the pending mutations.
func rebaseSamplers(o *ours, b *baseline, k int, muts func(k, seq int) []Mutation) (sampler, sampler) {
	seqO, seqB := 0, 0
	oursS := func(ctx context.Context) (time.Duration, error) {
		ps, err := o.serverBatch(ctx, muts(k, seqO))
		seqO += k
		if err != nil {
			return 0, err
		}
		return timed(func() error { return o.r.Rebase(ctx, ps) })
	}
	spS := func(ctx context.Context) (time.Duration, error) {
		stmts, err := serverSQL(muts(k, seqB))
		seqB += k
		if err != nil {
			return 0, err
		}
		return timed(func() error { return b.e.Rebase(ctx, stmts, 0) })
	}
	return oursS, spS
}

// sameState checks that both engines show the same optimistic state: the
// same server changes under the same pending mutations.
func sameState(ctx context.Context, o *ours, b *baseline, query string) error {
	var x, y string
	if err := o.r.DB().QueryRowContext(ctx, query).Scan(&x); err != nil {
		return fmt.Errorf("check state (ours): %w", err)
	}
	if err := b.e.Conn().QueryRowContext(ctx, query).Scan(&y); err != nil {
		return fmt.Errorf("check state (savepoint): %w", err)
	}
	if x != y {
		return fmt.Errorf("the engines disagree: ours %s, savepoint %s (%s)", x, y, query)
	}
	return nil
}

// categoriesState sums up the seed workload's table. Rows durable-… are left
// out: the savepoint engine alone gets them, from the rebases it runs
// against our engine at Durability Full.
const categoriesState = `SELECT count(*) || ' rows, total ' || total(count) || ', server ' ||
	(SELECT total(count) FROM Categories WHERE name LIKE 'server-%') FROM Categories WHERE name NOT LIKE 'durable-%'`

// durableMuts are serverMuts on rows of their own (see categoriesState).
func durableMuts(k, seq int) []Mutation {
	muts := make([]Mutation, k)
	for j := range k {
		muts[j] = demoMutation(fmt.Sprintf("durable-%d", (seq+j)%16), 1)
	}
	return muts
}

// runRebaseGrid times the whole rebase against pending depth N and server
// batch K, and records the WAL size at each N.
func runRebaseGrid(ctx context.Context, env *Env) ([]Result, error) {
	cfg := env.Config
	o, err := openOurs(ctx, filepath.Join(env.Dir, "ours"), env.Registry, replica.Normal, nil)
	if err != nil {
		return nil, err
	}
	defer o.close()
	b, err := openBaseline(ctx, filepath.Join(env.Dir, "savepoint.db"), env.Registry, nil)
	if err != nil {
		return nil, err
	}
	defer b.close()
	var full *ours
	if len(cfg.DurablePending) > 0 {
		if full, err = openOurs(ctx, filepath.Join(env.Dir, "full"), env.Registry, replica.Full, nil); err != nil {
			return nil, err
		}
		defer full.close()
	}
	var out []Result
	have := 0
	pending := slices.Sorted(slices.Values(cfg.Pending))
	for _, n := range pending {
		env.Progress("rebase: %d pending", n)
		for i := have; i < n; i++ {
			m := demoMutation(fmt.Sprintf("local-%d", i), 1)
			if err := o.mutate(ctx, m); err != nil {
				return nil, err
			}
			if err := b.mutate(ctx, m); err != nil {
				return nil, err
			}
		}
		durable := full != nil && slices.Contains(cfg.DurablePending, n)
		for i := full.pendingCount(); durable && i < n; i++ {
			if err := full.mutate(ctx, demoMutation(fmt.Sprintf("local-%d", i), 1)); err != nil {
				return nil, err
			}
		}
		have = n
		for _, k := range cfg.Batch {
			oursS, spS := rebaseSamplers(o, b, k, serverMuts)
			a, s, err := measurePair(ctx, cfg.Runs, cfg.iters(n), "ms", oursS, spS)
			if err != nil {
				return nil, fmt.Errorf("rebase, %d pending, K=%d: %w", n, k, err)
			}
			out = append(out, pairResult("rebase", label("rebase", pendingLabel(n), fmt.Sprintf("K=%d", k)),
				map[string]int{"pending": n, "k": k}, "ms", "ours", a, "savepoint", s, ""))
			if err := o.trim(ctx, 2000); err != nil {
				return nil, err
			}
		}
		if err := sameState(ctx, o, b, categoriesState); err != nil {
			return nil, err
		}
		if durable {
			oursS, spS := rebaseSamplers(full, b, 1, durableMuts)
			a, s, err := measurePair(ctx, cfg.Runs, cfg.iters(n), "ms", oursS, spS)
			if err != nil {
				return nil, fmt.Errorf("rebase, durability Full: %w", err)
			}
			out = append(out, pairResult("rebase", label("rebase", pendingLabel(n), "K=1", "durability Full"),
				map[string]int{"pending": n, "k": 1}, "ms", "ours", a, "savepoint", s,
				"ours fsyncs the apply journal and the main file (survives power loss); savepoint keeps pending work in memory"))
			if err := full.trim(ctx, 2000); err != nil {
				return nil, err
			}
		}
		out = append(out, pairResult("wal", label("WAL size", pendingLabel(n)), map[string]int{"pending": n}, "KB",
			"ours", []float64{float64(o.walSize()) / 1024}, "savepoint", []float64{float64(b.walSize()) / 1024},
			"live WAL (frames the wal-index counts); ours: the pending transactions only; savepoint: committed server changes not yet checkpointed, its pending work lives in its page cache (spilling to the WAL when that is full)"))
	}
	return out, nil
}

// runDrop times the drop alone against pending depth: for ours the
// vfs.Replica.Rebase with no page sets that starts every rebase, for the
// savepoint engine the ROLLBACK TO + RELEASE that starts its rebase.
//
// Every sample needs the pending state rebuilt (a replay of N mutations),
// which leaves different garbage and caches behind at different N; so the
// depths are interleaved within each run, the garbage collector runs before
// every sample, and each run takes dropSamples of ours per depth.
func runDrop(ctx context.Context, env *Env) ([]Result, error) {
	// dropSamples is how many drops of ours each run takes per depth.
	const dropSamples = 9
	cfg := env.Config
	auth, err := openOurs(ctx, filepath.Join(env.Dir, "server"), env.Registry, replica.Normal, nil)
	if err != nil {
		return nil, err
	}
	defer auth.close()
	depths := slices.Sorted(slices.Values(cfg.DropPending))
	rigs := make([]*dropRig, len(depths))
	bases := make([]*baseline, len(depths))
	for i, n := range depths {
		muts := make([]Mutation, n)
		for j := range muts {
			muts[j] = demoMutation(fmt.Sprintf("local-%d", j), 1)
		}
		if rigs[i], err = openDropRig(ctx, filepath.Join(env.Dir, fmt.Sprintf("ours-%d.db", n)), env.Registry, auth.auth, muts); err != nil {
			return nil, err
		}
		defer rigs[i].close()
		if bases[i], err = openBaseline(ctx, filepath.Join(env.Dir, fmt.Sprintf("savepoint-%d.db", n)), env.Registry, nil); err != nil {
			return nil, err
		}
		defer bases[i].close()
		for _, m := range muts {
			if err := bases[i].mutate(ctx, m); err != nil {
				return nil, err
			}
		}
	}
	oursRuns := make([][]float64, len(depths))
	spRuns := make([][]float64, len(depths))
	for run := range cfg.Runs {
		env.Progress("drop: run %d", run+1)
		ws := make([][]float64, len(depths))
		ss := make([][]float64, len(depths))
		// Every depth gets the same number of our samples, and the depths
		// take turns within each round (the first depth rotating), so that
		// a burst of load from elsewhere on the machine falls on all of
		// them alike. Medians of three samples of the deepest case, taken
		// back to back, made the flatness ratio swing from 1.0 to 2.4.
		// The savepoint engine's deep samples cost a replay of all N
		// mutations each, so it keeps fewer.
		for it := range dropSamples {
			for k := range depths {
				i := (k + it + run) % len(depths)
				n := depths[i]
				oursFirst := (run+it)%2 == 0
				for side := range 2 {
					if (side == 0) == oursFirst {
						if err := rigs[i].fill(ctx); err != nil {
							return nil, err
						}
						runtime.GC()
						d, err := rigs[i].drop(ctx)
						if err != nil {
							return nil, err
						}
						ws[i] = append(ws[i], unitScale(d, "µs"))
					} else if it < max(3, cfg.iters(n)*2) {
						// The savepoint engine's pending state is in place
						// (its previous rebase replayed it); its rebase
						// with no server changes is drop + replay.
						runtime.GC()
						ph, err := bases[i].e.RebasePhases(ctx, nil, 0)
						if err != nil {
							return nil, err
						}
						ss[i] = append(ss[i], unitScale(ph.Drop, "µs"))
					}
				}
			}
		}
		for i := range depths {
			slices.Sort(ws[i])
			slices.Sort(ss[i])
			oursRuns[i] = append(oursRuns[i], median(ws[i]))
			spRuns[i] = append(spRuns[i], median(ss[i]))
		}
	}
	var out []Result
	for i, n := range depths {
		if bases[i].e.Pending() != n {
			return nil, fmt.Errorf("drop: savepoint engine has %d pending, want %d", bases[i].e.Pending(), n)
		}
		out = append(out, pairResult("drop", label("drop", pendingLabel(n)), map[string]int{"pending": n}, "µs",
			"ours", oursRuns[i], "savepoint", spRuns[i], ""))
	}
	if len(depths) > 1 {
		lo, hi := 0, len(depths)-1
		for _, e := range []struct {
			name string
			runs [][]float64
		}{{"ours", oursRuns}, {"savepoint", spRuns}} {
			out = append(out, pairResult("drop", fmt.Sprintf("drop flatness, %s, %d vs %d pending", e.name, depths[hi], depths[lo]),
				map[string]int{"pending": depths[hi], "vs": depths[lo]}, "µs",
				fmt.Sprintf("%d pending", depths[hi]), e.runs[hi], fmt.Sprintf("%d pending", depths[lo]), e.runs[lo],
				map[bool]string{true: "target ≤ 1.5 in every run", false: ""}[e.name == "ours"]))
		}
	}
	return out, nil
}

// runWorkloads runs the seed scenario, the counters workload and the todo
// app on both engines.
func runWorkloads(ctx context.Context, env *Env) ([]Result, error) {
	var out []Result
	r, err := runSeed(ctx, env)
	if err != nil {
		return nil, fmt.Errorf("seed scenario: %w", err)
	}
	out = append(out, r...)
	if r, err = runCounters(ctx, env); err != nil {
		return nil, fmt.Errorf("counters: %w", err)
	}
	out = append(out, r...)
	if r, err = runTodo(ctx, env); err != nil {
		return nil, fmt.Errorf("todo: %w", err)
	}
	return append(out, r...), nil
}

// runTodo times mutations and rebases of the todo app: 40% inserts, 40%
// updates, 20% deletes over a table of TodoRows rows with two indexes.
func runTodo(ctx context.Context, env *Env) ([]Result, error) {
	cfg := env.Config
	env.Progress("todo: set-up (%d rows)", cfg.TodoRows)
	setup := [][]string{todoSetup(cfg.TodoRows)}
	o, err := openOurs(ctx, filepath.Join(env.Dir, "todo-ours"), env.Registry, replica.Normal, setup)
	if err != nil {
		return nil, err
	}
	defer o.close()
	b, err := openBaseline(ctx, filepath.Join(env.Dir, "todo-savepoint.db"), env.Registry, setup)
	if err != nil {
		return nil, err
	}
	defer b.close()
	var out []Result

	// Mutate: the same sequence on both engines.
	ops := max(1, cfg.MutateOps)
	genO, genB := newTodoGen(1, 1_000_000), newTodoGen(1, 1_000_000)
	oursS, spS, flush := mutateSamplers(ctx, ops, o, b,
		func(int) Mutation { return genO.next() }, func(int) Mutation { return genB.next() })
	a, s, err := measurePair(ctx, cfg.Runs, 1, "µs", oursS, spS)
	if err != nil {
		return nil, err
	}
	out = append(out, pairResult("workload", label("mutate", "todo"), nil, "µs", "ours", a, "savepoint", s, durabilityNote))
	if err := flush(); err != nil {
		return nil, err
	}

	// Rebase at each depth, K=10 todo mutations of another client.
	const k = 10
	have := 0
	local := newTodoGen(2, 2_000_000)
	for _, n := range slices.Sorted(slices.Values(cfg.TodoPending)) {
		env.Progress("todo: rebase, %d pending", n)
		for ; have < n; have++ {
			m := local.next()
			if err := o.mutate(ctx, m); err != nil {
				return nil, err
			}
			if err := b.mutate(ctx, m); err != nil {
				return nil, err
			}
		}
		serverO, serverB := newTodoGen(3, 3_000_000), newTodoGen(3, 3_000_000)
		oursS, _ := rebaseSamplers(o, b, k, func(k, _ int) []Mutation { return todoBatch(serverO, k) })
		_, spS := rebaseSamplers(o, b, k, func(k, _ int) []Mutation { return todoBatch(serverB, k) })
		a, s, err := measurePair(ctx, cfg.Runs, cfg.iters(n), "ms", oursS, spS)
		if err != nil {
			return nil, err
		}
		out = append(out, pairResult("workload", label("rebase", "todo", pendingLabel(n), fmt.Sprintf("K=%d", k)),
			map[string]int{"pending": n, "k": k}, "ms", "ours", a, "savepoint", s, ""))
		if err := sameState(ctx, o, b, `SELECT count(*) || ' todos, ' || total(done) || ' done, ' || total(updated) FROM todos`); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func todoBatch(g *todoGen, k int) []Mutation {
	muts := make([]Mutation, k)
	for i := range muts {
		muts[i] = g.next()
	}
	return muts
}

// runSizes times a mutation and a rebase (100 pending, K=1) on databases of
// each size in SizesMB: a filler table makes up the bulk.
func runSizes(ctx context.Context, env *Env) ([]Result, error) {
	cfg := env.Config
	var out []Result
	for _, mb := range cfg.SizesMB {
		env.Progress("size: %d MB", mb)
		// The filler goes in chunks of at most 128 MB, one server version
		// each, so that the set-up never holds more in memory.
		var setup [][]string
		setup = append(setup, []string{FillerSchema})
		for left := mb; left > 0; left -= 128 {
			setup = append(setup, []string{fillerChunk(min(left, 128))})
		}
		dir := filepath.Join(env.Dir, fmt.Sprintf("%dmb", mb))
		o, err := openOurs(ctx, filepath.Join(dir, "ours"), env.Registry, replica.Normal, setup)
		if err != nil {
			return nil, err
		}
		b, err := openBaseline(ctx, filepath.Join(dir, "savepoint.db"), env.Registry, setup)
		if err != nil {
			o.close()
			return nil, err
		}
		res, err := sizeSeries(ctx, env, o, b, mb)
		err = joinErr(err, o.close(), b.close())
		if err != nil {
			return nil, fmt.Errorf("%d MB: %w", mb, err)
		}
		out = append(out, res...)
	}
	return out, nil
}

func sizeSeries(ctx context.Context, env *Env, o *ours, b *baseline, mb int) ([]Result, error) {
	cfg := env.Config
	sizeLabel := fmt.Sprintf("%d MB database", mb)
	params := func(extra ...int) map[string]int {
		p := map[string]int{"size_mb": mb}
		if len(extra) == 2 {
			p["pending"], p["k"] = extra[0], extra[1]
		}
		return p
	}
	ops := max(1, cfg.MutateOps)
	mut := func(i int) Mutation { return demoMutation(fmt.Sprintf("size-%d", i%50), 1) }
	oursS, spS, flush := mutateSamplers(ctx, ops, o, b, mut, mut)
	a, s, err := measurePair(ctx, cfg.Runs, 1, "µs", oursS, spS)
	if err != nil {
		return nil, err
	}
	out := []Result{pairResult("size", label("mutate", "seed", sizeLabel), params(), "µs", "ours", a, "savepoint", s, durabilityNote)}
	if err := flush(); err != nil {
		return nil, err
	}
	const n = 100
	for i := range n {
		m := demoMutation(fmt.Sprintf("local-%d", i), 1)
		if err := o.mutate(ctx, m); err != nil {
			return nil, err
		}
		if err := b.mutate(ctx, m); err != nil {
			return nil, err
		}
	}
	oursS, spS = rebaseSamplers(o, b, 1, serverMuts)
	a, s, err = measurePair(ctx, cfg.Runs, cfg.iters(n), "ms", oursS, spS)
	if err != nil {
		return nil, err
	}
	out = append(out, pairResult("size", label("rebase", pendingLabel(n), "K=1", sizeLabel), params(n, 1), "ms", "ours", a, "savepoint", s, ""))
	return out, sameState(ctx, o, b, categoriesState)
}

// joinErr is errors.Join that keeps the first error's identity in front.
func joinErr(errs ...error) error {
	var first error
	for _, e := range errs {
		if e != nil {
			if first == nil {
				first = e
			} else {
				first = fmt.Errorf("%w; %v", first, e)
			}
		}
	}
	return first
}
