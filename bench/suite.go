package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// Config sets the size of a suite run. QuickConfig and FullConfig are the
// two sizes `sqlrebase bench` offers; tests use smaller ones.
type Config struct {
	// Quick marks the quick size in the report.
	Quick bool
	// Runs is how many times each measurement is repeated (interleaved
	// between the engines); the report gives the median and min–max.
	Runs int
	// Iters is how many samples one run takes of a fast operation; its
	// median is the run's value. Slow operations take fewer (see iters).
	Iters int
	// Pending are the pending depths N of the rebase series, and Batch the
	// server batch sizes K (mutations of another client in the one server
	// version the rebase applies).
	Pending, Batch []int
	// DurablePending are the depths at which our engine is also measured
	// at Durability Full (fsync on every Mutate and rebase).
	DurablePending []int
	// DropPending are the pending depths of the drop-alone series.
	DropPending []int
	// MutateOps is how many mutations one run of a mutate series times.
	MutateOps int
	// Clients and Rounds size the counters workload.
	Clients, Rounds int
	// TodoRows is the todo table's size (the 100k); TodoPending
	// the depths of the todo rebase series, at K=10.
	TodoRows    int
	TodoPending []int
	// SizesMB are the database sizes of the size series.
	SizesMB []int
	// RSSPending and RSSRounds size the peak-RSS workload run in a child
	// process per engine.
	RSSPending, RSSRounds int
	// CapabilityPending is the pending depth of the torn-read capability.
	CapabilityPending int

	// Dir is where the databases go; empty means a temporary directory
	// that is removed at the end.
	Dir string
	// Progress, if set, gets one line per step, so that a long run shows
	// it is alive.
	Progress io.Writer
	// Child builds the command that runs RunChild with spec in a fresh
	// process (peak RSS per engine; kill -9). Nil skips those sections and
	// the kill -9 capability, and the report says so.
	Child func(ctx context.Context, spec []byte) *exec.Cmd
	// Sections are extra sections run after the local ones: the hook for
	// the end-to-end numbers over the network (issue 3).
	Sections []Section
	// Only, if not empty, names the sections to run (by Section.Name).
	Only []string
}

// QuickConfig finishes in well under a minute on a 2-core machine: three
// runs, pending depths up to 1,000 for the rebase (10,000 for the drop),
// databases of 1 and 10 MB.
func QuickConfig() Config {
	return Config{
		Quick: true, Runs: 3, Iters: 3,
		Pending: []int{0, 1, 10, 100, 1000}, Batch: []int{1, 10, 100},
		DurablePending: []int{100},
		DropPending:    []int{1, 100, 10000},
		MutateOps:      100,
		Clients:        3, Rounds: 4,
		TodoRows: todoRows, TodoPending: []int{100},
		SizesMB:    []int{1, 10},
		RSSPending: 1000, RSSRounds: 5,
		CapabilityPending: 200,
	}
}

// FullConfig is the full suite: five runs, the whole grid (N up to
// 10,000; K 1, 10, 100), databases of 1, 10 and 100 MB (add 1024 to
// SizesMB for 1 GB: `sqlrebase bench --huge`). It takes minutes.
func FullConfig() Config {
	return Config{
		Runs: 5, Iters: 5,
		Pending: []int{0, 1, 10, 100, 1000, 10000}, Batch: []int{1, 10, 100},
		DurablePending: []int{100, 1000},
		DropPending:    []int{1, 10, 100, 1000, 10000},
		MutateOps:      300,
		Clients:        8, Rounds: 10,
		TodoRows: todoRows, TodoPending: []int{100, 1000},
		SizesMB:    []int{1, 10, 100},
		RSSPending: 1000, RSSRounds: 10,
		CapabilityPending: 1000,
	}
}

// iters is how many samples a run takes at pending depth n: the median of
// several for fast rebases, one for the slow ones.
func (c Config) iters(n int) int {
	switch {
	case n >= 10000:
		return 1
	case n >= 1000:
		return max(1, min(c.Iters, 2))
	}
	return max(1, c.Iters)
}

// Section is one part of the suite. Run returns its lines; Capability
// sections may add rows to the capability table through env.
type Section struct {
	Name string
	Run  func(ctx context.Context, env *Env) ([]Result, error)
}

// Env is what a section gets: the configuration, a directory of its own,
// the shared mutator registry, and the capability table to add rows to.
type Env struct {
	Config Config
	// Dir is the section's own directory, empty at the start.
	Dir string
	// Registry holds the demo and workload mutators (NewRegistry).
	Registry *mutators.Registry
	report   *Report
}

// Progress prints one progress line, if the configuration asked for them.
func (e *Env) Progress(format string, args ...any) {
	if e.Config.Progress != nil {
		fmt.Fprintf(e.Config.Progress, "bench: "+format+"\n", args...)
	}
}

// AddCapability adds a row to the report's capability table.
func (e *Env) AddCapability(c Capability) { e.report.Capabilities = append(e.report.Capabilities, c) }

// Report is the outcome of a suite run: what ran where, the metric lines,
// the capability table and the chart's data.
type Report struct {
	Machine      Machine      `json:"machine"`
	Mode         string       `json:"mode"`
	Runs         int          `json:"runs"`
	Started      time.Time    `json:"started"`
	Elapsed      float64      `json:"elapsed_seconds"`
	Results      []Result     `json:"results"`
	Capabilities []Capability `json:"capabilities"`
	// Skipped lists sections that did not run, and why.
	Skipped []string `json:"skipped,omitempty"`
}

// Machine names the machine a report was made on.
type Machine struct {
	CPU    string `json:"cpu"`
	CPUs   int    `json:"cpus"`
	OS     string `json:"os"`
	Kernel string `json:"kernel,omitempty"`
	Go     string `json:"go"`
	SQLite string `json:"sqlite"`
}

// LocalSections are the sections that need no network: everything the
// issue asks for except the end-to-end numbers.
func LocalSections() []Section {
	return []Section{
		{"mutate", runMutate},
		{"rebase", runRebaseGrid},
		{"drop", runDrop},
		{"workload", runWorkloads},
		{"size", runSizes},
		{"memory", runMemory},
		{"capability", runCapabilities},
	}
}

// Run runs the local sections and then cfg.Sections, and returns the
// report. It stops at the first section that fails, since a failure means
// an engine misbehaved (the sections check that both engines end in the
// same state), and a report built on that would mislead.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Runs < 1 {
		return nil, errors.New("bench: Config.Runs must be at least 1")
	}
	reg, err := NewRegistry()
	if err != nil {
		return nil, err
	}
	root := cfg.Dir
	if root == "" {
		if root, err = os.MkdirTemp("", "sqlrebase-bench-"); err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		defer os.RemoveAll(root)
	}
	mode := "full"
	if cfg.Quick {
		mode = "quick"
	}
	rep := &Report{Machine: DescribeMachine(), Mode: mode, Runs: cfg.Runs, Started: time.Now()}
	for _, s := range append(LocalSections(), cfg.Sections...) {
		if len(cfg.Only) > 0 && !contains(cfg.Only, s.Name) {
			continue
		}
		dir, err := os.MkdirTemp(root, s.Name+"-")
		if err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		env := &Env{Config: cfg, Dir: dir, Registry: reg, report: rep}
		t0 := time.Now()
		env.Progress("section %s", s.Name)
		res, err := s.Run(ctx, env)
		if errors.Is(err, errSkipped) {
			rep.Skipped = append(rep.Skipped, s.Name+": "+err.Error())
			continue
		}
		if err != nil {
			return rep, fmt.Errorf("bench: section %s: %w", s.Name, err)
		}
		env.Progress("section %s done in %.1f s", s.Name, time.Since(t0).Seconds())
		rep.Results = append(rep.Results, res...)
		// Each section's files can be large (the size series); free the
		// disk before the next.
		os.RemoveAll(dir)
	}
	rep.Elapsed = time.Since(rep.Started).Seconds()
	return rep, nil
}

// errSkipped marks a section that cannot run in this configuration.
var errSkipped = errors.New("skipped")

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// sqliteVersion names the go-sqlite3 module of this build and the SQLite
// it runs, as "go-sqlite3 v0.37.0 (SQLite 3.54.1)".
func sqliteVersion() string {
	mod := "go-sqlite3"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/ncruces/go-sqlite3" {
				mod += " " + d.Version
			}
		}
	}
	db, err := driver.Open("file::memory:", nil)
	if err != nil {
		return mod
	}
	defer db.Close()
	var v string
	if err := db.QueryRow("SELECT sqlite_version()").Scan(&v); err != nil {
		return mod
	}
	return mod + " (SQLite " + v + ")"
}

// DescribeMachine reads the CPU model and kernel from /proc (Linux) and
// the Go and SQLite versions from the build.
func DescribeMachine() Machine {
	m := Machine{CPU: "unknown", CPUs: runtime.NumCPU(), OS: runtime.GOOS + "/" + runtime.GOARCH, Go: runtime.Version(),
		SQLite: sqliteVersion()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}
