package bench

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// childEnv names the environment variable under which the test binary runs
// as a suite child (RunChild) instead of running tests.
const childEnv = "SQLREBASE_BENCH_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		if err := RunChild(context.Background(), []byte(spec), os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// testChild re-executes the test binary as a suite child.
func testChild(ctx context.Context, spec []byte) *exec.Cmd {
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	return cmd
}

// tinyConfig is the quick suite cut down to what a unit test can afford:
// every section and capability runs, on small numbers.
func tinyConfig(t *testing.T) Config {
	return Config{
		Quick: true, Runs: 2, Iters: 1,
		Pending: []int{0, 1, 10}, Batch: []int{1, 10},
		DurablePending: []int{10},
		DropPending:    []int{1, 100},
		MutateOps:      10,
		Clients:        2, Rounds: 2,
		TodoRows: 2000, TodoPending: []int{10},
		SizesMB:    []int{1},
		RSSPending: 10, RSSRounds: 2,
		CapabilityPending: 50,
		Dir:               t.TempDir(),
		Child:             testChild,
	}
}

// TestSuiteTiny runs the whole suite at a tiny size and checks every
// output: the text report's script lines, the JSON and CSV, the chart's
// SVG, and the capability table's verdicts, which the design predicts.
func TestSuiteTiny(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the suite (about 10 s)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := tinyConfig(t)
	var extraRan bool
	cfg.Sections = []Section{{"e2e", func(ctx context.Context, env *Env) ([]Result, error) {
		extraRan = true
		return []Result{pairResult("e2e", "e2e, test hook", nil, "ms", "ours", []float64{2, 3}, "savepoint", []float64{4, 4}, "")}, nil
	}}}
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !extraRan {
		t.Error("the extra section did not run")
	}
	if len(rep.Skipped) > 0 {
		t.Errorf("skipped: %v", rep.Skipped)
	}

	// Every section produced lines, and each has sane numbers.
	sections := map[string]int{}
	for _, r := range rep.Results {
		sections[r.Section]++
		if r.Section != "wal" && (r.A.Median <= 0 || r.B.Median <= 0 || r.Ratio.Median <= 0) {
			t.Errorf("%s: non-positive value: %+v", r.Label, r)
		}
		if r.A.Min > r.A.Median || r.A.Median > r.A.Max {
			t.Errorf("%s: median outside min-max: %+v", r.Label, r.A.Stats)
		}
		if strings.Contains(r.Label, ":") {
			t.Errorf("label %q has a colon", r.Label)
		}
	}
	for _, s := range []string{"mutate", "rebase", "drop", "workload", "size", "memory", "wal", "e2e"} {
		if sections[s] == 0 {
			t.Errorf("no results in section %s", s)
		}
	}
	// 3 depths × 2 batch sizes, plus the Full line.
	if got := countLines(rep, "rebase"); got != 7 {
		t.Errorf("%d rebase lines, want 7", got)
	}

	// The text report: the script line for each rebase setting.
	var text bytes.Buffer
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, line := range strings.Split(text.String(), "\n") {
		m := LineRegexp.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		found++
		if m[1] == "rebase, 10 pending, K=1" && m[3] != "ms" {
			t.Errorf("unit %q in %q", m[3], line)
		}
	}
	if !strings.Contains(text.String(), "rebase, 10 pending, K=1: ours ") {
		t.Errorf("no script line for rebase, 10 pending, K=1:\n%s", text.String())
	}
	if found < 10 {
		t.Errorf("only %d lines match LineRegexp:\n%s", found, text.String())
	}

	// JSON round trip.
	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("JSON: %v", err)
	}
	if len(back.Results) != len(rep.Results) || len(back.Capabilities) != 5 {
		t.Errorf("JSON: %d results and %d capabilities, want %d and 5", len(back.Results), len(back.Capabilities), len(rep.Results))
	}

	// CSV: a header and one row per result and capability, all as wide.
	var cs bytes.Buffer
	if err := rep.WriteCSV(&cs); err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(&cs).ReadAll()
	if err != nil {
		t.Fatalf("CSV: %v", err)
	}
	if len(rows) != 1+len(rep.Results)+len(rep.Capabilities) {
		t.Errorf("CSV: %d rows, want %d", len(rows), 1+len(rep.Results)+len(rep.Capabilities))
	}

	// The chart is well-formed SVG with a line per engine and K.
	var svg bytes.Buffer
	if err := rep.WriteRebaseChart(&svg, "svg"); err != nil {
		t.Fatal(err)
	}
	checkSVG(t, svg.Bytes())
	for _, want := range []string{"ours, K=1", "savepoint, K=10"} {
		if !bytes.Contains(svg.Bytes(), []byte(want)) {
			t.Errorf("chart has no legend entry %q", want)
		}
	}

	// The capability table: what the design claims for each engine.
	if len(rep.Capabilities) != 5 {
		t.Fatalf("%d capabilities, want 5", len(rep.Capabilities))
	}
	for _, c := range rep.Capabilities {
		if !c.Ours.Works {
			t.Errorf("ours fails %q: %s", c.Name, c.Ours.Detail)
		}
		// The torn read depends on timing; the other four are certain.
		if c.Savepoint.Works && !strings.Contains(c.Name, "torn") {
			t.Errorf("savepoint works for %q: %s", c.Name, c.Savepoint.Detail)
		}
	}
	if testing.Verbose() {
		t.Log("\n" + text.String())
	}
}

func countLines(rep *Report, section string) int {
	n := 0
	for _, r := range rep.Results {
		if r.Section == section {
			n++
		}
	}
	return n
}

// checkSVG fails unless b is well-formed XML with an svg root.
func checkSVG(t *testing.T, b []byte) {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(b))
	root := ""
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("chart is not well-formed XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
	if root != "svg" {
		t.Fatalf("chart root element is %q, want svg", root)
	}
}

func TestLineRegexp(t *testing.T) {
	r := pairResult("rebase", "rebase, 1000 pending, K=1", map[string]int{"pending": 1000, "k": 1}, "ms",
		"ours", []float64{51, 49.1, 53.2}, "savepoint", []float64{98, 95, 101}, "")
	line := r.Line()
	m := LineRegexp.FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("%q does not match", line)
	}
	if m[1] != "rebase, 1000 pending, K=1" || m[2] != "51.0" || m[3] != "ms" || m[4] != "98.0" || m[5] != "0.52" {
		t.Errorf("submatches %q of %q", m[1:], line)
	}
	// A line against plain SQLite is not a savepoint line.
	p := pairResult("mutate", "mutate, seed, vs plain autocommit", nil, "µs", "ours", []float64{140}, "plain", []float64{110}, "")
	if LineRegexp.MatchString(p.Line()) {
		t.Errorf("%q matches the savepoint regexp", p.Line())
	}
}

func TestStats(t *testing.T) {
	s := summarize([]float64{5, 1, 3, 2})
	if s.Median != 2.5 || s.Min != 1 || s.Max != 5 || s.Runs != 4 {
		t.Errorf("summarize: %+v", s)
	}
	r := pairResult("x", "x", nil, "ms", "ours", []float64{1, 4}, "savepoint", []float64{2, 2}, "")
	if r.Ratio.Min != 0.5 || r.Ratio.Max != 2 || r.Ratio.Median != 1.25 {
		t.Errorf("ratio per run: %+v", r.Ratio)
	}
	if got := num(0.0123); got != "0.012" {
		t.Errorf("num(0.0123) = %q", got)
	}
	if got := num(1234.5); got != "1234" && got != "1235" {
		t.Errorf("num(1234.5) = %q", got)
	}
}

func TestChartNeedsData(t *testing.T) {
	var rep Report
	if err := rep.WriteRebaseChart(io.Discard, "svg"); !errors.Is(err, errNoChartData) {
		t.Fatalf("empty report: got %v, want errNoChartData", err)
	}
}

func TestStatementsMatchMutators(t *testing.T) {
	// The savepoint server sends Statements; the mutators run them. A
	// mutator without an SQL form would make the two engines diverge.
	reg, err := NewRegistry()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range reg.Names() {
		var args json.RawMessage
		switch name {
		case CounterAdd:
			args = mustJSON(CounterArgs{ID: 1, Delta: 2})
		case TodoInsert, TodoUpdate, TodoDelete:
			args = mustJSON(TodoArgs{ID: 1, Title: "it's"})
		default:
			args = demoMutation("x", 1).Args
		}
		stmts, err := Statements(name, args)
		if err != nil || len(stmts) == 0 {
			t.Errorf("%s: %v %v", name, stmts, err)
		}
	}
	if _, err := Statements("nope", nil); err == nil {
		t.Error("Statements of an unknown mutator: no error")
	}
	if _, err := Statements(CounterAdd, json.RawMessage("{")); err == nil {
		t.Error("Statements of bad args: no error")
	}
}
