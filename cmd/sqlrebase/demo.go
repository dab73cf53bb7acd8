package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// clientSpec is one client of the scenario, in scenario time (before the
// speedup divides it).
type clientSpec struct {
	Name     string
	Latency  time.Duration // each way
	Interval time.Duration // between sends; the first send is one interval in
	Sends    int
	Delta    int64 // added to Food by each send
}

// seedClients is the prisma-sync seed scenario: 10*1 - 3*3 = 1, so every
// party must end at (1, 'Food', 1).
func seedClients() []clientSpec {
	return []clientSpec{
		{Name: "client1", Latency: 3 * time.Second, Interval: time.Second, Sends: 10, Delta: 1},
		{Name: "client2", Latency: 300 * time.Millisecond, Interval: 4 * time.Second, Sends: 3, Delta: -3},
		{Name: "client3", Latency: 100 * time.Millisecond},
	}
}

// demoConfig configures runDemo.
type demoConfig struct {
	Dir     string  // where the databases live; must be empty or absent
	Speedup float64 // divides every interval and latency
	Clients []clientSpec
	// Settle is how long to wait, in real time, for convergence after the
	// last send; zero means 30 s of scenario time / speedup + 10 s.
	Settle time.Duration
	Logger *slog.Logger
}

// partyState is what one party (the authority or a replica) holds at the end.
type partyState struct {
	Name     string
	Version  uint64
	Pending  int
	Rows     string // the Categories rows as SQL tuples, "(1, 'Food', 1)"
	Checksum uint64
}

// String describes the party for a transcript line.
func (p partyState) String() string {
	return fmt.Sprintf("%s at version %d with %s, checksum %016x, %d pending", p.Name, p.Version, p.Rows, p.Checksum, p.Pending)
}

// demoResult is the outcome of a scenario run.
type demoResult struct {
	Authority partyState
	Clients   []partyState
	// Differ names the replicas whose rows, version, checksum or pending
	// count differ from the authority's; empty means all converged.
	Differ []string
}

// Converged reports whether every replica matches the authority.
func (r demoResult) Converged() bool { return len(r.Differ) == 0 }

// transcript prints the demo's lines, each prefixed with the real time since
// the start in milliseconds. It serialises writers so lines never interleave.
type transcript struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
	last  map[string]string // last printed view per party, to print changes only
}

func newTranscript(w io.Writer) *transcript {
	return &transcript{w: w, start: time.Now(), last: map[string]string{}}
}

func (t *transcript) printf(format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fmt.Fprintf(t.w, "%6dms  %s\n", time.Since(t.start).Milliseconds(), fmt.Sprintf(format, args...))
}

// view prints party's view of Categories if it differs from the last one
// printed for that party.
func (t *transcript) view(party, rows string) {
	t.mu.Lock()
	changed := t.last[party] != rows
	t.last[party] = rows
	t.mu.Unlock()
	if changed {
		t.printf("%s: %s", party, rows)
	}
}

// push is one message from a client to the authority.
type push struct {
	from      string
	mutations []server.Mutation
}

// demoClient is one replica with its link to the authority.
type demoClient struct {
	spec  clientSpec
	r     *replica.Replica
	inbox *mailbox[*wal.PageSet]
	link  *link[push, *wal.PageSet]
	// mu keeps a Mutate or a Rebase together with the lines it prints, so
	// the transcript tells the story in the order it happened.
	mu sync.Mutex
}

// runDemo runs the scenario and reports whether everything converged. It
// returns an error only if the scenario could not run (a database failed,
// ctx ended); non-convergence is a result, not an error.
func runDemo(ctx context.Context, cfg demoConfig, out io.Writer) (demoResult, error) {
	if cfg.Speedup <= 0 {
		return demoResult{}, fmt.Errorf("speedup must be positive, got %v", cfg.Speedup)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) / cfg.Speedup) }
	if cfg.Settle == 0 {
		cfg.Settle = scale(30*time.Second) + 10*time.Second
	}
	tr := newTranscript(out)

	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return demoResult{}, fmt.Errorf("register demo mutators: %w", err)
	}
	auth, err := server.OpenAuthority(ctx, filepath.Join(cfg.Dir, "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec(mutators.DemoSchema)
		return err
	})
	if err != nil {
		return demoResult{}, err
	}
	defer auth.Close()

	net := &network{}
	authInbox := newMailbox[push]()
	var clients []*demoClient
	defer func() {
		for _, c := range clients {
			c.r.Close()
		}
	}()
	for _, spec := range cfg.Clients {
		r, err := replica.Open(ctx, filepath.Join(cfg.Dir, spec.Name+".db"), replica.Options{Mutators: reg, Logger: cfg.Logger})
		if err != nil {
			return demoResult{}, err
		}
		c := &demoClient{spec: spec, r: r, inbox: newMailbox[*wal.PageSet]()}
		c.link = &link[push, *wal.PageSet]{
			up:   newPipe(net, scale(spec.Latency), authInbox),
			down: newPipe(net, scale(spec.Latency), c.inbox),
		}
		clients = append(clients, c)
	}
	tr.printf("BACKEND running at version %d (%s)", auth.Version(), cfg.Dir)
	for _, c := range clients {
		tr.printf("%s running: client id %s, latency %v each way", c.spec.Name, c.r.ClientID(), scale(c.spec.Latency))
	}

	runCtx, cancel := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	// Deferred in this order so that on any return the goroutines are told
	// to stop first and then waited for, before the databases close.
	defer wg.Wait()
	defer cancel(nil)
	fail := func(err error) { cancel(err) }

	for _, c := range clients {
		c.link.run(runCtx, &wg)
	}
	names := map[string]string{}
	for _, c := range clients {
		names[c.r.ClientID()] = c.spec.Name
	}
	wg.Go(func() {
		if err := serveAuthority(runCtx, auth, authInbox, clients, names, net, tr); err != nil {
			fail(fmt.Errorf("authority: %w", err))
		}
	})
	// Subscribe: each replica first catches up from its own version. This
	// goes down the link before any push exists, so it cannot overtake a
	// broadcast.
	for _, c := range clients {
		sets, err := auth.Since(c.r.Status().Version)
		if err != nil {
			return demoResult{}, fmt.Errorf("subscribe %s: %w", c.spec.Name, err)
		}
		for _, ps := range sets {
			c.link.down.send(ps)
		}
	}
	for _, c := range clients {
		wg.Go(func() {
			if err := c.receive(runCtx, net, tr); err != nil {
				fail(fmt.Errorf("%s: %w", c.spec.Name, err))
			}
		})
	}
	var senders sync.WaitGroup
	for _, c := range clients {
		if c.spec.Sends == 0 {
			continue
		}
		senders.Go(func() {
			if err := c.send(runCtx, scale(c.spec.Interval), tr); err != nil {
				fail(fmt.Errorf("%s: %w", c.spec.Name, err))
			}
		})
	}
	senders.Wait()
	if err := context.Cause(runCtx); err != nil {
		return demoResult{}, err
	}
	tr.printf("all sends done; waiting up to %v for everyone to settle", cfg.Settle)
	settled := waitSettled(runCtx, cfg.Settle, auth, clients, net)
	if err := context.Cause(runCtx); err != nil {
		return demoResult{}, err
	}
	cancel(nil)
	wg.Wait()
	if !settled {
		tr.printf("timed out after %v waiting for convergence", cfg.Settle)
	}
	res, err := compare(ctx, auth, clients)
	if err != nil {
		return demoResult{}, err
	}
	for _, name := range res.Differ {
		for _, p := range res.Clients {
			if p.Name == name {
				tr.printf("DIFFERS: %s; BACKEND is %s", p, res.Authority)
			}
		}
	}
	if res.Converged() {
		tr.printf("converged: all %d parties at version %d with %s, checksum %016x",
			len(clients)+1, res.Authority.Version, res.Authority.Rows, res.Authority.Checksum)
	} else {
		tr.printf("NOT converged: %s differ(s) from BACKEND", strings.Join(res.Differ, ", "))
	}
	return res, nil
}

// serveAuthority runs each arriving push as one batch and broadcasts the
// new version to every client.
func serveAuthority(ctx context.Context, auth *server.Authority, inbox *mailbox[push], clients []*demoClient, names map[string]string, net *network, tr *transcript) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-inbox.ready:
		}
		for _, p := range inbox.takeAll() {
			ps, results, err := auth.Push(ctx, p.mutations)
			if err != nil {
				return err
			}
			for _, res := range results {
				tr.printf("BACKEND got %s #%d: %s%s", names[res.Mutation.ClientID], res.Mutation.ID, outcome(res.Outcome), suffix(res.Err))
			}
			if ps != nil {
				rows, err := authorityRows(ctx, auth)
				if err != nil {
					return err
				}
				tr.view("BACKEND", rows)
				tr.printf("BACKEND broadcasts version %d (%d pages)", ps.Version, len(ps.Pages))
				for _, c := range clients {
					c.link.down.send(ps)
				}
			}
			net.done(1)
		}
	}
}

func outcome(o server.Outcome) string {
	switch o {
	case server.Applied:
		return "applied"
	case server.Rejected:
		return "rejected"
	case server.Duplicate:
		return "duplicate, skipped"
	case server.Refused:
		return "refused"
	}
	return fmt.Sprintf("outcome %d", o)
}

func suffix(msg string) string {
	if msg == "" {
		return ""
	}
	return ": " + msg
}

// send runs the client's mutations: each runs at once locally, then goes
// up the link. Pushes are idempotent on the authority, but each mutation is
// sent once: the link never loses a message while the demo runs.
func (c *demoClient) send(ctx context.Context, interval time.Duration, tr *transcript) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	verb := "increment"
	delta := c.spec.Delta
	if delta < 0 {
		verb, delta = "decrement", -delta
	}
	for i := 0; i < c.spec.Sends; i++ {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		args := mutators.CategoryArgs("Food", c.spec.Delta)
		c.mu.Lock()
		h, err := c.r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, args)
		if err != nil {
			c.mu.Unlock()
			return fmt.Errorf("mutate: %w", err)
		}
		st := c.r.Status()
		tr.printf("%s mutation #%d: %s Food by %d (local, %d pending on v%d)%s", c.spec.Name, h.ID, verb, delta, st.Pending, st.Version, localErr(h.LocalErr()))
		err = c.printView(ctx, tr)
		c.mu.Unlock()
		if err != nil {
			return err
		}
		c.link.up.send(push{from: c.spec.Name, mutations: []server.Mutation{{
			ClientID: c.r.ClientID(), ID: h.ID, Name: h.Name, Args: args,
		}}})
	}
	return nil
}

func localErr(err error) string {
	if err == nil {
		return ""
	}
	return "; local run failed: " + err.Error()
}

// receive rebases on every batch of versions that arrives.
func (c *demoClient) receive(ctx context.Context, net *network, tr *transcript) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.inbox.ready:
		}
		sets := c.inbox.takeAll()
		if len(sets) == 0 {
			continue
		}
		err := c.rebase(ctx, sets, tr)
		net.done(len(sets))
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

func (c *demoClient) rebase(ctx context.Context, sets []*wal.PageSet, tr *transcript) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	// A version we already have (none in this demo, but a re-subscribe
	// would send some) must not reach Rebase, which wants the next one.
	have := c.r.Status().Version
	for len(sets) > 0 && sets[0].Version <= have {
		sets = sets[1:]
	}
	if len(sets) == 0 {
		return nil
	}
	if err := c.r.Rebase(ctx, sets...); err != nil {
		return err
	}
	st := c.r.Status()
	tr.printf("%s rebased to v%d (%d version(s) at once): replayed %d pending", c.spec.Name, st.Version, len(sets), st.Pending)
	return c.printView(ctx, tr)
}

func (c *demoClient) printView(ctx context.Context, tr *transcript) error {
	rows, err := queryRows(ctx, c.r.DB().QueryContext)
	if err != nil {
		return fmt.Errorf("read view: %w", err)
	}
	tr.view(c.spec.Name, rows)
	return nil
}

// waitSettled waits until every send is handled, the network is idle and
// every replica is at the authority's version with nothing pending.
func waitSettled(ctx context.Context, limit time.Duration, auth *server.Authority, clients []*demoClient, net *network) bool {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if net.idle() {
			v, ok := auth.Version(), true
			for _, c := range clients {
				st := c.r.Status()
				ok = ok && st.Version == v && st.Pending == 0
			}
			if ok {
				return true
			}
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

// compare reads every party's final state and names the replicas that
// differ from the authority in rows, version, checksum or pending work.
func compare(ctx context.Context, auth *server.Authority, clients []*demoClient) (demoResult, error) {
	rows, err := authorityRows(ctx, auth)
	if err != nil {
		return demoResult{}, err
	}
	res := demoResult{Authority: partyState{Name: "BACKEND", Version: auth.Version(), Rows: rows, Checksum: auth.Checksum()}}
	for _, c := range clients {
		rows, err := queryRows(ctx, c.r.DB().QueryContext)
		if err != nil {
			return demoResult{}, fmt.Errorf("read %s: %w", c.spec.Name, err)
		}
		st := c.r.Status()
		p := partyState{Name: c.spec.Name, Version: st.Version, Pending: st.Pending, Rows: rows, Checksum: st.Checksum}
		res.Clients = append(res.Clients, p)
		a := res.Authority
		if p.Rows != a.Rows || p.Version != a.Version || p.Checksum != a.Checksum || p.Pending != 0 {
			res.Differ = append(res.Differ, p.Name)
		}
	}
	return res, nil
}

func authorityRows(ctx context.Context, auth *server.Authority) (string, error) {
	return queryRows(ctx, auth.Query)
}

// queryRows formats Categories as SQL tuples. A database that has no
// Categories table yet (a replica at version 0) shows as "(no rows)".
func queryRows(ctx context.Context, query func(context.Context, string, ...any) (*sql.Rows, error)) (string, error) {
	rows, err := query(ctx, "SELECT id, name, count FROM Categories ORDER BY id")
	if err != nil {
		if strings.Contains(err.Error(), "no such table") {
			return "(no rows)", nil
		}
		return "", err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id, count int64
		var name string
		if err := rows.Scan(&id, &name, &count); err != nil {
			return "", err
		}
		out = append(out, fmt.Sprintf("(%d, '%s', %d)", id, strings.ReplaceAll(name, "'", "''"), count))
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	if len(out) == 0 {
		return "(no rows)", nil
	}
	return strings.Join(out, ", "), nil
}

// cmdDemo is the demo subcommand.
func cmdDemo(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("data", "", "keep the databases in `DIR` (must be empty or absent); default: a temporary directory, removed at the end")
	speedup := fs.Float64("speedup", 1, "divide every interval and latency by `N`")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sqlrebase demo [--data DIR] [--speedup N]")
		fmt.Fprintln(stderr, "\nRuns the seed scenario: an in-process authority and three replicas behind simulated network links.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != 0 || *speedup <= 0 {
		fs.Usage()
		return 2
	}
	data := *dir
	if data == "" {
		tmp, err := os.MkdirTemp("", "sqlrebase-demo-")
		if err != nil {
			log.Error("demo: create temporary directory", "err", err)
			return 1
		}
		defer os.RemoveAll(tmp)
		data = tmp
	} else if err := freshDir(data); err != nil {
		log.Error("demo", "err", err)
		return 1
	}
	res, err := runDemo(ctx, demoConfig{Dir: data, Speedup: *speedup, Clients: seedClients(), Logger: log}, stdout)
	if err != nil {
		log.Error("demo failed", "err", err)
		return 1
	}
	if !res.Converged() {
		return 1
	}
	return 0
}

// freshDir makes sure dir exists and is empty: the scenario's expected end
// state assumes it starts from nothing.
func freshDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create --data %s: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read --data %s: %w", dir, err)
	}
	if len(entries) > 0 {
		return fmt.Errorf("--data %s is not empty: the demo starts from fresh databases; use a new directory", dir)
	}
	return nil
}
