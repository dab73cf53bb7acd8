package bench

import (
	"context"
	"testing"
	"time"
)

func TestRunNetwork(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := RunNetwork(ctx, NetworkConfig{Dir: t.TempDir(), Replicas: 3, Samples: 5})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(res)
	if res.Confirm.N != 5 || res.Fanout.N != 15 || res.WireBytes == 0 || res.WireBytes > 512 {
		t.Fatalf("result %+v", res)
	}
}

// BenchmarkNetwork reports the end-to-end numbers with 1, 10 and 100
// replicas (b.N samples each).
func BenchmarkNetwork(b *testing.B) {
	for _, n := range []int{1, 10, 100} {
		b.Run("replicas="+itoa(int64(n)), func(b *testing.B) {
			res, err := RunNetwork(context.Background(), NetworkConfig{Dir: b.TempDir(), Replicas: n, Samples: max(b.N, 20)})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(res.Confirm.P50.Microseconds())/1000, "confirm-p50-ms")
			b.ReportMetric(float64(res.Confirm.P99.Microseconds())/1000, "confirm-p99-ms")
			b.ReportMetric(float64(res.Fanout.P50.Microseconds())/1000, "fanout-p50-ms")
			b.ReportMetric(float64(res.Fanout.P99.Microseconds())/1000, "fanout-p99-ms")
			b.ReportMetric(float64(res.WireBytes), "wire-B")
		})
	}
}

func TestRunDelivery(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := RunDelivery(ctx, NetworkConfig{Dir: t.TempDir(), Replicas: 3, Samples: 5})
	if err != nil {
		t.Fatal(err)
	}
	if p.Latency.N != 15 || p.Latency.P50 <= 0 || p.MakeVersion.N != 5 || p.PerCPUSecond <= 0 {
		t.Fatalf("result %+v", p)
	}
	if len(p.Frame) == 0 || len(p.Frame) > 64 {
		t.Fatalf("the frame of a one-row update: %d bytes", len(p.Frame))
	}
	bare, err := RunBareBroadcast(ctx, t.TempDir(), 3, 5, p.Frame)
	if err != nil {
		t.Fatal(err)
	}
	if bare.Latency.N != 15 || bare.PerCPUSecond <= 0 {
		t.Fatalf("bare broadcast %+v", bare)
	}
	// Side by side, in turns: 25 rounds are three turns each, the last
	// one short, and every round of both sides is counted.
	fan, err := RunFanout(ctx, t.TempDir(), 3, 25)
	if err != nil {
		t.Fatal(err)
	}
	if fan.Ours.Latency.N != 75 || fan.Ours.MakeVersion.N != 25 || fan.Bare.Latency.N != 75 || fan.BareDurable.Latency.N != 75 ||
		fan.Ours.PerCPUSecond <= 0 || fan.Bare.PerCPUSecond <= 0 || fan.BareDurable.PerCPUSecond <= 0 {
		t.Fatalf("side by side: %+v", fan)
	}
	floor, err := RunConfirmFloor(ctx, t.TempDir(), 5)
	if err != nil || floor.Fsync <= 0 || floor.RoundTrip <= 0 {
		t.Fatalf("confirm floor %+v, %v", floor, err)
	}
}

// TestRunThroughput runs the throughput section small: every mutation must
// be acknowledged, and group commit must make fewer versions than
// mutations when several clients push windows of them.
func TestRunThroughput(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := RunThroughput(ctx, ThroughputConfig{Dir: t.TempDir(), Clients: 3, Mutations: 500, Batch: 50, Window: 200})
	if err != nil {
		t.Fatal(err)
	}
	if res.PerSecond <= 0 || res.Versions == 0 || res.Versions >= 1500 {
		t.Fatalf("result %+v: want every mutation acknowledged in fewer versions than mutations", res)
	}
	rate, err := RunSQLiteRate(ctx, t.TempDir(), 1000)
	if err != nil || rate <= 0 {
		t.Fatalf("SQLite rate %v, %v", rate, err)
	}
}

// TestRunLive runs the live-query bench small: a change to one table re-runs
// only that table's queries, and every sample measured something.
func TestRunLive(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := RunLive(ctx, t.TempDir(), 10, 50, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range res {
		if s.Reran != 5 || s.Deliver <= 0 || s.Naive <= 0 {
			t.Fatalf("sample %+v: want the 5 queries of the changed table re-run", s)
		}
	}
}
