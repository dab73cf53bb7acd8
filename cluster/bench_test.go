package cluster

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

// BenchmarkSingleNodeLog is the single-node decision of issue 12: embed a
// one-node JetStream (R1, sync always) as the log only if it costs at most
// 10% of throughput and push-to-ack. Each iteration runs one batch through
// a real Authority (commit with its fsync, capture, encode) twice: once
// followed by a change-log-style append (a framed, CRC'd WriteAt to a
// segment file, not fsynced, as server's change log does), once followed
// by a fenced JetStream append that waits for its ack. The two alternate,
// so both see the same machine; the metrics are each one's p50 and p99 of
// the whole step (push to the moment an ack may go out), the ratio of
// their means (the throughput cost), and of the appends alone.
func BenchmarkSingleNodeLog(b *testing.B) {
	for _, sync := range []string{"always", "2m"} {
		for _, batch := range []int{1, 100} {
			b.Run(fmt.Sprintf("sync=%s/batch=%d", sync, batch), func(b *testing.B) { benchSingleNodeLog(b, batch, sync == "always") })
		}
	}
}

// benchSingleNodeLog runs one case; syncAlways false is NATS's default
// fsync every 2 minutes, measured only to show what the fsync costs (the
// cluster never runs so: see NodeConfig.SyncInterval).
func benchSingleNodeLog(b *testing.B, batch int, syncAlways bool) {
	ctx := context.Background()
	reg := mutators.NewRegistry()
	if err := reg.Register("inc", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		_, err := tx.Exec("INSERT INTO c (k, n) VALUES (?, 1) ON CONFLICT (k) DO UPDATE SET n = n + 1", string(args))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	a, err := server.OpenAuthority(ctx, filepath.Join(b.TempDir(), "db.sqlite"), reg, func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec("CREATE TABLE c (k TEXT PRIMARY KEY, n INTEGER)")
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	enc := protocol.NewEncoder()
	defer enc.Close()
	seg, err := os.Create(filepath.Join(b.TempDir(), "00000000000000000001.seg"))
	if err != nil {
		b.Fatal(err)
	}
	defer seg.Close()
	var segOff int64
	localAppend := func(rec []byte) error {
		buf := make([]byte, 8, 8+len(rec))
		binary.LittleEndian.PutUint32(buf, uint32(len(rec)))
		binary.LittleEndian.PutUint32(buf[4:], crc32.Checksum(rec, crc32.MakeTable(crc32.Castagnoli)))
		buf = append(buf, rec...)
		_, err := seg.WriteAt(buf, segOff)
		segOff += int64(len(buf))
		return err
	}
	cfg := NodeConfig{Name: "bench", Dir: b.TempDir(), Logger: quiet}
	if !syncAlways {
		cfg.SyncInterval = 2 * time.Minute
	}
	node, err := StartNode(bounded(b, 20*time.Second), cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer node.Shutdown()
	nc, js := connect(b, node)
	l, err := OpenLog(bounded(b, 20*time.Second), nc, js, LogConfig{})
	if err != nil {
		b.Fatal(err)
	}
	ap, err := l.NewAppender(ctx, "bench", "owner")
	if err != nil {
		b.Fatal(err)
	}
	id := uint64(0)
	step := func(appendJS bool) (total, appendOnly time.Duration) {
		ms := make([]server.Mutation, batch)
		for i := range ms {
			id++
			ms[i] = server.Mutation{ClientID: "c", ID: id, Name: "inc", Args: json.RawMessage(fmt.Sprintf(`"k%d"`, id%50))}
		}
		start := time.Now()
		ps, _, err := a.Push(ctx, ms)
		if err != nil {
			b.Fatal(err)
		}
		ev, err := enc.Version(ps, 0, nil)
		if err != nil {
			b.Fatal(err)
		}
		rec := ev.AppendBinary(nil)
		astart := time.Now()
		if appendJS {
			_, err = ap.Append(ctx, ps.Version, rec)
		} else {
			err = localAppend(rec)
		}
		if err != nil {
			b.Fatal(err)
		}
		end := time.Now()
		return end.Sub(start), end.Sub(astart)
	}
	// The JetStream log's versions must follow on: prime it at the
	// authority's version, which the local steps also move.
	jsBase := a.Version()
	if _, err := ap.Append(ctx, jsBase, []byte("base")); err != nil {
		b.Fatal(err)
	}
	var local, jet, localApp, jetApp []time.Duration
	b.ResetTimer()
	for range b.N {
		t, ta := step(false)
		local, localApp = append(local, t), append(localApp, ta)
		// The stream skips the local step's version: reset its tail to
		// the version before the JetStream step's.
		ap.lastVersion = a.Version()
		t, ta = step(true)
		jet, jetApp = append(jet, t), append(jetApp, ta)
	}
	b.StopTimer()
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	b.ReportMetric(us(pct(local, 50)), "local-p50-µs")
	b.ReportMetric(us(pct(local, 99)), "local-p99-µs")
	b.ReportMetric(us(pct(jet, 50)), "js-p50-µs")
	b.ReportMetric(us(pct(jet, 99)), "js-p99-µs")
	b.ReportMetric(float64(mean(jet))/float64(mean(local)), "js/local-step")
	b.ReportMetric(us(mean(localApp)), "local-append-µs")
	b.ReportMetric(us(mean(jetApp)), "js-append-µs")
	b.ReportMetric(float64(batch)/mean(local).Seconds(), "local-mut/s")
	b.ReportMetric(float64(batch)/mean(jet).Seconds(), "js-mut/s")
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func mean(ds []time.Duration) time.Duration {
	var t time.Duration
	for _, d := range ds {
		t += d
	}
	return t / time.Duration(len(ds))
}
