package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/sqlrebase/sqlrebase/bench"
)

// e2eSections are the end-to-end benchmark sections: a server and replicas
// talking QUIC on loopback: the server's throughput against SQLite's own rate,
// then latency and fan-out with 1 and 10 replicas (quick) or 1, 10 and 100.
func e2eSections(quick bool) []bench.Section {
	if quick {
		return []bench.Section{bench.ThroughputSection(10, 2000), bench.NetworkSection([]int{1, 10}, 30), bench.FanoutSection([]int{100}, 2000)}
	}
	return []bench.Section{bench.ThroughputSection(10, 10000), bench.NetworkSection([]int{1, 10, 100}, 100), bench.FanoutSection([]int{100, 300, 1000}, 20000)}
}

// withE2E is the --only list once --e2e is given: as it is if it names an
// end-to-end section (--only fanout runs the fan-out alone), else with every
// end-to-end section added (--only rebase --e2e runs the rebase series and
// the end-to-end sections). An empty list runs everything either way.
func withE2E(only []string, e2e []bench.Section) []string {
	if len(only) == 0 {
		return nil
	}
	for _, s := range e2e {
		if slices.Contains(only, s.Name) {
			return only
		}
	}
	for _, s := range e2e {
		only = append(only, s.Name)
	}
	return only
}

// cmdBench is the bench subcommand: the suite of package bench, our engine
// against the savepoint baseline, printed as a table with one line per
// metric, optionally written as JSON, CSV and Markdown, and charted.
func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	quick := fs.Bool("quick", false, "the quick suite (under a minute); default: the full suite (minutes)")
	runs := fs.Int("runs", 0, "repeat each measurement `N` times (default: 3 quick, 5 full)")
	jsonPath := fs.String("json", "", "write the results as JSON to `FILE`")
	csvPath := fs.String("csv", "", "write the results as CSV to `FILE`")
	mdPath := fs.String("markdown", "", "write the results as Markdown tables to `FILE`")
	svgPath := fs.String("svg", "", "write the chart of rebase latency against pending depth to `FILE` (.svg, .png or .pdf; default: no chart)")
	dir := fs.String("dir", "", "keep the databases under `DIR` (default: a temporary directory, removed at the end)")
	huge := fs.Bool("huge", false, "add a 1 GB database to the size series (full suite only; several more minutes and GBs of disk)")
	only := fs.String("only", "", "run only these comma-separated `sections` (mutate,rebase,drop,workload,size,memory,capability,live; with --e2e also throughput,network,fanout)")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	e2e := fs.Bool("e2e", false, "also run the end-to-end sections over QUIC on loopback (Mutate to confirmed, fan-out, bytes on the wire)")
	child := fs.String("child", "", "internal: run one child of the suite (peak RSS, kill -9) from its JSON `spec`")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sqlrebase bench [--quick] [--runs N] [--json FILE] [--csv FILE] [--svg FILE] [flags]")
		fmt.Fprintln(stderr, "\nBenchmarks sqlrebase against the savepoint baseline (the prisma-sync prototype's design)")
		fmt.Fprintln(stderr, "on this machine, and runs the capability tests on both. Each line names both engines and")
		fmt.Fprintln(stderr, "the ratio ours/savepoint, e.g. \"rebase, 1000 pending, K=1: ours X ms, savepoint Y ms, ratio Z\".")
		fmt.Fprintln(stderr)
		fs.VisitAll(func(f *flag.Flag) {
			if f.Name == "child" {
				return
			}
			name, usage := flag.UnquoteUsage(f)
			fmt.Fprintf(stderr, "  --%s %s\n    \t%s\n", f.Name, name, usage)
		})
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if *child != "" {
		if err := bench.RunChild(ctx, []byte(*child), stdout); err != nil {
			fmt.Fprintf(stderr, "sqlrebase bench: %v\n", err)
			return 1
		}
		return 0
	}

	cfg := bench.FullConfig()
	if *quick {
		cfg = bench.QuickConfig()
	}
	if *runs < 0 {
		fmt.Fprintln(stderr, "sqlrebase bench: --runs must be at least 1")
		return 2
	}
	if *runs > 0 {
		cfg.Runs = *runs
	}
	if *huge {
		if *quick {
			fmt.Fprintln(stderr, "sqlrebase bench: --huge belongs to the full suite, not --quick")
			return 2
		}
		cfg.SizesMB = append(cfg.SizesMB, 1024)
	}
	if *only != "" {
		cfg.Only = strings.Split(*only, ",")
	}
	liveSamples := 5
	if *quick {
		liveSamples = 3
	}
	cfg.Sections = append(cfg.Sections, bench.LiveSection(liveSamples))
	if *e2e {
		extra := e2eSections(*quick)
		cfg.Sections = append(cfg.Sections, extra...)
		cfg.Only = withE2E(cfg.Only, extra)
	}
	cfg.Dir = *dir
	if !*quiet {
		cfg.Progress = stderr
	}
	self, err := os.Executable()
	if err != nil {
		log.Warn("cannot find this binary; the peak-RSS and kill -9 tests need it and will be skipped", "err", err)
	} else {
		cfg.Child = func(ctx context.Context, spec []byte) *exec.Cmd {
			return exec.CommandContext(ctx, self, "bench", "--child", string(spec))
		}
	}

	rep, err := bench.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase bench: %v\n", err)
		return 1
	}
	if err := rep.WriteText(stdout); err != nil {
		fmt.Fprintf(stderr, "sqlrebase bench: %v\n", err)
		return 1
	}
	chart := *svgPath
	if !rep.HasRebaseChart() {
		chart = "" // --only left out the rebase series: nothing to draw
	}
	outputs := []struct {
		path  string
		write func(io.Writer) error
	}{
		{*jsonPath, rep.WriteJSON},
		{*csvPath, rep.WriteCSV},
		{*mdPath, rep.WriteMarkdown},
		{chart, func(w io.Writer) error {
			return rep.WriteRebaseChart(w, strings.TrimPrefix(filepath.Ext(*svgPath), "."))
		}},
	}
	code := 0
	for _, o := range outputs {
		if o.path == "" {
			continue
		}
		if err := writeFile(o.path, o.write); err != nil {
			fmt.Fprintf(stderr, "sqlrebase bench: %v\n", err)
			code = 1
			continue
		}
		fmt.Fprintf(stdout, "wrote %s\n", o.path)
	}
	return code
}

// writeFile creates path and writes it with write, reporting either's
// failure with the path.
func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
