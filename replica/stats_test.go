package replica

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// TestStats: a replica's Stats count what crossed the wire and what it
// applied, exactly: the bytes it received are the bytes the server says it
// sent, the versions applied bring it to the server's version, and a
// server restart is one reconnect. The collector exports the same numbers.
func TestStats(t *testing.T) {
	reg := testRegistry(t)
	sreg := prometheus.NewRegistry()
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) { c.Metrics = sreg })
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, ts.remote())
	for i := range 3 {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", i+1))
	}
	converged(t, ts, r)
	sent := func() float64 {
		fams, err := sreg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			if f.GetName() == "sqlrebase_server_sent_bytes_total" {
				return f.GetMetric()[0].GetCounter().GetValue()
			}
		}
		return 0
	}
	deadline := time.Now().Add(10 * time.Second)
	for float64(r.Stats().BytesReceived) != sent() {
		if time.Now().After(deadline) {
			t.Fatalf("replica received %d bytes, server sent %v", r.Stats().BytesReceived, sent())
		}
		time.Sleep(5 * time.Millisecond)
	}
	st := r.Stats()
	if st.SnapshotsInstalled != 0 || st.VersionsApplied != r.Status().Version {
		t.Fatalf("applied %d versions and %d snapshots, at version %d", st.VersionsApplied, st.SnapshotsInstalled, r.Status().Version)
	}
	if st.Sessions != 1 || st.Reconnects != 0 || st.BytesSent == 0 || st.Rebases == 0 || st.RebaseTotal <= 0 || st.RebaseMax <= 0 || st.RebaseMax > st.RebaseTotal {
		t.Fatalf("stats %+v", st)
	}

	ts.restart()
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Rent", 1))
	converged(t, ts, r)
	st = r.Stats()
	if st.Sessions != 2 || st.Reconnects != 1 {
		t.Fatalf("after a server restart: %d sessions, %d reconnects", st.Sessions, st.Reconnects)
	}

	// The collector says what Stats says.
	c := NewCollector(r, prometheus.Labels{"replica": "r"})
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	rreg := prometheus.NewRegistry()
	rreg.MustRegister(c)
	st = r.Stats()
	fams, err := rreg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.Metric{}
	for _, f := range fams {
		got[f.GetName()] = f.GetMetric()[0]
	}
	for name, want := range map[string]uint64{
		"sqlrebase_replica_sessions_total": st.Sessions, "sqlrebase_replica_reconnects_total": st.Reconnects,
		"sqlrebase_replica_received_bytes_total": st.BytesReceived, "sqlrebase_replica_sent_bytes_total": st.BytesSent,
		"sqlrebase_replica_versions_applied_total": st.VersionsApplied, "sqlrebase_replica_replayed_total": st.Replayed,
	} {
		if m := got[name]; m == nil || m.GetCounter().GetValue() != float64(want) {
			t.Errorf("%s = %v, want %d", name, m, want)
		}
	}
	if h := got["sqlrebase_replica_rebase_seconds"].GetHistogram(); h.GetSampleCount() != st.Rebases || h.GetSampleSum() != st.RebaseTotal.Seconds() {
		t.Errorf("rebase histogram %v, want %d rebases", h, st.Rebases)
	}
	if g := got["sqlrebase_replica_connected"].GetGauge().GetValue(); g != 1 {
		t.Errorf("connected %v", g)
	}
	if lp := got["sqlrebase_replica_pending"].GetLabel(); len(lp) != 1 || lp[0].GetValue() != "r" {
		t.Errorf("labels %v", lp)
	}
}
