package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServeMetrics: serve --metrics answers /metrics with the server's
// series (and the Go runtime's), /healthz and /readyz.
func TestServeMetrics(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	exited := make(chan int, 1)
	go func() {
		code := cmdServe(ctx, []string{"--data", filepath.Join(t.TempDir(), "d"), "--listen", "127.0.0.1:0", "--db", "demo:tok", "--metrics", "127.0.0.1:0"}, pw, io.Discard, nil)
		pw.Close()
		exited <- code
	}()
	defer func() {
		cancel()
		select {
		case code := <-exited:
			if code != 0 {
				t.Errorf("serve exited %d", code)
			}
		case <-time.After(20 * time.Second):
			t.Error("serve did not stop")
		}
	}()
	var url string
	lines := bufio.NewScanner(pr)
	for url == "" && lines.Scan() {
		if u, ok := strings.CutPrefix(lines.Text(), "metrics: "); ok {
			url = strings.TrimSuffix(u, "/metrics")
		}
	}
	if url == "" {
		t.Fatal("serve printed no metrics address")
	}
	go io.Copy(io.Discard, pr)
	get := func(path string) (int, string) {
		t.Helper()
		c := &http.Client{Timeout: 10 * time.Second}
		resp, err := c.Get(url + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, `sqlrebase_server_databases{state="idle"} 1`) /* added; opens on its first Hello */ || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("/metrics: %d\n%s", code, body)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body := get(p); code != 200 {
			t.Fatalf("%s: %d %s", p, code, body)
		}
	}
}
