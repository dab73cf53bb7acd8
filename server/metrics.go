package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// Metric names, for dashboards and the README's table. Every series is
// server-wide unless Config.MetricsPerDatabase adds a "db" label: a label
// per database would make the series count grow with the tenants.
const (
	metricMutations    = "sqlrebase_server_mutations_total"
	metricBatch        = "sqlrebase_server_batch_mutations"
	metricCommit       = "sqlrebase_server_commit_seconds"
	metricCheckpoint   = "sqlrebase_server_checkpoint_seconds"
	metricVersions     = "sqlrebase_server_versions_published_total"
	metricPublished    = "sqlrebase_server_published_bytes_total"
	metricSessions     = "sqlrebase_server_sessions"
	metricConns        = "sqlrebase_server_connections"
	metricSent         = "sqlrebase_server_sent_bytes_total"
	metricSlow         = "sqlrebase_server_slow_client_cutoffs_total"
	metricSnapshots    = "sqlrebase_server_snapshots_sent_total"
	metricRefusals     = "sqlrebase_server_refusals_total"
	metricDatabases    = "sqlrebase_server_databases"
	readyCheckInterval = 10 * time.Millisecond
)

// ErrNotReady is what Server.Ready wraps when the server cannot serve:
// not listening, closed, or a database broken.
var ErrNotReady = errors.New("server: not ready")

// metrics are the server's Prometheus collectors. They always exist (a
// counter costs an atomic add), and are registered only when
// Config.Metrics is set, so that the code that counts needs no nil checks.
type metrics struct {
	perDB      bool
	reg        prometheus.Registerer
	registered []prometheus.Collector // unregistered by Close, so that a server opened again may register its own

	mutations  *prometheus.CounterVec   // outcome
	batch      *prometheus.HistogramVec // mutations per batch
	commit     *prometheus.HistogramVec // the COMMIT statement, including the WAL fsync
	checkpoint *prometheus.HistogramVec // a checkpoint: copies the WAL into the main file and fsyncs both
	versions   *prometheus.CounterVec
	published  *prometheus.CounterVec // encoded bytes of the versions published
	sessions   *prometheus.GaugeVec   // admitted sessions: connected replicas
	sent       *prometheus.CounterVec // bytes written to clients
	slow       *prometheus.CounterVec // reason: queue (fell behind the bounded queue), write (a write timed out or failed)
	snapshots  *prometheus.CounterVec
	refusals   *prometheus.CounterVec // code: the protocol error code's name
}

// newMetrics makes the collectors and registers them, with gauges over the
// server's registry of connections and databases, on reg (nil: none).
func newMetrics(s *Server, reg prometheus.Registerer, perDB bool) (*metrics, error) {
	l := func(names ...string) []string {
		if perDB {
			return append([]string{"db"}, names...)
		}
		return names
	}
	m := &metrics{
		perDB: perDB,
		mutations: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricMutations,
			Help: "Mutations the writer ran, by outcome: applied, rejected (the mutator failed), duplicate, refused (an id gap)."}, l("outcome")),
		batch: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: metricBatch,
			Help:    "Mutations per batch: one transaction, one version, one fsync (group commit).",
			Buckets: prometheus.ExponentialBuckets(1, 4, 8)}, l()),
		commit: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: metricCommit,
			Help:    "Duration of a batch's COMMIT statement, which includes the WAL fsync (synchronous=FULL).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10)}, l()),
		checkpoint: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: metricCheckpoint,
			Help:    "Duration of a WAL checkpoint, which writes and fsyncs the main file.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10)}, l()),
		versions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricVersions,
			Help: "Versions committed and offered to subscribers."}, l()),
		published: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricPublished,
			Help: "Encoded bytes of the versions published (each counted once, however many subscribers)."}, l()),
		sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricSessions,
			Help: "Database sessions admitted and open: connected replicas."}, l()),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricSent,
			Help: "Bytes written to clients' streams (versions, snapshots, acks, errors)."}, l()),
		slow: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricSlow,
			Help: "Sessions cut off as too slow: reason queue (fell behind the bounded queue) or write (a write failed or timed out)."}, l("reason")),
		snapshots: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricSnapshots,
			Help: "Snapshots sent in full to replicas too new, too far behind or diverged."}, l()),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricRefusals,
			Help: "Connections and hellos refused, by the protocol error code's name."}, []string{"code"}),
	}
	if reg == nil {
		return m, nil
	}
	conns := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: metricConns,
		Help: "QUIC connections open."}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(len(s.conns))
	})
	dbs := newDatabasesCollector(s)
	m.reg = reg
	for _, c := range []prometheus.Collector{m.mutations, m.batch, m.commit, m.checkpoint, m.versions, m.published,
		m.sessions, m.sent, m.slow, m.snapshots, m.refusals, conns, dbs} {
		if err := reg.Register(c); err != nil {
			m.unregister()
			return nil, fmt.Errorf("server: register metrics (another server open on this registry?): %w", err)
		}
		m.registered = append(m.registered, c)
	}
	return m, nil
}

// unregister takes the collectors off the registry (at Close): the gauges
// read a server that is gone, and the same process may open it again.
func (m *metrics) unregister() {
	for _, c := range m.registered {
		m.reg.Unregister(c)
	}
	m.registered = nil
}

// lv is the label values of a series: the database's name first when
// labelled per database.
func (m *metrics) lv(db string, vals ...string) []string {
	if m.perDB {
		return append([]string{db}, vals...)
	}
	return vals
}

var outcomeNames = [...]string{Applied: "applied", Rejected: "rejected", Duplicate: "duplicate", Refused: "refused"}

// batchDone counts one batch the writer ran.
func (m *metrics) batchDone(db string, results []Result) {
	var n [len(outcomeNames)]int
	for _, r := range results {
		if int(r.Outcome) < len(n) {
			n[r.Outcome]++
		}
	}
	for o, c := range n {
		if c > 0 {
			m.mutations.WithLabelValues(m.lv(db, outcomeNames[o])...).Add(float64(c))
		}
	}
	m.batch.WithLabelValues(m.lv(db)...).Observe(float64(len(results)))
}

// refused counts a refusal; the code's name is the label (bounded: the
// protocol's codes).
func (m *metrics) refused(code protocol.Code) {
	m.refusals.WithLabelValues(code.String()).Inc()
}

// databasesCollector reports how many databases are open and idle, read
// from the server's registry at each scrape, so that it follows whatever
// states the registry has.
type databasesCollector struct {
	s    *Server
	desc *prometheus.Desc
}

func newDatabasesCollector(s *Server) *databasesCollector {
	return &databasesCollector{s: s, desc: prometheus.NewDesc(metricDatabases,
		"Hosted databases by state: open (files and writer up) or idle (closed until its next session).", []string{"state"}, nil)}
}

// Describe implements prometheus.Collector.
func (c *databasesCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *databasesCollector) Collect(ch chan<- prometheus.Metric) {
	open, idle := c.s.databaseStates()
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(open), "open")
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(idle), "idle")
}

// databaseStates counts the registry's databases that are open (opening
// and closing ones too: they hold files) and idle (closed).
func (s *Server) databaseStates() (open, idle int) {
	hosted, open := s.reg.counts()
	return open, hosted - open
}

// Ready reports whether the server can serve: it is listening, not closed,
// and no open database is broken. A database busy past ctx counts as not
// ready (its writer is stuck). The error wraps ErrNotReady.
func (s *Server) Ready(ctx context.Context) error {
	s.mu.Lock()
	listening, closed := s.listener != nil, s.closed
	s.mu.Unlock()
	dbs := s.reg.openDatabases() // a closed database is checked when it next opens
	switch {
	case closed:
		return fmt.Errorf("%w: closed", ErrNotReady)
	case !listening:
		return fmt.Errorf("%w: not listening", ErrNotReady)
	}
	for _, d := range dbs {
		if err := d.auth.healthy(ctx); err != nil {
			return fmt.Errorf("%w: database %s: %w", ErrNotReady, d.name, err)
		}
	}
	return nil
}

// healthy returns the authority's broken state. It waits for the lock no
// longer than ctx: a batch holds it while it runs.
func (a *Authority) healthy(ctx context.Context) error {
	t := time.NewTicker(readyCheckInterval)
	defer t.Stop()
	for !a.mu.TryLock() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("busy: %w", ctx.Err())
		case <-t.C:
		}
	}
	defer a.mu.Unlock()
	return a.broken
}

// Handler serves g's metrics on /metrics, and the server's health on
// /healthz (the process is up: always 200) and /readyz (200 when Ready,
// else 503 with the reason). g may be nil for health alone.
func (s *Server) Handler(g prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	if g != nil {
		mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := s.Ready(ctx); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// observer takes a duration in seconds (a histogram's series); the
// authority holds one so that it need not know Prometheus.
type observer = prometheus.Observer

// dbName is the session's database, "" before its hello is admitted.
func (s *session) dbName() string {
	if s.db == nil {
		return ""
	}
	return s.db.name
}

// isTimeout reports whether a write failed on its deadline: the client
// read nothing for writeTimeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}
