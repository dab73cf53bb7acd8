package server

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// scrape reads one series from g: a counter's or gauge's value, or a
// histogram's sample count (and its sum in the second result). Labels are
// name=value pairs. A series that does not exist reads as 0.
func scrape(t testing.TB, g prometheus.Gatherer, name string, labels ...string) (float64, float64) {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			want := map[string]string{}
			for i := 0; i+1 < len(labels); i += 2 {
				want[labels[i]] = labels[i+1]
			}
			for _, lp := range m.GetLabel() {
				if v, ok := want[lp.GetName()]; ok && v != lp.GetValue() {
					continue series
				}
				delete(want, lp.GetName())
			}
			if len(want) > 0 {
				continue
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				return m.GetCounter().GetValue(), 0
			case dto.MetricType_GAUGE:
				return m.GetGauge().GetValue(), 0
			case dto.MetricType_HISTOGRAM:
				return float64(m.GetHistogram().GetSampleCount()), m.GetHistogram().GetSampleSum()
			}
		}
	}
	return 0, 0
}

// eventually polls cond for up to 10 s: a counter moves after the write
// the client already saw.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// countingReader counts what a client read from its stream.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TestMetrics drives a push, a rejection, refusals, a snapshot and a slow
// client's cut-off through a server, and checks by scraping its registry
// that each counter moved by exactly that much.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.Metrics = reg })
	get := func(name string, labels ...string) float64 {
		v, _ := scrape(t, reg, name, labels...)
		return v
	}
	// Added, not yet opened (the first Hello or admin call opens it).
	if n := get(metricDatabases, "state", "open"); n != 0 {
		t.Fatalf("open databases %v, want 0", n)
	}
	if n := get(metricDatabases, "state", "idle"); n != 1 {
		t.Fatalf("idle databases %v, want 1", n)
	}
	srv.Authority("demo")
	if open, idle := get(metricDatabases, "state", "open"), get(metricDatabases, "state", "idle"); open != 1 || idle != 0 {
		t.Fatalf("open databases %v, idle %v; want 1, 0", open, idle)
	}
	versions0, bytes0 := get(metricVersions), get(metricPublished)
	commits0, _ := scrape(t, reg, metricCommit)

	// A client whose every byte read is counted.
	conn := dial(t, addr, srv.Fingerprint())
	stream, err := conn.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var read atomic.Int64
	c := &client{t: t, conn: conn, stream: stream, r: protocol.NewReader(countingReader{stream, &read}, protocol.DefaultLimits), im: newImage()}
	if err := protocol.WriteMessage(stream, &protocol.Hello{Protocol: protocol.Version, Database: "demo", ClientID: "alice", Credential: "s3cret", Checksum: c.im.sums.Sum()}); err != nil {
		t.Fatal(err)
	}
	welcome(t, c.read())
	eventually(t, "one session", func() bool { return get(metricSessions) == 1 })
	if n := get(metricConns); n != 1 {
		t.Fatalf("connections %v, want 1", n)
	}

	// Three mutations in one push: one batch, one version, one commit.
	c.until(1)
	c.push(1, 2, 3)
	c.acked(3)
	if n := get(metricMutations, "outcome", "applied"); n != 3 {
		t.Fatalf("applied %v, want 3", n)
	}
	if n, sum := scrape(t, reg, metricBatch); n != 1 || sum != 3 {
		t.Fatalf("batches %v of %v mutations, want 1 of 3", n, sum)
	}
	if n, _ := scrape(t, reg, metricCommit); n != commits0+1 {
		t.Fatalf("commits timed %v, want %v", n, commits0+1)
	}
	rec, err := srv.EncodedVersion("demo", 2)
	if err != nil {
		t.Fatal(err)
	}
	if n, b := get(metricVersions), get(metricPublished); n != versions0+1 || b != bytes0+float64(len(rec)) {
		t.Fatalf("published %v versions of %v bytes, want %v of %v", n-versions0, b-bytes0, 1, len(rec))
	}
	// Everything the server wrote, the client read: the ack was last.
	eventually(t, "bytes sent = bytes read", func() bool { return get(metricSent) == float64(read.Load()) })

	// A mutator that fails: rejected, and still a batch of its own.
	if err := protocol.WriteMessage(stream, &protocol.Push{Mutations: []protocol.Mutation{{ID: 4, Name: "fail"}}}); err != nil {
		t.Fatal(err)
	}
	c.acked(4)
	if n := get(metricMutations, "outcome", "rejected"); n != 1 {
		t.Fatalf("rejected %v, want 1", n)
	}
	if n := get(metricMutations, "outcome", "applied"); n != 3 {
		t.Fatalf("applied %v after a rejection, want 3", n)
	}

	// Refusals, by the code's name.
	for range 2 {
		_, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "x", Credential: "nope"})
		if e, ok := m.(*protocol.Error); !ok || e.Code != protocol.CodeUnauthorized {
			t.Fatalf("got %#v, want unauthorized", m)
		}
	}
	_, m := openClient(t, conn, protocol.Hello{Database: "nosuch", ClientID: "x", Credential: "s3cret"})
	if e, ok := m.(*protocol.Error); !ok || e.Code != protocol.CodeUnknownDatabase {
		t.Fatalf("got %#v, want unknown database", m)
	}
	if n := get(metricRefusals, "code", protocol.CodeUnauthorized.String()); n != 2 {
		t.Fatalf("unauthorized refusals %v, want 2", n)
	}
	if n := get(metricRefusals, "code", protocol.CodeUnknownDatabase.String()); n != 1 {
		t.Fatalf("unknown database refusals %v, want 1", n)
	}
	if n := get(metricSessions); n != 1 {
		t.Fatalf("sessions %v after refusals, want 1", n)
	}

	// A replica that is not on the server's history gets a snapshot.
	odd, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "odd", Credential: "s3cret", Version: 2, Checksum: 12345})
	if !welcome(t, m).Snapshot {
		t.Fatal("no snapshot")
	}
	for {
		chunk, ok := odd.read().(*protocol.SnapshotChunk)
		if !ok {
			t.Fatal("want snapshot chunks")
		}
		if chunk.First+chunk.Count-1 >= chunk.DBSize {
			break
		}
	}
	eventually(t, "one snapshot sent", func() bool { return get(metricSnapshots) == 1 })
	eventually(t, "two sessions", func() bool { return get(metricSessions) == 2 })
	odd.stream.Close()
	odd.stream.CancelRead(0)
	eventually(t, "the snapshot's session ended", func() bool { return get(metricSessions) == 1 })

	// A session whose queue overflows is cut off (driven directly: a real
	// slow client needs hundreds of large versions to fill QUIC's windows).
	s := newSession(srv, stream, "test")
	for i := 0; i <= srv.cfg.SessionQueue; i++ {
		s.offer(item{version: uint64(i), rec: []byte{1}})
	}
	if n := get(metricSlow, "reason", "queue"); n != 1 {
		t.Fatalf("slow client cut-offs %v, want 1", n)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
}

// TestHealthHandler: /healthz answers while the process is up, /readyz
// only while the server listens with every database usable, and /metrics
// is the Prometheus text.
func TestHealthHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv, _ := testServer(t, t.TempDir(), func(c *Config) { c.Metrics = reg })
	h := httptest.NewServer(srv.Handler(reg))
	defer h.Close()
	status := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(h.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := status("/healthz"); code != 200 {
		t.Fatalf("/healthz %d", code)
	}
	if code, body := status("/readyz"); code != 200 {
		t.Fatalf("/readyz %d: %s", code, body)
	}
	if code, body := status("/metrics"); code != 200 || !strings.Contains(body, metricDatabases+`{state="idle"} 1`) { // added, not opened yet
		t.Fatalf("/metrics %d:\n%s", code, body)
	}
	// A broken database makes the server not ready, and says which.
	a := srv.Authority("demo")
	a.mu.Lock()
	a.broken = errBrokenForTest
	a.mu.Unlock()
	if code, body := status("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "database demo") {
		t.Fatalf("/readyz with a broken database: %d %s", code, body)
	}
	a.mu.Lock()
	a.broken = nil
	a.mu.Unlock()
	// A batch holding the authority past the deadline: not ready (busy).
	a.mu.Lock()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	err := srv.Ready(ctx)
	cancel()
	a.mu.Unlock()
	if err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("Ready while the authority is held: %v", err)
	}
	srv.Close()
	if code, _ := status("/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz after Close: %d", code)
	}
	if code, _ := status("/healthz"); code != 200 {
		t.Fatalf("/healthz after Close %d", code)
	}
}

var errBrokenForTest = io.ErrUnexpectedEOF

// TestMetricsPerDatabase: the opt-in label names the database; without it
// no series carries one.
func TestMetricsPerDatabase(t *testing.T) {
	for _, perDB := range []bool{false, true} {
		reg := prometheus.NewRegistry()
		srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.Metrics = reg; c.MetricsPerDatabase = perDB })
		c, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "a", Credential: "s3cret"})
		welcome(t, m)
		c.push(1)
		c.acked(1)
		withDB, _ := scrape(t, reg, metricMutations, "outcome", "applied", "db", "demo")
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		labelled := false
		for _, f := range fams {
			for _, m := range f.GetMetric() {
				for _, lp := range m.GetLabel() {
					labelled = labelled || lp.GetName() == "db"
				}
			}
		}
		if perDB && (withDB != 1 || !labelled) {
			t.Fatalf("per database: applied{db=demo} %v, labelled %v", withDB, labelled)
		}
		if !perDB && labelled {
			t.Fatal("a series has a db label without MetricsPerDatabase")
		}
		srv.Close()
	}
}

// TestMetricsReopen: Close takes the server's collectors off the registry,
// so that the process may open the server again on the same one; two
// servers open at once on one registry is an error at Open.
func TestMetricsReopen(t *testing.T) {
	reg := prometheus.NewRegistry()
	dir := t.TempDir()
	srv, _ := testServer(t, dir, func(c *Config) { c.Metrics = reg })
	if _, err := Open(context.Background(), Config{Dir: t.TempDir(), Mutators: testRegistry(t), Setup: demoSetup, Metrics: reg}); err == nil || !strings.Contains(err.Error(), "register metrics") {
		t.Fatalf("a second server on the same registry: %v", err)
	}
	srv.Close()
	srv2, err := Open(context.Background(), Config{Dir: dir, Mutators: testRegistry(t), Setup: demoSetup, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	srv2.Authority("demo")
	if v, _ := scrape(t, reg, metricDatabases, "state", "open"); v != 1 {
		t.Fatalf("open databases after reopen %v, want 1", v)
	}
}
