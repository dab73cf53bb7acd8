package server

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/wal"
)

// readSnapshot reads snapshot chunks into the client's image.
func (c *client) readSnapshot() {
	c.t.Helper()
	var raw []byte
	var chunk *protocol.SnapshotChunk
	for chunk == nil || chunk.First+chunk.Count-1 < chunk.DBSize {
		var ok bool
		if chunk, ok = c.read().(*protocol.SnapshotChunk); !ok {
			c.t.Fatal("want snapshot chunks")
		}
		b, err := chunk.Pages(protocol.DefaultLimits)
		if err != nil {
			c.t.Fatal(err)
		}
		raw = append(raw, b...)
	}
	im := &image{version: chunk.Version, sums: wal.NewChecksumTable(chunk.PageSize)}
	im.sums.Resize(chunk.DBSize)
	for i := uint32(0); i < chunk.DBSize; i++ {
		p := raw[int(i)*int(chunk.PageSize) : int(i+1)*int(chunk.PageSize)]
		im.pages = append(im.pages, p)
		im.sums.Set(i+1, wal.PageChecksum(i+1, p))
	}
	if im.sums.Sum() != chunk.Checksum {
		c.t.Fatal("snapshot image does not match its checksum")
	}
	c.im = im
}

// TestConcurrentBootstraps: a bootstrap that starts while another one is
// reading its snapshot shares that snapshot's pin, at an older version than
// the one it subscribed at. It must still get every version after the
// snapshot (it used to skip those between, and fail).
func TestConcurrentBootstraps(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	conn := dial(t, addr, srv.Fingerprint())
	w, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "writer", Credential: "s3cret"})
	welcome(t, m)
	w.push(1)
	w.acked(1)
	// The first bootstrap: it holds the main file at the current version.
	first, err := srv.Authority("demo").OpenSnapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	for id := uint64(2); id <= 5; id++ {
		w.push(id)
		w.acked(id)
	}
	// The second: a replica with a checksum the server does not know gets
	// a snapshot.
	late, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "late", Credential: "s3cret", Version: 1, Checksum: 12345})
	wl := welcome(t, m)
	if !wl.Snapshot || wl.Version != w.im.version {
		t.Fatalf("welcome %+v, want a snapshot at %d", wl, w.im.version)
	}
	late.readSnapshot()
	if late.im.version >= wl.Version {
		t.Fatalf("the snapshot is at %d, the welcome at %d: the test does not share a pin", late.im.version, wl.Version)
	}
	w.push(6)
	w.acked(6)
	late.until(w.im.version)
	if late.im.sums.Sum() != srv.Authority("demo").Checksum() {
		t.Fatal("diverged after a shared snapshot")
	}
}

// TestSessionMutatorCommitIsRejected: over the wire, a mutator that runs
// COMMIT is rejected and acknowledged like any rejection; the client's
// next mutation is acknowledged too (it used to get "internal error, retry
// later" forever, and the server committed part of the batch each time).
func TestSessionMutatorCommitIsRejected(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.SelfCheck = true })
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "c", Credential: "s3cret"})
	welcome(t, m)
	bad, _ := json.Marshal([]string{"INSERT INTO Categories(name, count) VALUES('bad', 1)", "COMMIT"})
	if err := protocol.WriteMessage(c.stream, &protocol.Push{Mutations: []protocol.Mutation{{ID: 1, Name: "exec", Args: bad}}}); err != nil {
		t.Fatal(err)
	}
	c.acked(1)
	c.push(2)
	c.acked(2)
	a := srv.Authority("demo")
	if err := a.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	if count(t, a, "bad") != 0 || count(t, a, "Food") != 1 {
		t.Fatalf("bad %d, Food %d; want 0 and 1", count(t, a, "bad"), count(t, a, "Food"))
	}
	rej, err := mutators.Rejections(context.Background(), a.db, "c", 0, 2)
	if err != nil || !strings.Contains(rej[1], "COMMIT inside a mutator") {
		t.Fatalf("rejection of 1: %q (%v)", rej[1], err)
	}
	if c.im.sums.Sum() != a.Checksum() {
		t.Fatal("the client's image differs from the server's")
	}
}
