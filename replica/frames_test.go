package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// bigVersion commits one admin change on the server that adds rows blobs
// of blobBytes random (incompressible) bytes, the last zeros of them
// zeros: one version of about rows × blobBytes bytes of pages.
func bigVersion(t *testing.T, ts *testServer, rows, blobBytes, zeros int) {
	t.Helper()
	ps, err := ts.srv.Authority(testDB).Exec(context.Background(), func(tx mutators.Tx) error {
		if _, err := tx.Exec(`CREATE TABLE IF NOT EXISTS big (id INTEGER PRIMARY KEY, b BLOB)`); err != nil {
			return err
		}
		_, err := tx.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?) INSERT INTO big (b) SELECT randomblob(?) || zeroblob(?) FROM n`, rows, blobBytes-zeros, zeros)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("version %d: %d pages", ps.Version, len(ps.Pages))
}

// largeVersionCase runs a version of rows × blobBytes to a replica that is
// behind (closed while the version commits) and to one that is connected
// (the live path), with the replica's message limit lowered to maxMessage.
func largeVersionCase(t *testing.T, rows, blobBytes, zeros int, maxMessage uint32) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	rm := ts.remote()
	rm.MaxMessage = maxMessage
	dir := t.TempDir()
	behindPath := filepath.Join(dir, "behind.db")
	behind := openSynced(t, behindPath, reg, rm)
	live := openSynced(t, filepath.Join(dir, "live.db"), reg, rm)
	mustMutate(t, behind, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, behind, live)
	behind.Close()

	// A small version first: the replica behind then has a checksum the
	// change log can vouch for, and takes the big one from the log.
	mustMutate(t, live, mutators.CreateCategoryOrIncrementIfExists, incr("Rent", 1))
	converged(t, ts, live)
	bigVersion(t, ts, rows, blobBytes, zeros)
	mustMutate(t, live, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, live)

	behind = openSynced(t, behindPath, reg, rm)
	converged(t, ts, behind, live)
	for _, r := range []*Replica{behind, live} {
		if err := r.Status().LastError; err != nil {
			t.Fatalf("%s: %v", r.ClientID(), err)
		}
	}
}

// TestSyncVersionInParts: a version several times the replica's message
// limit reaches it in parts, behind and live.
func TestSyncVersionInParts(t *testing.T) {
	largeVersionCase(t, 100, 40<<10, 0, protocol.MinMessage) // ~4 MiB against 1 MiB messages
}

// TestSyncSeventyThousandPages: an admin change of ~70,000 pages (~280 MB
// of pages), beyond the old 65,536-page limit, reaches a replica behind and
// one connected. Compressible, it is far smaller than the database and
// comes from the change log (old main: refused by the replica's decoder,
// reconnecting forever); incompressible, beyond the old 64 MiB message
// limit, it goes live in parts (and as a snapshot to the replica behind,
// since it weighs as much as the whole database).
func TestSyncSeventyThousandPages(t *testing.T) {
	if testing.Short() {
		t.Skip("280 MB versions; TestSyncVersionInParts covers parts in short mode")
	}
	t.Run("compressible", func(t *testing.T) { largeVersionCase(t, 8750, 32000, 31000, 0) })
	t.Run("incompressible", func(t *testing.T) { largeVersionCase(t, 8750, 32000, 0, 0) })
}

// TestSyncVersionTooLarge: a version beyond what the replica said it holds
// stops its sync with a fatal, clear error instead of a reconnect loop.
func TestSyncVersionTooLarge(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	rm := ts.remote()
	rm.MaxVersionBytes = protocol.MinVersionBytes
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 30*time.Second)
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	bigVersion(t, ts, 40, 40<<10, 0) // ~1.6 MiB
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	err := r.Sync(ctx)
	var re *protocol.RemoteError
	if !errors.As(err, &re) || re.Code != protocol.CodeVersionTooLarge {
		t.Fatalf("Sync: %v, want a fatal version too large", err)
	}
	t.Log(err)
}

// TestSyncServerBehind: a server restored from an older backup is behind
// the replica; the replica stops with ErrServerBehind instead of looping
// on a snapshot it refuses, and keeps its pending mutation queued.
func TestSyncServerBehind(t *testing.T) {
	reg := testRegistry(t)
	srvDir := t.TempDir()
	ts := startServer(t, reg, srvDir, "127.0.0.1:0", nil)
	backup := t.TempDir()
	path := filepath.Join(t.TempDir(), "r.db")
	r := openSynced(t, path, reg, ts.remote())
	ctx := waitCtx(t, 30*time.Second)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, r)
	// The backup: the server's files now, at the replica's version.
	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	copyDir(t, srvDir, backup)
	ts.restart()
	for i := range 3 {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr(fmt.Sprint("C", i), 1))
	}
	converged(t, ts, r)
	r.Close()
	// Restore the older backup.
	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	removeDir(t, srvDir)
	copyDir(t, backup, srvDir)
	ts.restart()
	r = openSynced(t, path, reg, ts.remote())
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Late", 1))
	err := r.WaitConnected(ctx)
	if !errors.Is(err, ErrServerBehind) {
		t.Fatalf("WaitConnected: %v, want ErrServerBehind", err)
	}
	t.Log(err)
	if st := r.Status(); st.Pending != 1 {
		t.Fatalf("pending %d, want the mutation still queued", st.Pending)
	}
}

// copyDir copies the tree src into dst.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
}

// removeDir empties dir.
func removeDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSyncReadsWhilePushBlocks: while a push write waits for a server that
// reads no more (its writer queue is full), the replica goes on reading
// what the server sends. Before, the sync goroutine sat in the write, the
// server's sender filled the replica's buffers and was cut off at its
// write deadline as a slow client: a long backlog could never drain.
func TestSyncReadsWhilePushBlocks(t *testing.T) {
	dir := t.TempDir()
	cert, _, err := protocol.LoadOrCreateCertificate(filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem"), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", protocol.ServerTLS(cert), protocol.QUICConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const marker = 77
	served := make(chan error, 1)
	go func() {
		// A server that welcomes, then never reads again, and sends an Ack.
		served <- func() error {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return err
			}
			s, err := conn.AcceptStream(context.Background())
			if err != nil {
				return err
			}
			m, err := protocol.NewReader(s, protocol.DefaultLimits).Read()
			if err != nil {
				return err
			}
			h := m.(*protocol.Hello)
			if err := protocol.WriteMessage(s, &protocol.Welcome{Version: h.Version, PageSize: 4096, MaxBatch: 1000, MaxInFlight: 1 << 20}); err != nil {
				return err
			}
			time.Sleep(time.Second) // the pushes fill the stream's window
			return protocol.WriteMessage(s, &protocol.Ack{Version: marker})
		}()
	}()
	reg := testRegistry(t)
	rm := &Remote{Addr: ln.Addr().String(), Database: testDB, Credential: testSecret, Fingerprint: protocol.Fingerprint(cert.Certificate[0])}
	r := openSynced(t, filepath.Join(dir, "r.db"), reg, rm)
	ctx := waitCtx(t, 20*time.Second)
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	pad := strings.Repeat("x", 8<<10)
	for range 1000 { // 8 MiB of pushes, far beyond a stream's window
		mustMutate(t, r, "exec", json.RawMessage(`["SELECT 1 -- `+pad+`"]`))
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	deadline := time.After(10 * time.Second)
	for r.Status().ServerVersion != marker {
		select {
		case <-deadline:
			t.Fatalf("the ack sent while a push write was blocked was never read (status %+v)", r.Status())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
