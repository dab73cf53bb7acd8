package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/cluster"
)

// subjectStart is the first version the demo database's subject holds,
// read through node n's NATS server: above 1 once the stream was trimmed
// behind a snapshot.
func subjectStart(t *testing.T, n *nodeProc) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := nats.Connect(n.natsURL, nats.Timeout(2*time.Second), nats.MaxReconnects(0))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	l, err := cluster.OpenLog(ctx, nc, js, cluster.LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	es, err := l.Read(ctx, "demo", 0, 1)
	if err != nil || len(es) != 1 {
		t.Fatalf("the subject's first entry: %d entries, %v", len(es), err)
	}
	return es[0].Version
}

// TestClusterTrimAndJoin: three `serve --cluster` processes serve three
// replicas until the owner has stored a snapshot and trimmed the stream
// behind it. Then a fourth node, on an empty data directory, joins the
// NATS cluster, and a replica that knows only that node syncs and makes
// increments through it: the new node builds its copy from the snapshot
// and the trimmed stream (the versions before the trim are gone), follows
// the owner and forwards its replica's pushes. Every count is exact, and
// all four nodes and four replicas end at one checksum, which the stock
// sqlite3 reads as ok.
func TestClusterTrimAndJoin(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process cluster test")
	}
	dir := t.TempDir()
	nodes := newClusterNodes(t, dir, 4, 3*time.Second, directRoute, nil)
	startAll(t, nodes[:3]...)
	worker := func(i int, n *nodeProc) clusterWorkerConfig {
		return clusterWorkerConfig{Dir: filepath.Join(dir, n.name+"-w"), Addr: n.addr, Token: "tok", Fingerprint: n.fp,
			Name: "w" + n.name, Pace: 20 * time.Millisecond, Stop: filepath.Join(dir, "stop"), HandshakeTimeout: 500 * time.Millisecond}
	}
	cfgs := make([]clusterWorkerConfig, len(nodes))
	workers := make([]*clusterWorker, len(nodes))
	for i, n := range nodes[:3] {
		cfgs[i] = worker(i, n)
		workers[i] = startClusterWorker(t, cfgs[i])
	}
	waitAcks(t, workers[:3], time.Now().Add(-time.Hour), true, 60*time.Second)
	// Until the owner has trimmed the stream behind a snapshot.
	deadline := time.Now().Add(120 * time.Second)
	var own *nodeProc
	for {
		own = nodeNamed(nodes, waitOwner(t, nodes[:3], 15*time.Second))
		if strings.Contains(own.stderr.String(), "snapshot stored, stream trimmed behind it") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot and trim within 120 s; the owner %s's log:\n%s", own.name, own.stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}
	start := subjectStart(t, own)
	if start <= 1 {
		t.Fatalf("the subject starts at version %d after a trim", start)
	}
	t.Logf("the stream was trimmed: its subject starts at version %d", start)
	joined := nodes[3]
	startAll(t, joined)
	cfgs[3] = worker(3, joined)
	workers[3] = startClusterWorker(t, cfgs[3])
	joinedAt := time.Now()
	waitAcks(t, workers[3:], joinedAt, true, 60*time.Second)
	t.Logf("the new node served its replica's first confirmed increment %v after it started", time.Since(joinedAt).Round(time.Millisecond))
	if s := joined.stderr.String(); !strings.Contains(s, "following the database: another node owns it") {
		t.Errorf("the new node did not follow the database:\n%s", s)
	}
	time.Sleep(2 * time.Second) // the others' increments go on meanwhile
	settleAndCheck(t, nodes, cfgs, stopWorkers(t, dir, workers, cfgs, 120*time.Second))
}
