package bench

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"time"
)

// Stats summarise one quantity over the repeated runs of a suite: the
// median of the per-run values and their spread (min and max).
type Stats struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	Runs   int     `json:"runs"`
}

// summarize returns the Stats of xs (the zero Stats for none).
func summarize(xs []float64) Stats {
	if len(xs) == 0 {
		return Stats{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return Stats{Median: median(s), Min: s[0], Max: s[len(s)-1], Runs: len(s)}
}

// median of sorted xs.
func median(sorted []float64) float64 {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// Side is one engine's (or reference's) numbers in a Result.
type Side struct {
	Name string `json:"name"`
	Stats
}

// Result is one line of the report: one metric at one setting, measured on
// two engines in the same run (A is always ours), with the ratio A/B.
type Result struct {
	// Section groups lines in the report: mutate, rebase, drop, workload,
	// size, memory, wal, or an extra section's name.
	Section string `json:"section"`
	// Label names the metric and setting, e.g. "rebase, 1000 pending, K=1".
	// It never contains a colon, so a report line splits at the first one.
	Label string `json:"label"`
	// Params are the numeric settings of the line (pending, k, size_mb,
	// clients), for scripts.
	Params map[string]int `json:"params,omitempty"`
	// Unit is the unit of A's and B's values: µs, ms, MB or KB.
	Unit string `json:"unit"`
	A    Side   `json:"a"`
	B    Side   `json:"b"`
	// Ratio summarises A/B per run (runs are interleaved, so each pair
	// shares the machine's state); its median is the headline ratio.
	Ratio Stats `json:"ratio"`
	// Note says what the reader must know to read the line, such as a
	// durability difference.
	Note string `json:"note,omitempty"`
}

// pairResult builds a Result from the per-run values of both sides.
func pairResult(section, label string, params map[string]int, unit string, aName string, a []float64, bName string, b []float64, note string) Result {
	ratios := make([]float64, 0, len(a))
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			ratios = append(ratios, a[i]/b[i])
		}
	}
	return Result{Section: section, Label: label, Params: params, Unit: unit,
		A: Side{aName, summarize(a)}, B: Side{bName, summarize(b)}, Ratio: summarize(ratios), Note: note}
}

// unitScale converts a duration to a unit of the report.
func unitScale(d time.Duration, unit string) float64 {
	switch unit {
	case "µs":
		return float64(d) / float64(time.Microsecond)
	case "ms":
		return float64(d) / float64(time.Millisecond)
	}
	return d.Seconds()
}

// sampler takes one timed sample. Set-up it needs is done inside, before
// it starts its clock: it returns only the timed part.
type sampler func(ctx context.Context) (time.Duration, error)

// measurePair runs runs rounds; in each it takes iters samples of a and of
// b (which goes first alternates between rounds, so neither engine always
// runs on a machine warmed, or disturbed, by the other) and keeps the median
// sample of each side as that run's value. The garbage collector runs before
// each sample, so no sample pays for the garbage of set-up work.
func measurePair(ctx context.Context, runs, iters int, unit string, a, b sampler) (av, bv []float64, err error) {
	for run := range runs {
		order := []sampler{a, b}
		if run%2 == 1 {
			order = []sampler{b, a}
		}
		var got [2][]float64
		for i, s := range order {
			for range iters {
				if err := ctx.Err(); err != nil {
					return nil, nil, err
				}
				runtime.GC()
				d, err := s(ctx)
				if err != nil {
					return nil, nil, err
				}
				got[i] = append(got[i], unitScale(d, unit))
			}
		}
		if run%2 == 1 {
			got[0], got[1] = got[1], got[0]
		}
		for i := range got {
			slices.Sort(got[i])
		}
		av = append(av, median(got[0]))
		bv = append(bv, median(got[1]))
	}
	return av, bv, nil
}

// timed returns how long fn took.
func timed(fn func() error) (time.Duration, error) {
	t0 := time.Now()
	err := fn()
	return time.Since(t0), err
}

// label joins the parts of a result's label.
func label(parts ...string) string {
	s := parts[0]
	for _, p := range parts[1:] {
		if p != "" {
			s += ", " + p
		}
	}
	return s
}

func pendingLabel(n int) string { return fmt.Sprintf("%d pending", n) }
