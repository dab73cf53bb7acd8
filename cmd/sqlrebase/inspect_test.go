package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

func openTestReplica(t *testing.T, path string) *replica.Replica {
	t.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	r, err := replica.Open(context.Background(), path, replica.Options{Mutators: reg})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestInspectFresh(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	openTestReplica(t, path).Close()
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"inspect", path}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	for _, want := range []string{"version:   0\n", "pending:   0\n", "client id: "} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
	}
}

func TestInspectPending(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	r := openTestReplica(t, path)
	if _, err := r.Mutate(context.Background(), mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 2)); err != nil {
		t.Fatal(err)
	}
	id := r.ClientID()
	r.Close()
	var stdout bytes.Buffer
	if err := inspect(context.Background(), path, &stdout, slog.Default()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"client id: " + id, "pending:   1\n", `#1 createCategoryOrIncrementIfExists {"name":"Food","delta":2}`} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
	}
}

func TestInspectLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	r := openTestReplica(t, path)
	defer r.Close()
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"inspect", path}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1: %s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "is open in another process") {
		t.Errorf("stderr = %q", stderr.String())
	}
}

func TestInspectMissing(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"inspect", filepath.Join(t.TempDir(), "nope")}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if !strings.Contains(stderr.String(), "no replica database") {
		t.Errorf("stderr = %q", stderr.String())
	}
}

// TestInspectServerSettings: a replica that synced with a server shows
// where (address, database, pinned certificate), never the credential.
func TestInspectServerSettings(t *testing.T) {
	dir := t.TempDir()
	res, err := runDemo(context.Background(), demoConfig{Dir: dir, Speedup: 1000, Clients: []clientSpec{{Name: "c", Interval: time.Millisecond, Sends: 1, Delta: 1}}, Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))}, &bytes.Buffer{})
	if err != nil || !res.Converged() {
		t.Fatalf("demo: %v %+v", err, res)
	}
	var stdout bytes.Buffer
	if err := inspect(context.Background(), filepath.Join(dir, "c.db"), &stdout, slog.Default()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"server:    127.0.0.1:", ", database demo\n", "trust:     certificate sha256:", "version:   2\n"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
	}
	settings, _ := os.ReadFile(filepath.Join(dir, "c.db-remote"))
	if strings.Contains(string(settings), "credential") || len(settings) == 0 {
		t.Errorf("remote settings file:\n%s", settings)
	}
}
