package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestDemoConverges runs the seed scenario 200 times faster than real time
// and checks the outcome the seed promises: every party at (1, 'Food', 1),
// with the replicas' checksums equal to the authority's.
func TestDemoConverges(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	res, err := runDemo(ctx, demoConfig{
		Dir:     t.TempDir(),
		Speedup: 200,
		Clients: seedClients(),
		Logger:  slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	}, &out)
	if err != nil {
		t.Fatalf("runDemo: %v\n%s", err, out.String())
	}
	if !res.Converged() {
		t.Fatalf("not converged: %v differ\n%s", res.Differ, out.String())
	}
	if want := "(1, 'Food', 1)"; res.Authority.Rows != want {
		t.Errorf("authority rows = %s, want %s", res.Authority.Rows, want)
	}
	// 1 (schema) + 10 + 3 mutations; the server's group commit may put
	// pushes that arrive together into one version.
	if v := res.Authority.Version; v < 2 || v > 14 {
		t.Errorf("authority version = %d, want 2..14", v)
	}
	if len(res.Clients) != 3 {
		t.Fatalf("got %d clients, want 3", len(res.Clients))
	}
	for _, c := range res.Clients {
		if c.Rows != res.Authority.Rows || c.Checksum != res.Authority.Checksum || c.Version != res.Authority.Version || c.Pending != 0 {
			t.Errorf("%s differs from the authority %s", c, res.Authority)
		}
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	last := lines[len(lines)-1]
	if !strings.Contains(last, fmt.Sprintf("converged: all 4 parties at version %d with (1, 'Food', 1), checksum ", res.Authority.Version)) {
		t.Errorf("last line = %q", last)
	}
	if !strings.Contains(out.String(), "replayed") {
		t.Errorf("transcript shows no rebase:\n%s", out.String())
	}
}

// TestDemoNotConverged gives the scenario no time to settle: the result
// must say who differs rather than claim convergence.
func TestDemoNotConverged(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	res, err := runDemo(ctx, demoConfig{
		Dir:     t.TempDir(),
		Speedup: 1,
		Clients: []clientSpec{{Name: "slow", Latency: time.Hour, Interval: time.Millisecond, Sends: 1, Delta: 1}},
		Settle:  50 * time.Millisecond,
		Logger:  slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	}, &out)
	if err != nil {
		t.Fatalf("runDemo: %v\n%s", err, out.String())
	}
	if res.Converged() || len(res.Differ) != 1 || res.Differ[0] != "slow" {
		t.Fatalf("Differ = %v, want [slow]\n%s", res.Differ, out.String())
	}
	if !strings.Contains(out.String(), "NOT converged: slow") {
		t.Errorf("transcript does not say who differs:\n%s", out.String())
	}
}

func TestRunUsage(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"help"}, &stdout, &stderr); code != 0 {
		t.Errorf("help exit = %d", code)
	}
	for _, name := range []string{"demo", "inspect", "serve", "bench"} {
		if !strings.Contains(stdout.String(), name) {
			t.Errorf("help does not list %s:\n%s", name, stdout.String())
		}
	}
	if code := run(context.Background(), []string{"nope"}, &stdout, &stderr); code != 2 {
		t.Errorf("unknown command exit = %d, want 2", code)
	}
	if code := run(context.Background(), nil, &stdout, &stderr); code != 2 {
		t.Errorf("no command exit = %d, want 2", code)
	}
}

// testWriter sends log output to t.Log so it shows only on failure.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
