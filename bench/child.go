package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/wal"
)

// ChildSpec is what a child process of the suite does. The suite runs
// children for what cannot be measured in its own process: the peak RSS of
// one engine alone, and a kill -9 in the middle of pending work.
type ChildSpec struct {
	// Kind is "rss" (run a workload and exit), "idle" (exit at once: the
	// process's own floor) or "kill" (mutate, say "ready", wait to be
	// killed).
	Kind string `json:"kind"`
	// Engine is "ours" or "savepoint".
	Engine string `json:"engine"`
	// Path is the database (ours: a replica that has caught up with the
	// authority; savepoint: a copy of its main file).
	Path string `json:"path"`
	// Updates is a file of the server's updates: for ours length-prefixed
	// page sets, for the savepoint engine a JSON array of statement lists.
	Updates string `json:"updates,omitempty"`
	// Pending is how many local mutations to make first.
	Pending int `json:"pending"`
	// Workload is "todo" or "seed" (the demo mutator).
	Workload string `json:"workload"`
}

// childReady is the line a "kill" child prints once its mutations are made.
const childReady = "ready"

// RunChild runs one child's work (see ChildSpec) and writes a one-line
// JSON summary to stdout. The sqlrebase binary's hidden "bench --child"
// flag and the bench package's tests call it in a fresh process.
func RunChild(ctx context.Context, spec []byte, stdout io.Writer) error {
	var s ChildSpec
	if err := json.Unmarshal(spec, &s); err != nil {
		return fmt.Errorf("bench child: spec: %w", err)
	}
	if s.Kind == "idle" {
		return json.NewEncoder(stdout).Encode(map[string]any{"ok": true, "peak_rss": peakRSS()})
	}
	reg, err := NewRegistry()
	if err != nil {
		return err
	}
	muts := childMutations(s)
	switch s.Engine {
	case "ours":
		r, err := replica.Open(ctx, s.Path, replica.Options{Mutators: reg})
		if err != nil {
			return fmt.Errorf("bench child: %w", err)
		}
		defer r.Close()
		for _, m := range muts {
			h, err := r.Mutate(ctx, m.Name, m.Args)
			if err != nil {
				return fmt.Errorf("bench child: %w", err)
			}
			if err := h.LocalErr(); err != nil {
				return fmt.Errorf("bench child: %w", err)
			}
		}
		if s.Kind == "kill" {
			return waitForKill(ctx, stdout)
		}
		sets, err := readPageSets(s.Updates)
		if err != nil {
			return err
		}
		for _, ps := range sets {
			if err := r.Rebase(ctx, ps); err != nil {
				return fmt.Errorf("bench child: %w", err)
			}
		}
		st := r.Status()
		return json.NewEncoder(stdout).Encode(map[string]any{"ok": true, "version": st.Version, "pending": st.Pending,
			"checksum": st.Checksum, "peak_rss": peakRSS()})
	case "savepoint":
		e, err := OpenSavepoint(s.Path, reg)
		if err != nil {
			return fmt.Errorf("bench child: %w", err)
		}
		defer e.Close()
		for _, m := range muts {
			if err := e.Mutate(ctx, m.Name, m.Args); err != nil {
				return fmt.Errorf("bench child: %w", err)
			}
		}
		if s.Kind == "kill" {
			return waitForKill(ctx, stdout)
		}
		b, err := os.ReadFile(s.Updates)
		if err != nil {
			return fmt.Errorf("bench child: %w", err)
		}
		var updates [][]string
		if err := json.Unmarshal(b, &updates); err != nil {
			return fmt.Errorf("bench child: updates: %w", err)
		}
		for _, stmts := range updates {
			if err := e.Rebase(ctx, stmts, 0); err != nil {
				return fmt.Errorf("bench child: %w", err)
			}
		}
		return json.NewEncoder(stdout).Encode(map[string]any{"ok": true, "pending": e.Pending(), "peak_rss": peakRSS()})
	}
	return fmt.Errorf("bench child: unknown engine %q", s.Engine)
}

// childMutations are the local mutations of a child: the same sequence for
// both engines.
func childMutations(s ChildSpec) []Mutation {
	muts := make([]Mutation, s.Pending)
	g := newTodoGen(7, 5_000_000)
	for i := range muts {
		if s.Workload == "todo" {
			muts[i] = g.next()
		} else {
			muts[i] = demoMutation("Food", 1)
		}
	}
	return muts
}

// waitForKill says ready and waits for the parent's SIGKILL (or ctx).
func waitForKill(ctx context.Context, stdout io.Writer) error {
	if _, err := fmt.Fprintln(stdout, childReady); err != nil {
		return err
	}
	if f, ok := stdout.(*os.File); ok {
		f.Sync()
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Minute):
		return errors.New("bench child: was not killed within a minute")
	}
}

// writePageSets writes sets to path, each as a 4-byte big-endian length and
// its encoding.
func writePageSets(path string, sets []*wal.PageSet) error {
	var buf []byte
	for _, ps := range sets {
		enc, err := ps.MarshalBinary()
		if err != nil {
			return err
		}
		buf = binary.BigEndian.AppendUint32(buf, uint32(len(enc)))
		buf = append(buf, enc...)
	}
	return os.WriteFile(path, buf, 0o644)
}

func readPageSets(path string) ([]*wal.PageSet, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("bench child: %w", err)
	}
	var sets []*wal.PageSet
	for len(b) > 0 {
		if len(b) < 4 {
			return nil, fmt.Errorf("bench child: %s: %w", path, wal.ErrTruncated)
		}
		n := int(binary.BigEndian.Uint32(b))
		if len(b)-4 < n {
			return nil, fmt.Errorf("bench child: %s: %w", path, wal.ErrTruncated)
		}
		ps, err := wal.DecodePageSet(b[4:4+n], wal.Limits{})
		if err != nil {
			return nil, fmt.Errorf("bench child: %s: %w", path, err)
		}
		sets = append(sets, ps)
		b = b[4+n:]
	}
	return sets, nil
}

// runChild runs spec in a child process to its end and returns its output.
func runChild(ctx context.Context, env *Env, spec ChildSpec) ([]byte, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	out, err := env.Config.Child(ctx, b).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return out, fmt.Errorf("child %s/%s: %w", spec.Kind, spec.Engine, err)
	}
	return out, nil
}

// peakRSS is this process's peak resident set size in bytes: VmHWM from
// /proc/self/status on Linux. Not the parent's ru_maxrss of the child:
// os/exec starts children with vfork, and Linux carries the high-water
// mark of the shared (parent's) memory across the exec into the child's
// ru_maxrss, so every child would report at least the parent's RSS.
// Elsewhere getrusage is the best there is.
func peakRSS() int64 {
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				if err == nil {
					return kb * 1024
				}
			}
		}
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	if runtime.GOOS == "darwin" {
		return int64(ru.Maxrss) // bytes on macOS
	}
	return int64(ru.Maxrss) * 1024 // KiB elsewhere
}

// runMemory measures the peak RSS of one replica per engine, each in a
// process of its own: open a todo database of TodoRows rows, make
// RSSPending local mutations, rebase RSSRounds times onto K=10 server
// mutations each. Both children run the same mutations on the same state.
func runMemory(ctx context.Context, env *Env) ([]Result, error) {
	cfg := env.Config
	if cfg.Child == nil {
		return nil, fmt.Errorf("%w: no way to start a child process (Config.Child)", errSkipped)
	}
	env.Progress("memory: set-up")
	o, err := openOurs(ctx, filepath.Join(env.Dir, "base"), env.Registry, replica.Normal, [][]string{todoSetup(cfg.TodoRows)})
	if err != nil {
		return nil, err
	}
	gen := newTodoGen(9, 8_000_000)
	var sets []*wal.PageSet
	var updates [][]string
	for range cfg.RSSRounds {
		muts := todoBatch(gen, 10)
		ps, err := o.serverBatch(ctx, muts)
		if err != nil {
			o.close()
			return nil, err
		}
		sets = append(sets, ps)
		stmts, err := serverSQL(muts)
		if err != nil {
			o.close()
			return nil, err
		}
		updates = append(updates, stmts)
	}
	final := o.auth.Checksum()
	if err := o.close(); err != nil {
		return nil, err
	}

	setsPath := filepath.Join(env.Dir, "sets.bin")
	if err := writePageSets(setsPath, sets); err != nil {
		return nil, err
	}
	sqlPath := filepath.Join(env.Dir, "sql.json")
	sqlJSON, err := json.Marshal(updates)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(sqlPath, sqlJSON, 0o644); err != nil {
		return nil, err
	}
	baseDir := filepath.Join(env.Dir, "base")

	var oursRSS, spRSS, idleRSS []float64
	for run := range cfg.Runs {
		env.Progress("memory: run %d", run+1)
		dir := filepath.Join(env.Dir, fmt.Sprintf("run%d", run))
		if err := copyDir(baseDir, dir); err != nil {
			return nil, err
		}
		engines := []string{"ours", "savepoint"}
		if run%2 == 1 {
			engines = []string{"savepoint", "ours"}
		}
		for _, engine := range engines {
			spec := ChildSpec{Kind: "rss", Engine: engine, Pending: cfg.RSSPending, Workload: "todo",
				Path: filepath.Join(dir, "replica.db"), Updates: setsPath}
			if engine == "savepoint" {
				// The savepoint engine starts from the same database: the
				// replica's main file is a plain SQLite database.
				spec.Path, spec.Updates = filepath.Join(dir, "savepoint.db"), sqlPath
				if err := copyFile(filepath.Join(dir, "replica.db"), spec.Path); err != nil {
					return nil, err
				}
			}
			out, err := runChild(ctx, env, spec)
			if err != nil {
				return nil, err
			}
			var res struct {
				OK       bool   `json:"ok"`
				Pending  int    `json:"pending"`
				Checksum uint64 `json:"checksum"`
				PeakRSS  int64  `json:"peak_rss"`
			}
			if err := json.Unmarshal(out, &res); err != nil || !res.OK || res.Pending != cfg.RSSPending || res.PeakRSS <= 0 {
				return nil, fmt.Errorf("child %s: unexpected outcome %q (%v)", engine, out, err)
			}
			if engine == "ours" && res.Checksum != final {
				return nil, fmt.Errorf("child ours: main file checksum %x, server %x", res.Checksum, final)
			}
			if engine == "ours" {
				oursRSS = append(oursRSS, float64(res.PeakRSS)/(1<<20))
			} else {
				spRSS = append(spRSS, float64(res.PeakRSS)/(1<<20))
			}
		}
		out, err := runChild(ctx, env, ChildSpec{Kind: "idle"})
		if err != nil {
			return nil, err
		}
		var idle struct {
			PeakRSS int64 `json:"peak_rss"`
		}
		if err := json.Unmarshal(out, &idle); err != nil {
			return nil, fmt.Errorf("idle child: %q: %w", out, err)
		}
		idleRSS = append(idleRSS, float64(idle.PeakRSS)/(1<<20))
		os.RemoveAll(dir)
	}
	idle := summarize(idleRSS)
	return []Result{pairResult("memory",
		fmt.Sprintf("peak RSS per replica, todo %dk rows, %d pending, %d rebases of K=10", cfg.TodoRows/1000, cfg.RSSPending, cfg.RSSRounds),
		map[string]int{"pending": cfg.RSSPending, "k": 10}, "MB", "ours", oursRSS, "savepoint", spRSS,
		fmt.Sprintf("each engine alone in a child process, its peak RSS (VmHWM); the same binary doing nothing peaks at %.1f MB", idle.Median))}, nil
}

func copyDir(from, to string) error {
	if err := os.MkdirAll(to, 0o755); err != nil {
		return err
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			if err := copyFile(filepath.Join(from, e.Name()), filepath.Join(to, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o644)
}

// startKillChild starts a "kill" child and waits for it to say ready.
func startKillChild(ctx context.Context, env *Env, spec ChildSpec) (*exec.Cmd, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	cmd := env.Config.Child(ctx, b)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != childReady+"\n" {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("kill child %s: got %q before ready: %v", spec.Engine, line, err)
	}
	return cmd, nil
}
