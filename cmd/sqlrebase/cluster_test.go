package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/wal"
)

// The multi-process tests: `sqlrebase serve` runs as the built binary, and
// each replica is this test binary re-executed as a worker (workerEnv set),
// so every party is a process of its own that can be killed.

const workerEnv = "SQLREBASE_WORKER" // JSON workerConfig: be a worker

type workerConfig struct {
	Dir, Addr, Token, Fingerprint, Name string
	Count                               int // increments of the row named Name
}

// workerReport is what a worker prints last, on one line.
type workerReport struct {
	Version  uint64
	Checksum uint64
	Pending  int
	Rows     string
	// MutatedAt is when each Mutate returned (Unix nanoseconds), for the
	// test to count those made while the server was down.
	MutatedAt []int64
}

func TestMain(m *testing.M) {
	if cfg := os.Getenv(workerEnv); cfg != "" {
		os.Exit(runWorker(cfg))
	}
	if cfg := os.Getenv(clusterWorkerEnv); cfg != "" {
		os.Exit(runClusterWorker(cfg))
	}
	os.Exit(m.Run())
}

// runWorker makes Count mutations at a steady pace whatever the server is
// doing, then waits until all are settled and reports its state.
func runWorker(cfgJSON string) int {
	var cfg workerConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	ctx := context.Background()
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	r, err := replica.Open(ctx, filepath.Join(cfg.Dir, "replica.db"), replica.Options{
		Mutators: demoRegistry(),
		Remote:   &replica.Remote{Addr: cfg.Addr, Database: "demo", Credential: cfg.Token, Fingerprint: cfg.Fingerprint},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 1
	}
	defer r.Close()
	var mutatedAt []int64
	for i := 0; i < cfg.Count; i++ {
		if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(cfg.Name, 1)); err != nil {
			fmt.Fprintln(os.Stderr, "mutate:", err)
			return 1
		}
		mutatedAt = append(mutatedAt, time.Now().UnixNano())
		if i == 0 {
			os.WriteFile(filepath.Join(cfg.Dir, "started"), nil, 0o644) // the test waits for it
		}
		time.Sleep(time.Duration(4+rand.IntN(8)) * time.Millisecond)
	}
	sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	for first := true; first || r.Status().Pending > 0 || r.Status().Version < r.Status().ServerVersion; first = false {
		if err := r.Sync(sctx); err != nil {
			fmt.Fprintln(os.Stderr, "sync:", err, r.Status().LastError)
			return 1
		}
	}
	rows, err := queryRows(ctx, r.DB().QueryContext)
	if err != nil {
		fmt.Fprintln(os.Stderr, "rows:", err)
		return 1
	}
	st := r.Status()
	b, _ := json.Marshal(workerReport{Version: st.Version, Checksum: st.Checksum, Pending: st.Pending, Rows: rows, MutatedAt: mutatedAt})
	fmt.Println(string(b))
	return 0
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// sqlrebaseBinary builds the command once per test run.
func sqlrebaseBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sqlrebase-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "sqlrebase")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// serveProc is a running `sqlrebase serve`.
type serveProc struct {
	cmd         *exec.Cmd
	addr        string
	fingerprint string
	stderr      *strings.Builder
}

func startServe(t *testing.T, dir string, port int, dbs ...string) *serveProc {
	t.Helper()
	args := []string{"serve", "--data", dir, "--listen", fmt.Sprintf("127.0.0.1:%d", port)}
	for _, d := range dbs {
		args = append(args, "--db", d)
	}
	cmd := exec.Command(sqlrebaseBinary(t), args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &serveProc{cmd: cmd, stderr: &strings.Builder{}}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "listening: "); ok {
			p.addr = v
		}
		if v, ok := strings.CutPrefix(line, "fingerprint: "); ok {
			p.fingerprint = v
		}
		if strings.HasPrefix(line, "databases: ") {
			break
		}
	}
	if p.addr == "" || p.fingerprint == "" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("serve did not start: %s", p.stderr)
	}
	go io.Copy(io.Discard, stdout)
	return p
}

func startWorker(t *testing.T, cfg workerConfig) (*exec.Cmd, *strings.Builder, *strings.Builder) {
	t.Helper()
	b, _ := json.Marshal(cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), workerEnv+"="+string(b))
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, &stdout, &stderr
}

func report(t *testing.T, name string, stdout, stderr *strings.Builder) workerReport {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	var rep workerReport
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &rep); err != nil {
		t.Fatalf("%s: no report (%v); stderr:\n%s", name, err, stderr)
	}
	return rep
}

// TestServerKilled: three replica processes mutate steadily while the
// server process is killed with SIGKILL and restarted, once after a long
// outage during which the replicas work offline. Every mutation a replica
// made is applied exactly once (the counts), and all parties converge on
// the same checksum, which the server's file, judged by the stock sqlite3
// CLI and our checksum, agrees with.
func TestServerKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test")
	}
	dir := t.TempDir()
	port := freeUDPPort(t)
	data := filepath.Join(dir, "server")
	srv := startServe(t, data, port, "demo:tok")
	const count = 120
	names := []string{"w1", "w2", "w3"}
	type proc struct {
		cmd            *exec.Cmd
		stdout, stderr *strings.Builder
	}
	var procs []proc
	for _, n := range names {
		cmd, o, e := startWorker(t, workerConfig{Dir: filepath.Join(dir, n), Addr: srv.addr, Token: "tok", Fingerprint: srv.fingerprint, Name: n, Count: count})
		procs = append(procs, proc{cmd, o, e})
	}
	// The workers take more than half a second to make their mutations.
	// Once each has made its first, the server dies for 0.6 s, so that
	// they make many of them while it is down; two short outages follow,
	// at random moments.
	waitCtx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, n := range names {
		for {
			if _, err := os.Stat(filepath.Join(dir, n, "started")); err == nil {
				break
			}
			select {
			case <-waitCtx.Done():
				t.Fatalf("%s made no mutation", n)
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	type outage struct{ from, to int64 }
	var outages []outage
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	for kill := 0; kill < 3; kill++ {
		if kill > 0 {
			time.Sleep(time.Duration(100+rng.IntN(200)) * time.Millisecond)
		}
		srv.cmd.Process.Signal(syscall.SIGKILL)
		srv.cmd.Wait()
		from := time.Now().UnixNano()
		down := time.Duration(50+rng.IntN(150)) * time.Millisecond
		if kill == 0 {
			down = 600 * time.Millisecond
		}
		time.Sleep(down)
		outages = append(outages, outage{from, time.Now().UnixNano()})
		srv = startServe(t, data, port)
	}
	offline := 0
	for i, p := range procs {
		if err := p.cmd.Wait(); err != nil {
			t.Fatalf("%s: %v\n%s", names[i], err, p.stderr)
		}
		for _, at := range report(t, names[i], p.stdout, p.stderr).MutatedAt {
			for _, o := range outages {
				if at >= o.from && at <= o.to {
					offline++
				}
			}
		}
	}
	if offline == 0 {
		t.Fatal("no mutation was made while the server was down: the test did not test working offline")
	}
	// Bring every replica to the final version, then compare.
	var reps []workerReport
	for _, n := range names {
		cmd, o, e := startWorker(t, workerConfig{Dir: filepath.Join(dir, n), Addr: srv.addr, Token: "tok", Fingerprint: srv.fingerprint, Name: n})
		if err := cmd.Wait(); err != nil {
			t.Fatalf("%s final sync: %v\n%s", n, err, e)
		}
		reps = append(reps, report(t, n, o, e))
	}
	want := fmt.Sprintf("(1, 'w1', %d), (2, 'w2', %d), (3, 'w3', %d)", count, count, count)
	for i, r := range reps {
		if r.Version != reps[0].Version || r.Checksum != reps[0].Checksum || r.Pending != 0 || r.Rows != reps[0].Rows {
			t.Errorf("%s ended at %+v, %s at %+v", names[i], r, names[0], reps[0])
		}
		if !sameRows(r.Rows, want) {
			t.Errorf("%s has %s, want each row at %d", names[i], r.Rows, count)
		}
	}
	srv.cmd.Process.Signal(syscall.SIGTERM)
	if err := srv.cmd.Wait(); err != nil {
		t.Fatalf("serve did not stop cleanly on SIGTERM: %v\n%s", err, srv.stderr)
	}
	db := filepath.Join(data, "dbs", "demo", "db.sqlite")
	out, err := exec.Command("sqlite3", db, "PRAGMA integrity_check", "SELECT group_concat(name || '=' || count, ',') FROM (SELECT name, count FROM Categories ORDER BY name)").CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != fmt.Sprintf("ok\nw1=%d,w2=%d,w3=%d", count, count, count) {
		t.Fatalf("the sqlite3 CLI reads the server's database as:\n%s", got)
	}
	b, err := os.ReadFile(db)
	if err != nil {
		t.Fatal(err)
	}
	sums := wal.NewChecksumTable(wal.DefaultPageSize)
	sums.Resize(uint32(len(b) / wal.DefaultPageSize))
	for i := 0; i < len(b)/wal.DefaultPageSize; i++ {
		sums.Set(uint32(i+1), wal.PageChecksum(uint32(i+1), b[i*wal.DefaultPageSize:(i+1)*wal.DefaultPageSize]))
	}
	if sums.Sum() != reps[0].Checksum {
		t.Fatalf("server file checksum %016x, replicas %016x", sums.Sum(), reps[0].Checksum)
	}
	t.Logf("converged at version %d after 3 server kills, %d mutations made offline", reps[0].Version, offline)
}

// sameRows compares row lists ignoring ids (the order rows were created in
// depends on timing).
func sameRows(a, b string) bool { return stripIDs(a) == stripIDs(b) }

func stripIDs(rows string) string {
	var names []string
	for _, r := range strings.Split(rows, "), (") {
		r = strings.Trim(r, "()")
		if _, rest, ok := strings.Cut(r, ", "); ok {
			names = append(names, rest)
		}
	}
	slices.Sort(names)
	return strings.Join(names, ";")
}

// TestDemoAgainstServe: `demo --server` runs the replicas against a running
// `serve`, and refuses with a clear message and a non-zero exit on a wrong
// token, an unknown database or a wrong fingerprint.
func TestDemoAgainstServe(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test")
	}
	dir := t.TempDir()
	srv := startServe(t, filepath.Join(dir, "server"), 0, "demo:tok", "other:tok2")
	bin := sqlrebaseBinary(t)
	run := func(args ...string) (int, string, string) {
		cmd := exec.Command(bin, append([]string{"demo", "--speedup", "200", "--server", srv.addr}, args...)...)
		var o, e strings.Builder
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return code, o.String(), e.String()
	}
	code, out, errOut := run("--db", "demo", "--token", "tok", "--fingerprint", srv.fingerprint, "--data", filepath.Join(dir, "r"))
	if code != 0 || !strings.Contains(out, "converged: all 3 parties at version") || !strings.Contains(out, "(1, 'Food', 1)") {
		t.Fatalf("demo --server: exit %d\n%s\n%s", code, out, errOut)
	}
	for _, c := range []struct {
		name string
		args []string
		says string
	}{
		{"wrong token", []string{"--db", "demo", "--token", "nope", "--fingerprint", srv.fingerprint}, "unauthorized"},
		{"unknown database", []string{"--db", "nosuch", "--token", "tok", "--fingerprint", srv.fingerprint}, "unknown database"},
		{"wrong fingerprint", []string{"--db", "demo", "--token", "tok", "--fingerprint", "sha256:" + strings.Repeat("0", 64)}, "fingerprint"},
		{"token of another database", []string{"--db", "demo", "--token", "tok2", "--fingerprint", srv.fingerprint}, "unauthorized"},
	} {
		code, out, errOut := run(append(c.args, "--data", filepath.Join(dir, strconv.Itoa(rand.IntN(1e9))))...)
		if code == 0 || !strings.Contains(errOut, c.says) {
			t.Errorf("%s: exit %d, stderr %q, stdout:\n%s", c.name, code, errOut, out)
		}
		// Said once, as the demo's last line: not also by each replica's log.
		if n := strings.Count(errOut, c.says); c.says == "unauthorized" && n != 1 {
			t.Errorf("%s: stderr says %q %d times, want once:\n%s", c.name, c.says, n, errOut)
		}
	}
}
