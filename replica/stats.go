package replica

import (
	"io"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Stats are a replica's counters since Open, for logs, dashboards and
// tests (NewCollector exports them to Prometheus).
type Stats struct {
	// Rebases counts the rebases done (server versions, snapshots,
	// repairs); RebaseTotal and RebaseMax sum up how long each held the
	// writer lock and kept readers out.
	Rebases     uint64
	RebaseTotal time.Duration
	RebaseMax   time.Duration
	// Replayed counts pending mutations replayed on top of a rebase (or
	// at Open), each time it was replayed.
	Replayed uint64
	// Sessions counts the sessions the server welcomed; Reconnects those
	// after the first (each one after a disconnection).
	Sessions, Reconnects uint64
	// BytesReceived and BytesSent count the sync stream's bytes.
	BytesReceived, BytesSent uint64
	// VersionsApplied counts server versions rebased on;
	// SnapshotsInstalled the complete images installed instead.
	VersionsApplied, SnapshotsInstalled uint64
}

// rebaseBuckets are the upper bounds (seconds) of the rebase histogram
// that NewCollector exports: 100 µs to about 26 s, by fours.
var rebaseBuckets = prometheus.ExponentialBuckets(0.0001, 4, 10)

// stats is what Stats reads: atomics, so that counting never takes a lock
// and Stats never waits for a rebase.
type stats struct {
	rebases, rebaseNanos, rebaseMax atomic.Int64
	rebaseIn                        [10]atomic.Uint64 // per bucket of rebaseBuckets (not cumulative); beyond the last: only the count
	sessions                        atomic.Uint64
	received, sent                  atomic.Uint64
	versions, snapshots             atomic.Uint64
}

// rebaseDone counts one rebase that held the writer for d.
func (s *stats) rebaseDone(d time.Duration) {
	s.rebases.Add(1)
	s.rebaseNanos.Add(int64(d))
	for {
		m := s.rebaseMax.Load()
		if int64(d) <= m || s.rebaseMax.CompareAndSwap(m, int64(d)) {
			break
		}
	}
	for i, ub := range rebaseBuckets {
		if d.Seconds() <= ub {
			s.rebaseIn[i].Add(1)
			break
		}
	}
}

// Stats returns the replica's counters. It takes no lock.
func (r *Replica) Stats() Stats {
	s := &r.stats
	st := Stats{
		Rebases: uint64(s.rebases.Load()), RebaseTotal: time.Duration(s.rebaseNanos.Load()), RebaseMax: time.Duration(s.rebaseMax.Load()),
		Replayed: r.replayed.Load(), Sessions: s.sessions.Load(),
		BytesReceived: s.received.Load(), BytesSent: s.sent.Load(),
		VersionsApplied: s.versions.Load(), SnapshotsInstalled: s.snapshots.Load(),
	}
	if st.Sessions > 0 {
		st.Reconnects = st.Sessions - 1
	}
	return st
}

// countingReader counts the bytes read through it into n.
type countingReader struct {
	r io.Reader
	n *atomic.Uint64
}

func (c countingReader) Read(p []byte) (int, error) {
	k, err := c.r.Read(p)
	c.n.Add(uint64(k))
	return k, err
}

// collector exports one replica's Stats and Status.
type collector struct {
	r                                                                           *Replica
	rebase, replayed, sessions, reconnects, received, sent, versions, snapshots *prometheus.Desc
	pending, connected                                                          *prometheus.Desc
}

// NewCollector returns a prometheus.Collector of r's Stats, its pending
// mutations and whether it is connected, as sqlrebase_replica_* series.
// labels, if any, are constant labels that tell replicas of one process
// apart (register one collector per replica).
func NewCollector(r *Replica, labels prometheus.Labels) prometheus.Collector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("sqlrebase_replica_"+name, help, nil, labels)
	}
	return &collector{r: r,
		rebase:     d("rebase_seconds", "How long each rebase held the writer lock and kept readers out."),
		replayed:   d("replayed_total", "Pending mutations replayed on top of rebases."),
		sessions:   d("sessions_total", "Sessions the server welcomed."),
		reconnects: d("reconnects_total", "Sessions welcomed after the first: reconnections."),
		received:   d("received_bytes_total", "Bytes received on the sync stream."),
		sent:       d("sent_bytes_total", "Bytes sent on the sync stream."),
		versions:   d("versions_applied_total", "Server versions rebased on."),
		snapshots:  d("snapshots_installed_total", "Complete snapshots installed."),
		pending:    d("pending", "Mutations not yet settled by the server."),
		connected:  d("connected", "1 while a session with the server is up."),
	}
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.rebase, c.replayed, c.sessions, c.reconnects, c.received, c.sent, c.versions, c.snapshots, c.pending, c.connected} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	st := c.r.Stats()
	buckets := make(map[float64]uint64, len(rebaseBuckets))
	var cum uint64
	for i, ub := range rebaseBuckets {
		cum += c.r.stats.rebaseIn[i].Load()
		buckets[ub] = cum
	}
	ch <- prometheus.MustNewConstHistogram(c.rebase, st.Rebases, st.RebaseTotal.Seconds(), buckets)
	counter := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	counter(c.replayed, st.Replayed)
	counter(c.sessions, st.Sessions)
	counter(c.reconnects, st.Reconnects)
	counter(c.received, st.BytesReceived)
	counter(c.sent, st.BytesSent)
	counter(c.versions, st.VersionsApplied)
	counter(c.snapshots, st.SnapshotsInstalled)
	status := c.r.Status()
	ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(status.Pending))
	connected := 0.0
	if status.Connected {
		connected = 1
	}
	ch <- prometheus.MustNewConstMetric(c.connected, prometheus.GaugeValue, connected)
}

// countingWriter counts the bytes written through it into n.
type countingWriter struct {
	w io.Writer
	n *atomic.Uint64
}

func (c countingWriter) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	c.n.Add(uint64(k))
	return k, err
}
