package server

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// fds counts this process's open file descriptors under dir.
func fdsUnder(t testing.TB, dir string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	n := 0
	for _, e := range ents {
		if p, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(p, dir) {
			n++
		}
	}
	return n
}

// TestLazyOpen: AddDatabase and a restart open nothing (no database file,
// no file descriptor); the first Hello opens the database, creating it
// with the schema as version 1; a wrong credential opens nothing.
func TestLazyOpen(t *testing.T) {
	dir := t.TempDir()
	srv, addr := testServer(t, dir, nil)
	ctx := context.Background()
	if err := srv.AddDatabase(ctx, "lazy", "pw"); err != nil {
		t.Fatal(err)
	}
	dbFile := filepath.Join(dir, "dbs", "lazy", "db.sqlite")
	if _, err := os.Stat(dbFile); err == nil {
		t.Fatal("AddDatabase created the database file: it opened the database")
	}
	if hosted, open := srv.DatabaseCounts(); hosted != 2 || open != 0 {
		t.Fatalf("hosted %d, open %d; want 2, 0", hosted, open)
	}
	if n := fdsUnder(t, filepath.Join(dir, "dbs")); n != 0 {
		t.Fatalf("%d files open under dbs/ before any Hello", n)
	}
	conn := dial(t, addr, srv.Fingerprint())
	_, m := openClient(t, conn, protocol.Hello{Database: "lazy", ClientID: "x", Credential: "wrong"})
	if e, ok := m.(*protocol.Error); !ok || e.Code != protocol.CodeUnauthorized {
		t.Fatalf("wrong credential: %v", m)
	}
	if _, open := srv.DatabaseCounts(); open != 0 {
		t.Fatal("a wrong credential opened the database")
	}
	c, m := openClient(t, conn, protocol.Hello{Database: "lazy", ClientID: "a", Credential: "pw"})
	if w := welcome(t, m); w.Version != 1 {
		t.Fatalf("welcome %+v: want the schema as version 1", w)
	}
	c.until(1)
	if _, open := srv.DatabaseCounts(); open != 1 {
		t.Fatalf("%d open after a Hello, want 1", open)
	}
	if n := fdsUnder(t, filepath.Join(dir, "dbs", "lazy")); n == 0 {
		t.Fatal("no file open for an open database: the count cannot be trusted")
	}
}

// TestIdleCloseAndReopen: once its last session ends, a database closes
// after IdleClose (its files closed); the next Hello opens it again with
// everything it had.
func TestIdleCloseAndReopen(t *testing.T) {
	dir := t.TempDir()
	srv, addr := testServer(t, dir, func(c *Config) { c.IdleClose = 50 * time.Millisecond })
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a", Credential: "s3cret"})
	welcome(t, m)
	c.until(1)
	c.push(1, 2)
	c.acked(2)
	time.Sleep(150 * time.Millisecond)
	if _, open := srv.DatabaseCounts(); open != 1 {
		t.Fatal("closed while a session holds it")
	}
	c.stream.Close()
	eventually(t, "idle close", func() bool { _, open := srv.DatabaseCounts(); return open == 0 })
	if n := fdsUnder(t, filepath.Join(dir, "dbs")); n != 0 {
		t.Fatalf("%d files still open under dbs/ after the idle close", n)
	}
	c, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a", Credential: "s3cret"})
	if w := welcome(t, m); w.LastMutationID != 2 || w.Version < 2 {
		t.Fatalf("after reopening: %+v", w)
	}
	c.until(2)
	c.push(3)
	c.acked(3)
}

// TestOpenBoundRefusesBusy: with MaxOpenDatabases open and held, a Hello
// for another is refused with the retryable CodeBusy; once one is idle,
// it is closed to make room (the least recently used first).
func TestOpenBoundRefusesBusy(t *testing.T) {
	dir := t.TempDir()
	srv, addr := testServer(t, dir, func(c *Config) {
		c.MaxOpenDatabases, c.OpenWait, c.IdleClose = 2, 100*time.Millisecond, time.Hour
		c.CredentialHashIterations = 1
	})
	ctx := context.Background()
	for _, n := range []string{"b", "c"} {
		if err := srv.AddDatabase(ctx, n, "pw"); err != nil {
			t.Fatal(err)
		}
	}
	conn := dial(t, addr, srv.Fingerprint())
	ca, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a", Credential: "s3cret"})
	welcome(t, m)
	cb, m := openClient(t, conn, protocol.Hello{Database: "b", ClientID: "b", Credential: "pw"})
	welcome(t, m)
	_, m = openClient(t, conn, protocol.Hello{Database: "c", ClientID: "c", Credential: "pw"})
	e, ok := m.(*protocol.Error)
	if !ok || e.Code != protocol.CodeBusy || e.Code.Fatal() {
		t.Fatalf("a third database with two held: %v, want a retryable CodeBusy", m)
	}
	t.Logf("refused: %v", e.Err())
	cb.stream.Close()
	time.Sleep(20 * time.Millisecond)
	ca.stream.Close()
	eventually(t, "both idle", func() bool {
		for _, n := range []string{"demo", "b"} {
			tn, _ := srv.tenant(n)
			tn.mu.Lock()
			refs := tn.life.refs
			tn.mu.Unlock()
			if refs != 0 {
				return false
			}
		}
		return true
	})
	cc, m := openClient(t, conn, protocol.Hello{Database: "c", ClientID: "c", Credential: "pw"})
	welcome(t, m)
	cc.until(1)
	tb, _ := srv.tenant("b")
	tdemo, _ := srv.tenant("demo")
	if sb, sd := stateOf(tb), stateOf(tdemo); sb != tClosed || sd != tOpen {
		t.Fatalf("b %v, demo %v: want b (least recently used) closed", sb, sd)
	}
	if _, open := srv.DatabaseCounts(); open != 2 {
		t.Fatalf("%d open, bound 2", open)
	}
}

// TestHelloRacingIdleClose: Hellos arriving while the database closes
// and reopens, again and again (IdleClose of 1 ms), are each served by an
// open database: every session is welcomed, catches up and has its push
// acknowledged.
func TestHelloRacingIdleClose(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.IdleClose = time.Millisecond })
	conn := dial(t, addr, srv.Fingerprint())
	done := make(chan error, 4)
	for g := range 4 {
		go func() {
			// openClient and acked end the goroutine with t.Fatal on a
			// failure: it still reports, through the deferred send.
			err := fmt.Errorf("goroutine %d: a session failed (see the log)", g)
			defer func() { done <- err }()
			err = func() error {
				for i := range 15 {
					c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: fmt.Sprintf("g%d-%d", g, i), Credential: "s3cret"})
					if _, ok := m.(*protocol.Welcome); !ok {
						return fmt.Errorf("session %d of %d: %v", i, g, m)
					}
					c.push(1)
					c.acked(1)
					c.stream.Close()
					time.Sleep(time.Duration(i%3) * time.Millisecond)
				}
				return nil
			}()
		}()
	}
	bounded(t, "60 sessions across idle closes", func() {
		for range 4 {
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	})
}

func stateOf(tn *tenant) tstate {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	return tn.life.state
}

// TestRestartManyDatabases: a restart registers every database without
// opening one, each opens on its Hello with what it had, and the server
// closes cleanly with some open and some not.
func TestRestartManyDatabases(t *testing.T) {
	dir := t.TempDir()
	tune := func(c *Config) { c.CredentialHashIterations = 1; c.MaxOpenDatabases = 8 }
	srv, addr := testServer(t, dir, tune)
	ctx := context.Background()
	const n = 200
	for i := range n {
		if err := srv.AddDatabase(ctx, fmt.Sprintf("t%03d", i), fmt.Sprintf("pw%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	conn := dial(t, addr, srv.Fingerprint())
	for i := 0; i < n; i += 20 {
		c, m := openClient(t, conn, protocol.Hello{Database: fmt.Sprintf("t%03d", i), ClientID: "a", Credential: fmt.Sprintf("pw%d", i)})
		welcome(t, m)
		c.push(1, 2, 3)
		c.acked(3)
		c.stream.Close()
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	srv, addr = testServer(t, dir, tune)
	if hosted, open := srv.DatabaseCounts(); hosted != n+1 || open != 0 {
		t.Fatalf("after restart: hosted %d, open %d; want %d, 0", hosted, open, n+1)
	}
	conn = dial(t, addr, srv.Fingerprint())
	for i := 0; i < n; i += 10 {
		c, m := openClient(t, conn, protocol.Hello{Database: fmt.Sprintf("t%03d", i), ClientID: "a", Credential: fmt.Sprintf("pw%d", i)})
		w := welcome(t, m)
		want := uint64(0)
		if i%20 == 0 {
			want = 3
		}
		if w.LastMutationID != want {
			t.Fatalf("t%03d: last mutation %d, want %d", i, w.LastMutationID, want)
		}
		c.stream.Close()
	}
	if _, open := srv.DatabaseCounts(); open > 8 {
		t.Fatalf("%d open, bound 8", open)
	}
}
