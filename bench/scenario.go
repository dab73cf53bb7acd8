package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// cluster is one authority and several replicas of our engine.
type cluster struct {
	auth     *server.Authority
	replicas []*replica.Replica
}

func openCluster(ctx context.Context, dir string, reg *mutators.Registry, clients int, setup []string) (*cluster, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	auth, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
		return execAll(append([]string{mutators.DemoSchema}, setup...))(tx)
	})
	if err != nil {
		return nil, err
	}
	c := &cluster{auth: auth}
	for i := range clients {
		r, err := replica.Open(ctx, filepath.Join(dir, fmt.Sprintf("client%d.db", i+1)), replica.Options{Mutators: reg})
		if err != nil {
			c.close()
			return nil, err
		}
		c.replicas = append(c.replicas, r)
		if err := c.catchUp(ctx, i); err != nil {
			c.close()
			return nil, err
		}
	}
	return c, nil
}

// catchUp rebases replica i onto every version the authority has.
func (c *cluster) catchUp(ctx context.Context, i int) error {
	sets, err := c.auth.Since(c.replicas[i].Status().Version)
	if err != nil {
		return err
	}
	return c.replicas[i].Rebase(ctx, sets...)
}

// push has the authority run client i's first n pending mutations (all if
// n < 0) as one batch.
func (c *cluster) push(ctx context.Context, i, n int) error {
	var batch []server.Mutation
	for _, m := range c.replicas[i].Pending() {
		if n >= 0 && len(batch) == n {
			break
		}
		batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
	}
	_, res, err := c.auth.Push(ctx, batch)
	if err != nil {
		return err
	}
	for _, r := range res {
		if r.Outcome != server.Applied {
			return fmt.Errorf("client %d mutation %d: outcome %d %s", i+1, r.Mutation.ID, r.Outcome, r.Err)
		}
	}
	return nil
}

// converged checks that every replica has caught up with nothing pending
// and the authority's checksum.
func (c *cluster) converged() error {
	want := c.auth.Checksum()
	for i, r := range c.replicas {
		st := r.Status()
		if st.Pending != 0 || st.Checksum != want || st.Version != c.auth.Version() {
			return fmt.Errorf("client %d: version %d, %d pending, checksum %x; server version %d, checksum %x",
				i+1, st.Version, st.Pending, st.Checksum, c.auth.Version(), want)
		}
	}
	return nil
}

func (c *cluster) close() error {
	var errs []error
	for _, r := range c.replicas {
		errs = append(errs, r.Close())
	}
	return errors.Join(append(errs, c.auth.Close())...)
}

// spCluster is the savepoint engine's counterpart: a server database that
// commits the SQL of each mutation it runs, and clients.
type spCluster struct {
	server  *SavepointEngine
	clients []*SavepointEngine
	queued  [][]Mutation // per client, mutations sent but not yet processed
}

func openSPCluster(ctx context.Context, dir string, reg *mutators.Registry, clients int, setup []string) (*spCluster, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	c := &spCluster{queued: make([][]Mutation, clients)}
	for i := range clients + 1 {
		name := "server.db"
		if i > 0 {
			name = fmt.Sprintf("client%d.db", i)
		}
		b, err := openBaseline(ctx, filepath.Join(dir, name), reg, [][]string{setup})
		if err != nil {
			c.close()
			return nil, err
		}
		if i == 0 {
			c.server = b.e
		} else {
			c.clients = append(c.clients, b.e)
		}
	}
	return c, nil
}

func (c *spCluster) mutate(ctx context.Context, i int, m Mutation) error {
	if err := c.clients[i].Mutate(ctx, m.Name, m.Args); err != nil {
		return err
	}
	c.queued[i] = append(c.queued[i], m)
	return nil
}

// process has the server run client i's first n queued mutations (all if
// n < 0) and returns their SQL, which every client then rebases onto.
func (c *spCluster) process(ctx context.Context, i, n int) ([]string, int, error) {
	if n < 0 || n > len(c.queued[i]) {
		n = len(c.queued[i])
	}
	stmts, err := serverSQL(c.queued[i][:n])
	if err != nil {
		return nil, 0, err
	}
	c.queued[i] = c.queued[i][n:]
	if err := c.server.Rebase(ctx, stmts, 0); err != nil {
		return nil, 0, err
	}
	return stmts, n, nil
}

func (c *spCluster) close() error {
	var errs []error
	for _, e := range append([]*SavepointEngine{c.server}, c.clients...) {
		if e != nil {
			errs = append(errs, e.Close())
		}
	}
	return errors.Join(errs...)
}

// runSeed runs the project's seed scenario (the prisma-sync prototype's):
// client 1 adds 1 to Food ten times, client 2 subtracts 3 three times,
// client 3 only watches; the server sees client 2's mutations at once and
// client 1's late, in batches. It times the clients' work (every Mutate and
// rebase) and checks that all end on Food = 1.
func runSeed(ctx context.Context, env *Env) ([]Result, error) {
	run := 0
	a, s, err := measurePair(ctx, env.Config.Runs, 1, "ms",
		func(ctx context.Context) (time.Duration, error) {
			run++
			return seedOurs(ctx, filepath.Join(env.Dir, fmt.Sprintf("seed-ours-%d", run)), env.Registry)
		},
		func(ctx context.Context) (time.Duration, error) {
			run++
			return seedSavepoint(ctx, filepath.Join(env.Dir, fmt.Sprintf("seed-sp-%d", run)), env.Registry)
		})
	if err != nil {
		return nil, err
	}
	return []Result{pairResult("workload", "seed scenario, 3 clients, 13 mutations, time in clients", map[string]int{"clients": 3}, "ms",
		"ours", a, "savepoint", s, "all Mutate and rebase calls of the three clients; both end on Food = 1 (checked)")}, nil
}

// seedSteps drives the seed scenario: mutate(c, delta) is a client's local
// mutation, process(c, n) the server running client c's first n queued
// mutations and every client rebasing on the result.
func seedSteps(queued func(c int) int, mutate func(c int, delta int64) error, process func(c int) error) error {
	ones, threes := 10, 3
	for step := 0; ones > 0 || threes > 0 || queued(0) > 0 || queued(1) > 0; step++ {
		if ones > 0 {
			if err := mutate(0, 1); err != nil {
				return err
			}
			ones--
		}
		if threes > 0 && step%4 == 0 {
			if err := mutate(1, -3); err != nil {
				return err
			}
			threes--
		}
		if queued(1) > 0 {
			if err := process(1); err != nil {
				return err
			}
		}
		if queued(0) > 0 && (queued(0) > 3 || ones == 0) {
			if err := process(0); err != nil {
				return err
			}
		}
	}
	return nil
}

func seedOurs(ctx context.Context, dir string, reg *mutators.Registry) (time.Duration, error) {
	c, err := openCluster(ctx, dir, reg, 3, nil)
	if err != nil {
		return 0, err
	}
	defer c.close()
	var spent time.Duration
	err = seedSteps(
		func(i int) int { return c.replicas[i].Status().Pending },
		func(i int, delta int64) error {
			d, err := timed(func() error {
				h, err := c.replicas[i].Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", delta))
				if err != nil {
					return err
				}
				return h.LocalErr()
			})
			spent += d
			return err
		},
		func(i int) error {
			if err := c.push(ctx, i, 1); err != nil {
				return err
			}
			for j := range c.replicas {
				d, err := timed(func() error { return c.catchUp(ctx, j) })
				spent += d
				if err != nil {
					return err
				}
			}
			return nil
		})
	if err != nil {
		return 0, err
	}
	if err := c.converged(); err != nil {
		return 0, err
	}
	for i, r := range c.replicas {
		var food int64
		if err := r.DB().QueryRowContext(ctx, "SELECT count FROM Categories WHERE name = 'Food'").Scan(&food); err != nil {
			return 0, err
		}
		if food != 1 {
			return 0, fmt.Errorf("ours: client %d ends on Food = %d, want 1", i+1, food)
		}
	}
	return spent, nil
}

func seedSavepoint(ctx context.Context, dir string, reg *mutators.Registry) (time.Duration, error) {
	c, err := openSPCluster(ctx, dir, reg, 3, nil)
	if err != nil {
		return 0, err
	}
	defer c.close()
	var spent time.Duration
	err = seedSteps(
		func(i int) int { return len(c.queued[i]) },
		func(i int, delta int64) error {
			d, err := timed(func() error { return c.mutate(ctx, i, demoMutation("Food", delta)) })
			spent += d
			return err
		},
		func(i int) error {
			stmts, n, err := c.process(ctx, i, 1)
			if err != nil {
				return err
			}
			for j, e := range c.clients {
				acked := 0
				if j == i {
					acked = n
				}
				d, err := timed(func() error { return e.Rebase(ctx, stmts, acked) })
				spent += d
				if err != nil {
					return err
				}
			}
			return nil
		})
	if err != nil {
		return 0, err
	}
	for i, e := range append([]*SavepointEngine{c.server}, c.clients...) {
		var food int64
		if err := e.Conn().QueryRowContext(ctx, "SELECT count FROM Categories WHERE name = 'Food'").Scan(&food); err != nil {
			return 0, err
		}
		if food != 1 || e.Pending() != 0 {
			return 0, fmt.Errorf("savepoint: party %d ends on Food = %d with %d pending, want 1 and 0", i, food, e.Pending())
		}
	}
	return spent, nil
}

// countersRows is how many shared rows the counters workload increments.
const countersRows = 8

// countersPerRound is how many increments each client makes per round.
const countersPerRound = 5

// runCounters: Clients clients increment countersRows shared rows; each
// round every client makes countersPerRound increments, the server runs
// each client's batch (one version per client), and every client rebases
// onto all of them (its own acknowledged, the others' applied). One run's
// value is the median rebase latency over all clients and rounds.
func runCounters(ctx context.Context, env *Env) ([]Result, error) {
	cfg := env.Config
	run := 0
	a, s, err := measurePair(ctx, cfg.Runs, 1, "ms",
		func(ctx context.Context) (time.Duration, error) {
			run++
			return countersOurs(ctx, filepath.Join(env.Dir, fmt.Sprintf("counters-ours-%d", run)), env.Registry, cfg.Clients, cfg.Rounds)
		},
		func(ctx context.Context) (time.Duration, error) {
			run++
			return countersSavepoint(ctx, filepath.Join(env.Dir, fmt.Sprintf("counters-sp-%d", run)), env.Registry, cfg.Clients, cfg.Rounds)
		})
	if err != nil {
		return nil, err
	}
	return []Result{pairResult("workload",
		fmt.Sprintf("rebase, counters, %d clients on %d shared rows, %d increments each per round", cfg.Clients, countersRows, countersPerRound),
		map[string]int{"clients": cfg.Clients, "k": cfg.Clients * countersPerRound}, "ms", "ours", a, "savepoint", s,
		"median per-client rebase onto one round of every client's increments; all converge (checked)")}, nil
}

// counterMut is client c's i-th increment.
func counterMut(c, i int) Mutation {
	return Mutation{CounterAdd, mustJSON(CounterArgs{ID: int64((c*7+i*3)%countersRows + 1), Delta: int64(c + 1)})}
}

func countersOurs(ctx context.Context, dir string, reg *mutators.Registry, clients, rounds int) (time.Duration, error) {
	c, err := openCluster(ctx, dir, reg, clients, countersSetup(countersRows))
	if err != nil {
		return 0, err
	}
	defer c.close()
	var lat []float64
	for round := range rounds {
		for i, r := range c.replicas {
			for j := range countersPerRound {
				m := counterMut(i, round*countersPerRound+j)
				h, err := r.Mutate(ctx, m.Name, m.Args)
				if err != nil {
					return 0, err
				}
				if err := h.LocalErr(); err != nil {
					return 0, err
				}
			}
		}
		for i := range c.replicas {
			if err := c.push(ctx, i, -1); err != nil {
				return 0, err
			}
		}
		for i := range c.replicas {
			d, err := timed(func() error { return c.catchUp(ctx, i) })
			if err != nil {
				return 0, err
			}
			lat = append(lat, float64(d))
		}
	}
	if err := c.converged(); err != nil {
		return 0, err
	}
	slices.Sort(lat)
	return time.Duration(median(lat)), nil
}

func countersSavepoint(ctx context.Context, dir string, reg *mutators.Registry, clients, rounds int) (time.Duration, error) {
	c, err := openSPCluster(ctx, dir, reg, clients, countersSetup(countersRows))
	if err != nil {
		return 0, err
	}
	defer c.close()
	var lat []float64
	for round := range rounds {
		for i := range c.clients {
			for j := range countersPerRound {
				if err := c.mutate(ctx, i, counterMut(i, round*countersPerRound+j)); err != nil {
					return 0, err
				}
			}
		}
		var all []string
		acked := make([]int, len(c.clients))
		for i := range c.clients {
			stmts, n, err := c.process(ctx, i, -1)
			if err != nil {
				return 0, err
			}
			all = append(all, stmts...)
			acked[i] = n
		}
		for i, e := range c.clients {
			d, err := timed(func() error { return e.Rebase(ctx, all, acked[i]) })
			if err != nil {
				return 0, err
			}
			lat = append(lat, float64(d))
		}
	}
	const sum = `SELECT group_concat(n) FROM (SELECT n FROM counters ORDER BY id)`
	var want string
	if err := c.server.Conn().QueryRowContext(ctx, sum).Scan(&want); err != nil {
		return 0, err
	}
	for i, e := range c.clients {
		var got string
		if err := e.Conn().QueryRowContext(ctx, sum).Scan(&got); err != nil {
			return 0, err
		}
		if got != want || e.Pending() != 0 {
			return 0, fmt.Errorf("savepoint client %d: counters %s with %d pending, server %s", i+1, got, e.Pending(), want)
		}
	}
	slices.Sort(lat)
	return time.Duration(median(lat)), nil
}
