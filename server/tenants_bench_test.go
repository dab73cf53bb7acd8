package server

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// procUsage is what the process holds: resident memory, open file
// descriptors and goroutines.
type procUsage struct {
	rssKB, fds, goroutines int
	heapMiB                float64 // the Go heap in use: the rest of RSS is SQLite's (C) memory, the runtime and the binary
}

func usage(b *testing.B) procUsage {
	b.Helper()
	runtime.GC()
	var u procUsage
	u.goroutines = runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	u.heapMiB = float64(ms.HeapInuse) / (1 << 20)
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		u.fds = len(ents)
	}
	f, err := os.Open("/proc/self/status")
	if err != nil {
		b.Skipf("no /proc: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			u.rssKB, _ = strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
	return u
}

func (u procUsage) String() string {
	return fmt.Sprintf("RSS %.1f MiB (Go heap %.1f MiB), %d fds, %d goroutines", float64(u.rssKB)/1024, u.heapMiB, u.fds, u.goroutines)
}

// BenchmarkManyTenants measures a server hosting many databases (10,000;
// SQLREBASE_TENANTS to change) of which 100 have a connected session: the
// process's RSS, file descriptors and goroutines, the time AddDatabase
// takes, and the time from Hello to Welcome for a closed ("cold") database
// against an open ("warm") one. The client runs in the same process (one
// QUIC connection, a stream per session): the numbers include it, and the
// baseline before any database is reported too. Run it once:
//
//	go test -run XXX -bench ManyTenants -benchtime 1x ./server
func BenchmarkManyTenants(b *testing.B) {
	n := 10_000
	if v, err := strconv.Atoi(os.Getenv("SQLREBASE_TENANTS")); err == nil && v > 0 {
		n = v
	}
	const active, coldSamples = 100, 20
	srv, addr := testServer(b, b.TempDir(), func(c *Config) {
		c.IdleClose = 100 * time.Millisecond
		c.CredentialHashIterations = 1 // random tokens: see Config.CredentialHashIterations
	})
	conn := dial(b, addr, srv.Fingerprint())
	base := usage(b)
	b.Logf("baseline (server listening, client connected, no database): %v", base)
	ctx := context.Background()
	name := func(i int) string { return fmt.Sprintf("tenant%05d", i) }
	start := time.Now()
	for i := range n {
		if err := srv.AddDatabase(ctx, name(i), "token-"+name(i)); err != nil {
			b.Fatal(err)
		}
	}
	addTime := time.Since(start)
	idle := usage(b)
	b.Logf("%d databases added in %v (%v each): %v", n, addTime.Round(time.Millisecond), addTime/time.Duration(n), idle)

	hello := func(i int, id string) (*client, time.Duration) {
		t0 := time.Now()
		c, m := openClient(b, conn, protocol.Hello{Database: name(i), ClientID: id, Credential: "token-" + name(i)})
		d := time.Since(t0)
		welcome(b, m)
		return c, d
	}
	// Cold and warm, on databases that exist on disk and are closed: a
	// first session creates each and ends, the database closes when
	// idle; then a Hello opens it (cold), and a second Hello while the
	// first session holds it finds it open (warm).
	for i := range coldSamples {
		c, _ := hello(n-1-i, "first")
		c.until(1)
		c.stream.Close()
	}
	eventually(b, "idle close", func() bool { _, open := srv.DatabaseCounts(); return open == 0 })
	var cold, warm []time.Duration
	var held []*client
	for i := range coldSamples {
		c, d := hello(n-1-i, "cold")
		cold = append(cold, d)
		w, d := hello(n-1-i, "warm")
		warm = append(warm, d)
		held = append(held, c, w)
	}
	for _, c := range held {
		c.stream.Close()
	}
	eventually(b, "idle close", func() bool { _, open := srv.DatabaseCounts(); return open == 0 })

	srv.reg.idleClose = time.Hour // the active ones stay open while measured
	for i := range active {
		c, _ := hello(i, "active")
		c.until(1)
		c.push(1)
		c.acked(1)
	}
	busy := usage(b)
	_, open := srv.DatabaseCounts()
	b.Logf("%d databases, %d open with a session each: %v", n, open, busy)
	slices.Sort(cold)
	slices.Sort(warm)
	b.Logf("Hello to Welcome, median of %d: cold %v, warm %v", coldSamples, cold[coldSamples/2], warm[coldSamples/2])

	b.ReportMetric(float64(addTime.Microseconds())/float64(n), "µs/AddDatabase")
	b.ReportMetric(float64(idle.rssKB-base.rssKB)/1024, "MiB-idle-RSS")
	b.ReportMetric(float64(busy.rssKB)/1024, "MiB-RSS")
	b.ReportMetric(float64(busy.fds), "fds")
	b.ReportMetric(float64(busy.goroutines), "goroutines")
	b.ReportMetric(float64(cold[coldSamples/2].Microseconds())/1000, "ms-cold-hello")
	b.ReportMetric(float64(warm[coldSamples/2].Microseconds())/1000, "ms-warm-hello")
	for range b.N {
	}
}
