package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// runBench runs the bench command with args and returns its exit status
// and output.
func runBench(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	code := cmdBench(context.Background(), args, &stdout, &stderr, log)
	return code, stdout.String(), stderr.String()
}

func TestBenchUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-h"}, 0, "--quick"},
		{[]string{"--nope"}, 2, "flag provided but not defined"},
		{[]string{"extra"}, 2, "usage: sqlrebase bench"},
		{[]string{"--runs", "-1"}, 2, "--runs must be at least 1"},
		{[]string{"--quick", "--huge"}, 2, "--huge belongs to the full suite"},
		{[]string{"--child", "{"}, 1, "bench child: spec"},
	} {
		code, _, stderr := runBench(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("bench %v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, c.code, c.want)
		}
	}
	// The hidden child flag stays out of the help.
	if _, _, stderr := runBench(t, "-h"); strings.Contains(stderr, "--child") {
		t.Errorf("help shows the internal --child flag:\n%s", stderr)
	}
}

// TestBenchChildIdle runs the smallest child in process: it reports its
// peak RSS as JSON, which is what the memory section reads.
func TestBenchChildIdle(t *testing.T) {
	code, stdout, stderr := runBench(t, "--child", `{"kind":"idle"}`)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var out struct {
		OK      bool  `json:"ok"`
		PeakRSS int64 `json:"peak_rss"`
	}
	if err := json.Unmarshal([]byte(stdout), &out); err != nil || !out.OK || out.PeakRSS <= 0 {
		t.Fatalf("child output %q: %v", stdout, err)
	}
}

func TestBenchListed(t *testing.T) {
	var buf bytes.Buffer
	usage(&buf)
	if !strings.Contains(buf.String(), "bench") || strings.Contains(buf.String(), "bench    run the benchmarks against the savepoint baseline (not yet") {
		t.Errorf("help does not list a working bench command:\n%s", buf.String())
	}
}

// TestBenchE2E runs the end-to-end section alone, at its quick size: the
// network lines are there, with no ratio where there is no other engine,
// and the one-row update is far smaller than its pages sent whole.
func TestBenchE2E(t *testing.T) {
	if testing.Short() {
		t.Skip("network benchmark")
	}
	code, stdout, stderr := runBench(t, "--quick", "--e2e", "--only", "network", "--quiet", "--runs", "1", "--svg", filepath.Join(t.TempDir(), "x.svg"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"Mutate to confirmed, 10 replicas connected: p50 ", "fan-out of a version to 10 replicas: p50 ", "one-row update on the wire, 1 replicas: ours "} {
		if !strings.Contains(stdout, want) {
			t.Errorf("no line %q in:\n%s", want, stdout)
		}
	}
	if strings.Contains(stdout, "connected: p50") && strings.Contains(strings.SplitN(strings.SplitN(stdout, "connected: p50", 2)[1], "\n", 2)[0], "ratio") {
		t.Errorf("a percentile line has a ratio:\n%s", stdout)
	}
}

// TestWithE2E: --only naming an end-to-end section runs just what it names;
// naming none adds every end-to-end section; no --only runs all.
func TestWithE2E(t *testing.T) {
	e2e := e2eSections(true)
	for _, c := range []struct {
		only, want []string
	}{
		{nil, nil},
		{[]string{"fanout"}, []string{"fanout"}},
		{[]string{"rebase", "network"}, []string{"rebase", "network"}},
		{[]string{"rebase"}, []string{"rebase", "throughput", "network", "fanout"}},
	} {
		if got := withE2E(slices.Clone(c.only), e2e); !slices.Equal(got, c.want) {
			t.Errorf("withE2E(%q) = %q, want %q", c.only, got, c.want)
		}
	}
}
