package bench

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// LineRegexp matches a report line that compares our engine with the
// savepoint engine, such as
//
//	rebase, 1000 pending, K=1: ours 51.0 ms [49.1-53.2], savepoint 98.0 ms [95.0-101], ratio 0.52 [0.50-0.55]
//
// Submatches: 1 the label, 2 ours' median, 3 the unit, 4 the savepoint
// engine's median, 5 the ratio's median. Brackets hold the min-max over
// the runs.
var LineRegexp = regexp.MustCompile(`^([^:]+): ours ([0-9.]+) (\S+)(?: \[[^\]]*\])?, savepoint ([0-9.]+) \S+(?: \[[^\]]*\])?, ratio ([0-9.]+)`)

// Line is the one-line form of r: "label: A x unit [min-max], B y unit
// [min-max], ratio z [min-max]". Lines of ours against the savepoint
// engine match LineRegexp.
func (r Result) Line() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s %s %s%s, %s %s %s%s", r.Label,
		r.A.Name, num(r.A.Median), r.Unit, spread(r.A.Stats),
		r.B.Name, num(r.B.Median), r.Unit, spread(r.B.Stats))
	if r.Ratio.Runs > 0 { // lines of one quantity's percentiles have none
		fmt.Fprintf(&b, ", ratio %s%s", num(r.Ratio.Median), spread(r.Ratio))
	}
	return b.String()
}

// num formats a value with about three significant digits and no exponent.
func num(v float64) string {
	switch a := abs(v); {
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 0.1 || a == 0:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

func abs(v float64) float64 {
	if v < 0 {
		return -v
	}
	return v
}

// spread is " [min-max]" for more than one run, else nothing.
func spread(s Stats) string {
	if s.Runs < 2 || s.Min == s.Max {
		return ""
	}
	return " [" + num(s.Min) + "-" + num(s.Max) + "]"
}

// sectionTitles name the report's sections in print order.
var sectionTitles = []struct{ key, title string }{
	{"mutate", "Local mutation latency"},
	{"rebase", "Rebase latency (drop + apply + replay), pending depth N, server batch K"},
	{"drop", "Drop alone"},
	{"workload", "Workloads"},
	{"size", "Database size"},
	{"memory", "Peak RSS per replica"},
	{"wal", "WAL size"},
	{"network", "End to end over QUIC on loopback (server and replicas in this process)"},
}

// WriteText writes the report as people read it: the machine, one line per
// metric (grouped by section, notes indented below), and the capability
// table.
func (rep *Report) WriteText(w io.Writer) error {
	ew := &errWriter{w: w}
	m := rep.Machine
	ew.printf("sqlrebase bench (%s mode, %d runs, %.0f s): %s, %d CPUs, %s %s, %s, %s\n",
		rep.Mode, rep.Runs, rep.Elapsed, m.CPU, m.CPUs, m.OS, m.Kernel, m.Go, m.SQLite)
	ew.printf("values: median over the runs [min-max]; ratio: ours / the other engine, per run\n")
	printed := map[string]bool{}
	printSection := func(key, title string) {
		first := true
		for _, r := range rep.Results {
			if r.Section != key {
				continue
			}
			if first {
				ew.printf("\n%s\n", title)
				first = false
			}
			ew.printf("  %s\n", r.Line())
			if r.Note != "" {
				ew.printf("      (%s)\n", r.Note)
			}
		}
		printed[key] = true
	}
	for _, s := range sectionTitles {
		printSection(s.key, s.title)
	}
	for _, r := range rep.Results {
		if !printed[r.Section] {
			printSection(r.Section, r.Section)
		}
	}
	if len(rep.Capabilities) > 0 {
		ew.printf("\nCapabilities (each row a test run against both engines)\n")
		for _, c := range rep.Capabilities {
			ew.printf("  %s\n      ours:      %s\n      savepoint: %s\n", c.Name, c.Ours, c.Savepoint)
		}
	}
	for _, s := range rep.Skipped {
		ew.printf("\nskipped: %s\n", s)
	}
	return ew.err
}

// WriteJSON writes the whole report as indented JSON.
func (rep *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(rep); err != nil {
		return fmt.Errorf("write JSON report: %w", err)
	}
	return nil
}

// CSVHeader is the header row of WriteCSV.
var CSVHeader = []string{"section", "label", "pending", "k", "size_mb", "clients", "unit",
	"a", "a_median", "a_min", "a_max", "b", "b_median", "b_min", "b_max",
	"ratio_median", "ratio_min", "ratio_max", "runs", "note"}

// WriteCSV writes one row per result, then one per capability (section
// "capability", a and b holding "works"/"fails", the details in note).
func (rep *Report) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	cw.Write(CSVHeader)
	f := func(v float64) string { return strconv.FormatFloat(v, 'g', 6, 64) }
	p := func(r Result, k string) string {
		if v, ok := r.Params[k]; ok {
			return strconv.Itoa(v)
		}
		return ""
	}
	for _, r := range rep.Results {
		cw.Write([]string{r.Section, r.Label, p(r, "pending"), p(r, "k"), p(r, "size_mb"), p(r, "clients"), r.Unit,
			r.A.Name, f(r.A.Median), f(r.A.Min), f(r.A.Max), r.B.Name, f(r.B.Median), f(r.B.Min), f(r.B.Max),
			f(r.Ratio.Median), f(r.Ratio.Min), f(r.Ratio.Max), strconv.Itoa(r.A.Runs), r.Note})
	}
	word := map[bool]string{true: "works", false: "fails"}
	for _, c := range rep.Capabilities {
		cw.Write([]string{"capability", c.Name, "", "", "", "", "",
			"ours", word[c.Ours.Works], "", "", "savepoint", word[c.Savepoint.Works], "", "",
			"", "", "", "1", "ours: " + c.Ours.Detail + "; savepoint: " + c.Savepoint.Detail})
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fmt.Errorf("write CSV report: %w", err)
	}
	return nil
}

// WriteMarkdown writes the metric lines and the capability table as
// Markdown tables, for bench/README.md.
func (rep *Report) WriteMarkdown(w io.Writer) error {
	ew := &errWriter{w: w}
	ew.printf("| metric | ours | baseline | ratio ours/baseline [min-max] |\n|---|---|---|---|\n")
	for _, s := range sectionTitles {
		for _, r := range rep.Results {
			if r.Section != s.key {
				continue
			}
			if r.Ratio.Runs == 0 { // one quantity's percentiles: no ratio
				ew.printf("| %s | %s: %s %s%s | %s: %s %s%s | – |\n", r.Label, r.A.Name, num(r.A.Median), r.Unit, spread(r.A.Stats),
					r.B.Name, num(r.B.Median), r.Unit, spread(r.B.Stats))
				continue
			}
			ew.printf("| %s | %s %s%s | %s: %s %s%s | **%s**%s |\n", r.Label, num(r.A.Median), r.Unit, spread(r.A.Stats),
				r.B.Name, num(r.B.Median), r.Unit, spread(r.B.Stats), num(r.Ratio.Median), spread(r.Ratio))
		}
	}
	if len(rep.Capabilities) > 0 {
		ew.printf("\n| capability | ours | savepoint |\n|---|---|---|\n")
		for _, c := range rep.Capabilities {
			ew.printf("| %s | %s | %s |\n", c.Name, c.Ours, c.Savepoint)
		}
	}
	return ew.err
}

// errWriter keeps the first write error, so the writers above can print
// freely and check once.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) printf(format string, args ...any) {
	if e.err == nil {
		_, e.err = fmt.Fprintf(e.w, format, args...)
	}
}
