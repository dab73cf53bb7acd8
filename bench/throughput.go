package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	sqlitedriver "github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// ThroughputConfig configures RunThroughput.
type ThroughputConfig struct {
	Dir string
	// Clients push at once, each on a QUIC connection of its own.
	Clients int
	// Mutations is how many each client pushes.
	Mutations int
	// Batch is the mutations per Push; Window the most a client keeps
	// pushed and not yet acknowledged.
	Batch, Window int
	Logger        *slog.Logger
}

// ThroughputResult is what RunThroughput measured.
type ThroughputResult struct {
	// PerSecond is acknowledged mutations per second over all clients.
	PerSecond float64
	// Versions is how many versions (group commits) the server made for
	// them.
	Versions uint64
}

// RunThroughput measures the server's throughput: cfg.Clients protocol
// clients push the demo mutator as fast as the server acknowledges it, each
// on its own counter row, with group commit and synchronous=FULL. Protocol
// clients stand in for replicas so that the clients' own rebases, on the
// same two cores, do not become what is measured.
func RunThroughput(ctx context.Context, cfg ThroughputConfig) (ThroughputResult, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	srv, addr, err := startBenchServer(ctx, filepath.Join(cfg.Dir, "server"), cfg.Logger, cfg.Clients)
	if err != nil {
		return ThroughputResult{}, err
	}
	defer srv.Close()
	var clients []*protocolClient
	defer func() {
		for _, c := range clients {
			c.conn.CloseWithError(0, "")
		}
	}()
	for i := range cfg.Clients {
		c, err := dialProtocolClient(ctx, srv, addr, fmt.Sprintf("thr-%d", i))
		if err != nil {
			return ThroughputResult{}, fmt.Errorf("throughput bench: %w", err)
		}
		clients = append(clients, c)
	}
	before := srv.Authority("bench").Version()
	start := time.Now()
	errs := make(chan error, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- c.pump(ctx, cfg.Mutations, cfg.Batch, cfg.Window, fmt.Sprintf("row-%d", i))
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		if err != nil {
			return ThroughputResult{}, fmt.Errorf("throughput bench: %w", err)
		}
	}
	return ThroughputResult{
		PerSecond: float64(cfg.Clients*cfg.Mutations) / elapsed.Seconds(),
		Versions:  srv.Authority("bench").Version() - before,
	}, nil
}

// pump pushes n demo mutations on row in pushes of batch, with at most
// window unacknowledged, and returns once all are acknowledged. Versions
// are read and not decoded: a replica's work is not the server's.
func (c *protocolClient) pump(ctx context.Context, n, batch, window int, row string) error {
	args := mutators.CategoryArgs(row, 1)
	acks := make(chan uint64, 1024)
	readErr := make(chan error, 1)
	go func() {
		for {
			m, err := c.r.Read()
			if err != nil {
				readErr <- err
				return
			}
			switch m := m.(type) {
			case *protocol.Ack:
				acks <- m.LastMutationID
			case *protocol.Error:
				readErr <- m.Err()
				return
			}
		}
	}()
	next, acked, last := uint64(1), uint64(0), uint64(n)
	timeout := time.NewTimer(time.Minute)
	defer timeout.Stop()
	for acked < last {
		for next <= last && next-acked-1 < uint64(window) {
			k := min(uint64(batch), last-next+1, uint64(window)-(next-acked-1))
			push := &protocol.Push{Mutations: make([]protocol.Mutation, 0, k)}
			for j := range k {
				push.Mutations = append(push.Mutations, protocol.Mutation{ID: next + j, Name: mutators.CreateCategoryOrIncrementIfExists, Args: args})
			}
			if err := protocol.WriteMessage(c.stream, push); err != nil {
				return err
			}
			next += k
		}
		select {
		case id := <-acks:
			acked = max(acked, id)
		case err := <-readErr:
			return err
		case <-timeout.C:
			return errors.New("no progress for a minute")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// RunSQLiteRate is the floor RunThroughput is measured against: the demo
// mutator's statement, prepared once, run n times in one transaction on a
// plain go-sqlite3 database in WAL mode with synchronous=FULL, committed
// once. It returns statements per second, commit included.
func RunSQLiteRate(ctx context.Context, dir string, n int) (float64, error) {
	db, err := sqlitedriver.Open("file:"+filepath.Join(dir, "plain.db"), nil)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	for _, q := range []string{"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", mutators.DemoSchema} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			return 0, fmt.Errorf("%s: %w", q, err)
		}
	}
	stmt, err := conn.PrepareContext(ctx, `INSERT INTO Categories(name, count) VALUES (?, ?)
		ON CONFLICT(name) DO UPDATE SET count = count + excluded.count`)
	if err != nil {
		return 0, err
	}
	defer stmt.Close()
	start := time.Now()
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return 0, err
	}
	for i := range n {
		if _, err := stmt.ExecContext(ctx, fmt.Sprintf("row-%d", i%10), 1); err != nil {
			return 0, err
		}
	}
	if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
		return 0, err
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// ThroughputSection is the server throughput section of the suite: clients
// pushing the demo mutator with group commit, against SQLite's own rate for
// the same statement in one transaction, interleaved run by run.
func ThroughputSection(clients, perClient int) Section {
	return Section{Name: "throughput", Run: func(ctx context.Context, env *Env) ([]Result, error) {
		var ours, floor []float64
		for run := range max(1, env.Config.Runs) {
			env.Progress("throughput: run %d", run+1)
			dir := filepath.Join(env.Dir, fmt.Sprintf("thr-r%d", run))
			res, err := RunThroughput(ctx, ThroughputConfig{Dir: dir, Clients: clients, Mutations: perClient, Batch: 200, Window: 2000})
			if err != nil {
				return nil, err
			}
			rate, err := RunSQLiteRate(ctx, dir, clients*perClient)
			if err != nil {
				return nil, err
			}
			ours, floor = append(ours, res.PerSecond), append(floor, rate)
		}
		return []Result{pairResult("throughput", fmt.Sprintf("server throughput, %d clients pushing, group commit", clients),
			map[string]int{"clients": clients}, "mutations/s", "ours", ours, "SQLite alone, one transaction", floor,
			"acknowledged mutations per second over QUIC, synchronous=FULL, one fsync per group; against the same statement prepared once in one plain transaction")}, nil
	}}
}
