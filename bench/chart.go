package bench

import (
	"errors"
	"fmt"
	"image/color"
	"io"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// errNoChartData is returned when a report has no rebase lines to chart.
// HasRebaseChart reports whether the report holds the rebase series that
// WriteRebaseChart draws.
func (rep *Report) HasRebaseChart() bool { return len(chartSeries(rep)) > 0 }

var errNoChartData = errors.New("bench: no rebase results with pending ≥ 1 to chart")

// series is one line of the chart: an engine at one K.
type series struct {
	engine string
	k      int
	pts    plotter.XYs
	errs   plotter.YErrors
}

// errPoints joins a series' points and their min–max spread for
// plotter.NewYErrorBars.
type errPoints struct {
	plotter.XYs
	plotter.YErrors
}

// chartSeries collects the rebase lines of the report, by engine and K.
// Depth 0 has no place on a log axis and is left out (the table has it).
func chartSeries(rep *Report) []*series {
	var out []*series
	find := func(engine string, k int) *series {
		for _, s := range out {
			if s.engine == engine && s.k == k {
				return s
			}
		}
		s := &series{engine: engine, k: k}
		out = append(out, s)
		return s
	}
	for _, r := range rep.Results {
		n, okN := r.Params["pending"]
		k, okK := r.Params["k"]
		if r.Section != "rebase" || !okN || !okK || n < 1 || r.Note != "" {
			continue
		}
		for _, side := range []Side{r.A, r.B} {
			s := find(side.Name, k)
			s.pts = append(s.pts, plotter.XY{X: float64(n), Y: side.Median})
			s.errs = append(s.errs, struct{ Low, High float64 }{side.Median - side.Min, side.Max - side.Median})
		}
	}
	slices.SortFunc(out, func(a, b *series) int {
		if a.k != b.k {
			return a.k - b.k
		}
		if a.engine < b.engine {
			return -1
		}
		return 1
	})
	return out
}

// WriteRebaseChart draws rebase latency against pending depth, for both
// engines and each server batch size K, on log-log axes, with the min–max
// spread over the runs as error bars, and writes it to w in format ("svg",
// "png" or "pdf").
func (rep *Report) WriteRebaseChart(w io.Writer, format string) error {
	all := chartSeries(rep)
	if len(all) == 0 {
		return errNoChartData
	}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Rebase latency against pending depth (%s, %s)", rep.Machine.CPU, rep.Mode)
	p.X.Label.Text = "pending mutations N (log)"
	p.Y.Label.Text = "rebase: drop + apply + replay, ms (log)"
	p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
	p.X.Tick.Marker, p.Y.Tick.Marker = plot.LogTicks{Prec: -1}, plot.LogTicks{Prec: -1}
	p.Legend.Top, p.Legend.Left = true, true
	p.Add(plotter.NewGrid())
	colors := map[string]color.Color{
		"ours":      color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
		"savepoint": color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	}
	dashes := [][]vg.Length{nil, {vg.Points(6), vg.Points(3)}, {vg.Points(2), vg.Points(2)}}
	shapes := []draw.GlyphDrawer{draw.CircleGlyph{}, draw.TriangleGlyph{}, draw.SquareGlyph{}}
	ks := []int{}
	for _, s := range all {
		if !slices.Contains(ks, s.k) {
			ks = append(ks, s.k)
		}
	}
	for _, s := range all {
		ki := slices.Index(ks, s.k) % len(dashes)
		line, points, err := plotter.NewLinePoints(s.pts)
		if err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		c := colors[s.engine]
		if c == nil {
			c = color.Black
		}
		line.Color, line.Dashes, line.Width = c, dashes[ki], vg.Points(1.5)
		points.Color, points.Shape = c, shapes[ki]
		bars, err := plotter.NewYErrorBars(errPoints{s.pts, s.errs})
		if err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		bars.Color = c
		p.Add(line, points, bars)
		p.Legend.Add(fmt.Sprintf("%s, K=%d", s.engine, s.k), line, points)
	}
	wt, err := p.WriterTo(8*vg.Inch, 5*vg.Inch, format)
	if err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	if _, err := wt.WriteTo(w); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	return nil
}
