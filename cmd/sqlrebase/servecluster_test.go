package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/cluster"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

// TestServeCluster: serve --cluster on one node embeds JetStream, and a
// replica's mutation reaches the stream, by this node as the lease holder,
// before the replica hears its ack.
func TestServeCluster(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	exited := make(chan int, 1)
	dir := t.TempDir()
	go func() {
		code := cmdServe(ctx, []string{"--data", filepath.Join(dir, "d"), "--listen", "127.0.0.1:0", "--db", "demo:tok",
			"--cluster", "test", "--node", "n1", "--cluster-listen", "127.0.0.1:0", "--lease-ttl", "2s"}, pw, io.Discard, nil)
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
		case <-time.After(30 * time.Second):
			t.Error("serve did not stop")
		}
	}()
	out := map[string]string{}
	lines := bufio.NewScanner(pr)
	for out["databases"] == "" && lines.Scan() {
		if k, v, ok := strings.Cut(lines.Text(), ": "); ok {
			out[k] = v
		}
	}
	go io.Copy(io.Discard, pr)
	if out["nats"] == "" || out["listening"] == "" {
		t.Fatalf("serve printed %v", out)
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	r, err := replica.Open(wctx, filepath.Join(dir, "replica.db"), replica.Options{
		Mutators: demoRegistry(),
		Remote:   &replica.Remote{Addr: out["listening"], Database: "demo", Credential: "tok", Fingerprint: out["fingerprint"]},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h, err := r.Mutate(wctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(wctx); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(strings.Fields(out["nats"])[0])
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	l, err := cluster.OpenLog(wctx, nc, js, cluster.LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	es, err := l.Read(wctx, "demo", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) < 2 || !strings.HasPrefix(es[len(es)-1].Owner, "n1-") {
		t.Fatalf("the stream holds %+v for demo; want the schema's version and the mutation's, by n1", es)
	}
	ls, err := cluster.OpenLeases(wctx, js, cluster.LeaseConfig{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if who, _, err := ls.Holder(wctx, "demo"); err != nil || !strings.HasPrefix(who, "n1-") {
		t.Fatalf("lease holder %q, %v; want n1", who, err)
	}
	// The credentials are in the shared access bucket, not a file.
	kv, err := js.KeyValue(wctx, cluster.DefaultAccessBucket)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(wctx, "demo")
	if err != nil || !strings.Contains(string(e.Value()), `"hash"`) || !strings.Contains(string(e.Value()), r.ClientID()) {
		t.Fatalf("demo's access record in the bucket: %v; want its credential and the replica's client id", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "d", "dbs", "demo", "access.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("an access.json in cluster mode: %v", err)
	}
}
