package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
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
	// Remote, if set, runs only the replicas, against a running server;
	// nil runs the server in-process on an ephemeral loopback port.
	Remote *replica.Remote
}

// partyState is what one party (the server or a replica) holds at the end.
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
	// Authority is the server's state; with a remote server, whose database
	// the demo cannot read, it is the first replica's.
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

// demoClient is one replica, with the socket that gives it its latency.
type demoClient struct {
	spec clientSpec
	r    *replica.Replica
	tp   *replica.Transport
	conn *latencyConn
	// mu keeps a Mutate together with the lines it prints, so the
	// transcript tells the story in the order it happened.
	mu sync.Mutex
}

// runDemo runs the scenario and reports whether everything converged. It
// returns an error only if the scenario could not run (a database failed,
// the server refused the replicas, ctx ended); non-convergence is a result,
// not an error.
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
	reg := demoRegistry()

	var names sync.Map // client id → name, for the server's lines
	name := func(id string) string {
		if n, ok := names.Load(id); ok {
			return n.(string)
		}
		return id
	}
	remote := cfg.Remote
	var srv *server.Server
	if remote == nil {
		var err error
		srv, err = server.Open(ctx, server.Config{
			Dir: filepath.Join(cfg.Dir, "server"), Mutators: reg, Setup: demoSetup, Logger: cfg.Logger,
			OnBatch: func(db string, version uint64, results []server.Result) {
				for _, res := range results {
					tr.printf("BACKEND got %s #%d: %s%s", name(res.Mutation.ClientID), res.Mutation.ID, outcome(res.Outcome), suffix(res.Err))
				}
				if rows, err := authorityRows(ctx, srv.Authority(db)); err == nil {
					tr.view("BACKEND", rows)
				}
				tr.printf("BACKEND broadcasts version %d", version)
			},
		})
		if err != nil {
			return demoResult{}, err
		}
		defer srv.Close()
		token := randomToken()
		if err := srv.AddDatabase(ctx, "demo", token); err != nil {
			return demoResult{}, err
		}
		addr, err := srv.Listen(ctx, "127.0.0.1:0")
		if err != nil {
			return demoResult{}, err
		}
		remote = &replica.Remote{Addr: addr, Database: "demo", Credential: token, Fingerprint: srv.Fingerprint()}
		tr.printf("BACKEND serving QUIC on %s at version %d (%s), fingerprint %s", addr, srv.Authority("demo").Version(), cfg.Dir, srv.Fingerprint())
	} else {
		tr.printf("server %s, database %s, fingerprint %s", remote.Addr, remote.Database, remote.Fingerprint)
	}

	// Each replica's own socket: on loopback for a server there, else on
	// every interface.
	bind := ":0"
	if host, _, err := net.SplitHostPort(remote.Addr); err == nil {
		if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
			bind = "127.0.0.1:0"
		}
	}
	var clients []*demoClient
	defer func() {
		for _, c := range clients {
			c.r.Close()
			c.tp.Close()
			c.conn.Close()
		}
	}()
	for _, spec := range cfg.Clients {
		udp, err := net.ListenPacket("udp", bind)
		if err != nil {
			return demoResult{}, err
		}
		c := &demoClient{spec: spec, conn: newLatencyConn(udp, scale(spec.Latency))}
		// A handshake takes two round trips of this link.
		c.tp = replica.NewTransport(replica.TransportOptions{PacketConn: c.conn, Logger: cfg.Logger, HandshakeTimeout: 4*scale(spec.Latency) + 5*time.Second})
		rm := *remote
		rm.Transport = c.tp
		// A fatal refusal (a wrong token) is the demo's own last line: the
		// replicas need not log it three times before that.
		quiet := slog.New(withoutMessage{cfg.Logger.Handler(), "sqlrebase: sync stopped"})
		c.r, err = replica.Open(ctx, filepath.Join(cfg.Dir, spec.Name+".db"), replica.Options{Mutators: reg, Logger: quiet, Remote: &rm})
		if err != nil {
			c.tp.Close()
			c.conn.Close()
			return demoResult{}, err
		}
		clients = append(clients, c)
		names.Store(c.r.ClientID(), spec.Name)
		c.r.OnChange(func(ch replica.Change) {
			if !ch.Rebased {
				return
			}
			tr.printf("%s rebased to v%d: replayed %d pending", c.spec.Name, ch.Version, ch.Pending)
			c.printView(ctx, tr)
		})
		tr.printf("%s running: client id %s, latency %v each way (in its UDP socket)", spec.Name, c.r.ClientID(), scale(spec.Latency))
	}
	// Against a server we did not start, a refusal (wrong token, unknown
	// database, wrong fingerprint) is likely and final: say so before the
	// scenario starts rather than after it. Our own server cannot refuse,
	// and Mutate never waits for the network, so then the scenario starts
	// at once, as the seed's does.
	for _, c := range clients {
		if cfg.Remote == nil {
			break
		}
		cctx, cancel := context.WithTimeout(ctx, scale(4*c.spec.Latency)+10*time.Second)
		err := c.r.WaitConnected(cctx)
		cancel()
		if err != nil {
			return demoResult{}, fmt.Errorf("%s could not connect to %s: %w", c.spec.Name, remote.Addr, err)
		}
	}
	if cfg.Remote != nil {
		tr.printf("all replicas connected")
	}

	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var senders sync.WaitGroup
	for _, c := range clients {
		if c.spec.Sends == 0 {
			continue
		}
		senders.Go(func() {
			if err := c.send(runCtx, scale(c.spec.Interval), tr); err != nil {
				cancel(fmt.Errorf("%s: %w", c.spec.Name, err))
			}
		})
	}
	senders.Wait()
	if err := context.Cause(runCtx); err != nil {
		return demoResult{}, err
	}
	tr.printf("all sends done; waiting up to %v for everyone to settle", cfg.Settle)
	var auth *server.Authority
	if srv != nil {
		auth = srv.Authority("demo")
	}
	settled := waitSettled(runCtx, cfg.Settle, auth, clients)
	if err := context.Cause(runCtx); err != nil {
		return demoResult{}, err
	}
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
				tr.printf("DIFFERS: %s; %s is %s", p, res.Authority.Name, res.Authority)
			}
		}
	}
	parties := len(clients)
	if auth != nil {
		parties++
	}
	if res.Converged() {
		tr.printf("converged: all %d parties at version %d with %s, checksum %016x",
			parties, res.Authority.Version, res.Authority.Rows, res.Authority.Checksum)
	} else {
		tr.printf("NOT converged: %s differ(s) from %s", strings.Join(res.Differ, ", "), res.Authority.Name)
	}
	return res, nil
}

// randomToken makes the in-process server's credential.
func randomToken() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
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

// send runs the client's mutations: each runs at once locally; the
// replica's sync loop pushes it over QUIC.
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
	}
	return nil
}

func localErr(err error) string {
	if err == nil {
		return ""
	}
	return "; local run failed: " + err.Error()
}

func (c *demoClient) printView(ctx context.Context, tr *transcript) error {
	rows, err := queryRows(ctx, c.r.DB().QueryContext)
	if err != nil {
		return fmt.Errorf("read view: %w", err)
	}
	tr.view(c.spec.Name, rows)
	return nil
}

// waitSettled waits until every replica has nothing pending and all are at
// the same version: the server's, when it runs in-process.
func waitSettled(ctx context.Context, limit time.Duration, auth *server.Authority, clients []*demoClient) bool {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		ok := true
		var v uint64
		if auth != nil {
			v = auth.Version()
		} else if len(clients) > 0 {
			v = max(clients[0].r.Status().Version, clients[0].r.Status().ServerVersion)
		}
		for _, c := range clients {
			st := c.r.Status()
			ok = ok && st.Version == v && st.Pending == 0
		}
		if ok {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

// compare reads every party's final state and names the replicas that
// differ from the server (or, with a remote server, from the first replica)
// in rows, version, checksum or pending work.
func compare(ctx context.Context, auth *server.Authority, clients []*demoClient) (demoResult, error) {
	var res demoResult
	for _, c := range clients {
		rows, err := queryRows(ctx, c.r.DB().QueryContext)
		if err != nil {
			return demoResult{}, fmt.Errorf("read %s: %w", c.spec.Name, err)
		}
		st := c.r.Status()
		res.Clients = append(res.Clients, partyState{Name: c.spec.Name, Version: st.Version, Pending: st.Pending, Rows: rows, Checksum: st.Checksum})
	}
	if auth != nil {
		rows, err := authorityRows(ctx, auth)
		if err != nil {
			return demoResult{}, err
		}
		res.Authority = partyState{Name: "BACKEND", Version: auth.Version(), Rows: rows, Checksum: auth.Checksum()}
	} else if len(res.Clients) > 0 {
		res.Authority = res.Clients[0]
	}
	for _, p := range res.Clients {
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
	serverAddr := fs.String("server", "", "run only the replicas, against the server at `HOST:PORT` (see sqlrebase serve)")
	dbName := fs.String("db", "demo", "with --server: the database `NAME`")
	token := fs.String("token", "", "with --server: the database's `SECRET`")
	fingerprint := fs.String("fingerprint", "", "with --server: the server certificate's `sha256:HEX`, as serve prints it")
	caFile := fs.String("ca", "", "with --server: trust the server's certificate through this CA `FILE` instead of a fingerprint")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sqlrebase demo [--data DIR] [--speedup N]")
		fmt.Fprintln(stderr, "       sqlrebase demo --server HOST:PORT --db NAME --token SECRET --fingerprint sha256:HEX [--data DIR] [--speedup N]")
		fmt.Fprintln(stderr, "\nRuns the seed scenario over QUIC: three replicas, each with the seed's latency in its UDP socket, and a")
		fmt.Fprintln(stderr, "server on an ephemeral loopback port in this process, or a running `sqlrebase serve` with --server.")
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
	var remote *replica.Remote
	if *serverAddr != "" {
		if *token == "" || (*fingerprint == "" && *caFile == "") {
			fmt.Fprintln(stderr, "sqlrebase demo: --server needs --token and --fingerprint (or --ca)")
			return 2
		}
		remote = &replica.Remote{Addr: *serverAddr, Database: *dbName, Credential: *token, Fingerprint: *fingerprint, CAFile: *caFile}
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
	} else if remote != nil {
		// Against a running server the replicas may be reused: their
		// state is the server's business, and a rerun adds to it.
		if err := os.MkdirAll(data, 0o755); err != nil {
			fmt.Fprintf(stderr, "sqlrebase demo: %v\n", err)
			return 1
		}
	} else if err := freshDir(data); err != nil {
		log.Error("demo", "err", err)
		return 1
	}
	res, err := runDemo(ctx, demoConfig{Dir: data, Speedup: *speedup, Clients: seedClients(), Logger: log, Remote: remote}, stdout)
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase demo: %v\n", err)
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

// withoutMessage is a slog handler that drops the records with one message.
type withoutMessage struct {
	slog.Handler
	msg string
}

func (h withoutMessage) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == h.msg {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h withoutMessage) WithAttrs(as []slog.Attr) slog.Handler {
	return withoutMessage{h.Handler.WithAttrs(as), h.msg}
}

func (h withoutMessage) WithGroup(name string) slog.Handler {
	return withoutMessage{h.Handler.WithGroup(name), h.msg}
}
