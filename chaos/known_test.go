package chaos

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// knownServerOpenVague: server.Open on a full disk failed with "PRAGMA
// journal_mode=WAL: sqlite3: disk I/O error", not "no space left on
// device" (found by TestChaos restarting the server while its disk was
// full). Fixed: the open's error is classified as a batch's is.
const knownServerOpenVague = false

// knownReplayVague: on a real full disk (a replica's files on a full
// tmpfs), a replica's replay of its pending mutations fails at COMMIT with
// a bare "replay: commit: sqlite3: disk I/O error", not "no space left on
// device", in its log and in the ErrPendingHidden that Mutate then returns
// (found by TestChaosCluster, seed 5712890115727769020, in about one seed
// of twenty; the replica's code, not fixed here). While it stands, the
// suite takes such an error, on a replica whose disk it filled, for the
// disk fault it is.
const knownReplayVague = true

// TestServerOpenOnFullDiskSaysSo: a server whose disk is full may fail to
// open, but must say why: "no space left on device".
func TestServerOpenOnFullDiskSaysSo(t *testing.T) {
	disk, err := smallDisk(t, "8m")
	if err != nil {
		t.Skipf("needs a small tmpfs: %v", err)
	}
	ctx := context.Background()
	dir := filepath.Join(disk, "server")
	cfg := server.Config{Dir: dir, Mutators: registry(t), Logger: quietLogger(),
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		}}
	srv, err := server.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddDatabase(ctx, dbName, secret); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := fill(filepath.Join(disk, "filler")); err == nil {
		t.Fatal("the disk did not fill")
	}
	srv, err = server.Open(ctx, cfg)
	if err == nil {
		srv.Close()
		t.Skip("the server opened on a full disk: nothing to say")
	}
	if !strings.Contains(err.Error(), "no space left on device") {
		if knownServerOpenVague {
			t.Skipf("known: server.Open on a full disk does not say so: %v", err)
		}
		t.Fatalf("server.Open on a full disk: %v, want it to say \"no space left on device\"", err)
	}
	os.Remove(filepath.Join(disk, "filler"))
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestSnapshotOnFullDiskSaysSo: an owner's snapshot starts with a
// checkpoint, which on a full disk failed with a bare "snapshot:
// checkpoint: sqlite3: disk I/O error" (found by TestChaosCluster, the
// owner's node on a full tmpfs); it must say "no space left on device".
func TestSnapshotOnFullDiskSaysSo(t *testing.T) {
	disk, err := smallDisk(t, "8m")
	if err != nil {
		t.Skipf("needs a small tmpfs: %v", err)
	}
	ctx := context.Background()
	srv, err := server.Open(ctx, server.Config{Dir: filepath.Join(disk, "server"), Mutators: registry(t), Logger: quietLogger(),
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := srv.AddDatabase(ctx, dbName, secret); err != nil {
		t.Fatal(err)
	}
	auth := srv.Authority(dbName)
	if auth == nil {
		t.Fatal("no authority")
	}
	// Pages in the WAL that the checkpoint must add to the main file.
	if _, err := auth.Exec(ctx, func(tx mutators.Tx) error {
		if _, err := tx.Exec(`CREATE TABLE IF NOT EXISTS filler(b BLOB)`); err != nil {
			return err
		}
		_, err := tx.Exec(`INSERT INTO filler SELECT randomblob(1000) FROM generate_series(1, 1000)`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(disk, "filler")
	defer os.Remove(filler)
	if _, err := fill(filler); err == nil {
		t.Fatal("the disk did not fill")
	}
	sr, err := auth.OpenSnapshot(ctx)
	if err == nil {
		sr.Close()
		t.Skip("the snapshot's checkpoint found room: nothing to say")
	}
	if !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("OpenSnapshot on a full disk: %v, want it to say \"no space left on device\"", err)
	}
}

// TestFollowerImageOnFullDiskRecovers: a follower whose image install
// meets a full disk must serve the database once space returns. Its copy
// stayed poisoned for good (found by TestChaosCluster, seed
// 9663264129092618901): every later install failed at once with the
// poisoning error, and every Hello was refused. The follower's disk is
// filled but for room for the image, not for installing it.
func TestFollowerImageOnFullDiskRecovers(t *testing.T) {
	disk, err := smallDisk(t, "16m")
	if err != nil {
		t.Skipf("needs a small tmpfs: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	js := startJetStream(t, ctx, dir, false)
	reg := registry(t)
	certDir := filepath.Join(dir, "cert")
	if err := os.MkdirAll(certDir, 0o755); err != nil {
		t.Fatal(err)
	}
	start := func(name, dir string) (*nodeLife, string) {
		nc, jsc, err := js[0].Connect()
		if err != nil {
			t.Fatal(err)
		}
		l, err := openLife(ctx, nc, jsc, 1, name, dir, certDir, reg, quietLogger(), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.end(true) })
		if err := l.srv.AddDatabase(ctx, dbName, secret); err != nil {
			t.Fatal(err)
		}
		addr, err := l.listen(ctx, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return l, addr
	}
	a, addrA := start("a", filepath.Join(dir, "a"))
	open := func(addr string) *replica.Replica {
		r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "r.db"), replica.Options{Mutators: reg, Logger: quietLogger(),
			Remote: &replica.Remote{Addr: addr, Database: dbName, Credential: secret, Fingerprint: a.srv.Fingerprint()}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	rA := open(addrA)
	// Enough versions for a snapshot (snapshotPolicy) and a trim: a new
	// follower must start from an image.
	for i := range 40 {
		h, err := rA.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("a", 1))
		if err == nil {
			err = h.Wait(ctx)
		}
		if err != nil {
			t.Fatalf("increment %d: %v", i, err)
		}
	}
	tail := rA.Status().Version

	// B, logging to blog, with the database registered.
	b, _ := start("b", filepath.Join(disk, "b"))
	b.end(true)
	blog := newRing(200)
	nc, jsc, err := js[0].Connect()
	if err != nil {
		t.Fatal(err)
	}
	b, err = openLife(ctx, nc, jsc, 1, "b", filepath.Join(disk, "b"), certDir, reg, slog.New(slog.NewTextHandler(blog, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.end(true) })
	addrB, err := b.listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("B's log:\n%s", blog.String())
		}
	}()
	filler := filepath.Join(disk, "filler")
	if _, err := fill(filler); err == nil {
		t.Fatal("the disk did not fill")
	}
	// Room for the follower's files and the image, not for the install.
	st, err := os.Stat(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filler, st.Size()-72<<10); err != nil {
		t.Fatal(err)
	}
	rB := open(addrB)
	time.Sleep(2 * time.Second) // the follower meets the full disk
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 15*time.Second)
	defer wcancel()
	for rB.Status().Version < tail {
		select {
		case <-wctx.Done():
			t.Fatalf("the replica on the follower at %+v once space returned, the tail %d", rB.Status(), tail)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
