package vfs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// faultFixture is a server with a few versions and the replica-side steps
// of one rebase over pending frames: open a replica (with a fault hook) at
// an older version, give it pending frames through SQLite, then apply the
// rest.
type faultFixture struct {
	a      *server.Authority
	base   uint64 // the version the replica is brought to before the fault
	expect []byte // the server's file at its latest version
}

func newFaultFixture(t *testing.T) *faultFixture {
	a := newAuthority(t)
	serverExec(t, a, "INSERT INTO other SELECT randomblob(900) FROM generate_series(1, 40)")
	base := a.Version()
	serverExec(t, a, "INSERT INTO Categories(name, count) VALUES ('x', 1)",
		"INSERT INTO other SELECT randomblob(900) FROM generate_series(1, 30)")
	serverExec(t, a, "DELETE FROM other WHERE rowid % 2 = 0") // shrinks nothing but rewrites pages
	return &faultFixture{a: a, base: base, expect: snapshotBytes(t, a)}
}

// replica opens a replica at the fixture's base version with pending frames
// in its WAL and a connection that can read it.
func (fx *faultFixture) replica(t *testing.T, d vfs.Durability, f *vfs.Faults) (*vfs.Replica, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "replica.db")
	r, err := vfs.OpenReplicaWith(path, vfs.ReplicaOptions{Durability: d, Faults: f})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if err := r.Rebase(context.Background(), since(t, fx.a, 0)[:fx.base]...); err != nil {
		t.Fatal(err)
	}
	return r, path
}

// queryBounded runs a read on a fresh connection and returns its error, or
// fails the test if it does not return within 20 s.
func queryBounded(t *testing.T, path string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		db := openDB(t, path)
		defer db.Close()
		db.SetMaxOpenConns(1)
		if _, err := db.Exec("PRAGMA busy_timeout=0"); err != nil {
			done <- fmt.Errorf("busy_timeout: %w", err)
			return
		}
		var n int
		done <- db.QueryRow("SELECT count(*) FROM sqlite_schema").Scan(&n)
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("a read on a poisoned replica did not return within 20 s")
		return nil
	}
}

// TestFaultAtEveryPointOfRebase fails each write, sync and truncate of a
// rebase (over pending frames) in turn, plain I/O errors and a full disk,
// under both durabilities. Whatever fails: either nothing was touched (the
// journal write failed: a plain error, the replica stays at its version) or
// the replica is poisoned, refuses all work, and keeps SQLite's readers
// out; once the fault clears, Repair brings the file to the journaled
// version, byte for byte the server's.
func TestFaultAtEveryPointOfRebase(t *testing.T) {
	ctx := context.Background()
	fx := newFaultFixture(t)
	for _, d := range []vfs.Durability{vfs.Normal, vfs.Full} {
		for _, full := range []bool{false, true} {
			for _, op := range []vfs.Op{vfs.OpWrite, vfs.OpSync, vfs.OpTruncate} {
				if full && op != vfs.OpWrite {
					continue
				}
				name := fmt.Sprintf("%s/%s/full=%v", d, op, full)
				// Learn how many operations of this kind the rebase makes.
				f := vfs.NewFaults(1)
				r, path := fx.replica(t, d, f)
				pend(t, path)
				f.Count(op)
				if err := r.Rebase(ctx, since(t, fx.a, fx.base)...); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				n := f.Seen()
				t.Logf("%s: %d points", name, n)
				if n == 0 && (op == vfs.OpWrite || d == vfs.Full) {
					t.Fatalf("%s: the rebase made no %s call", name, op)
				}
				for i := 1; i <= n; i++ {
					faultOnce(t, fx, d, op, full, i, fmt.Sprintf("%s/at=%d", name, i))
				}
			}
		}
	}
}

// pend writes pending frames into the replica's WAL through SQLite.
func pend(t *testing.T, path string) {
	t.Helper()
	db := openDB(t, path)
	mustExec(t, db, "PRAGMA wal_autocheckpoint=0", "CREATE TABLE IF NOT EXISTS pend(x)",
		"INSERT INTO pend SELECT randomblob(700) FROM generate_series(1, 20)")
	db.Close()
}

func faultOnce(t *testing.T, fx *faultFixture, d vfs.Durability, op vfs.Op, full bool, at int, name string) {
	ctx := context.Background()
	f := vfs.NewFaults(uint64(at))
	r, path := fx.replica(t, d, f)
	pend(t, path)
	f.FailAt(at, op, full)
	err := r.Rebase(ctx, since(t, fx.a, fx.base)...)
	if err == nil {
		t.Fatalf("%s: the rebase succeeded despite the fault", name)
	}
	if full && (!vfs.IsDiskFull(err) || !errors.Is(err, vfs.ErrDiskFull) || !errors.Is(err, syscall.ENOSPC) ||
		!strings.Contains(err.Error(), "no space left on device")) {
		t.Fatalf("%s: a full disk is not said as such: %v", name, err)
	}
	if !errors.Is(err, vfs.ErrPoisoned) {
		// Only a failed journal write may leave the replica sound, and
		// then nothing changed.
		if !strings.Contains(err.Error(), "journal") || r.Version() != fx.base || r.Poisoned() != nil {
			t.Fatalf("%s: not poisoned, yet: %v (version %d)", name, err, r.Version())
		}
		f.Clear()
		if err := r.Rebase(ctx, since(t, fx.a, fx.base)...); err != nil {
			t.Fatalf("%s: retry after a journal failure: %v", name, err)
		}
	} else {
		if r.Poisoned() == nil {
			t.Fatalf("%s: poisoned error but Poisoned() is nil", name)
		}
		if err := r.Rebase(ctx); !errors.Is(err, vfs.ErrPoisoned) {
			t.Fatalf("%s: a rebase on a poisoned replica: %v", name, err)
		}
		if _, err := r.ReadPage(1); !errors.Is(err, vfs.ErrPoisoned) {
			t.Fatalf("%s: ReadPage on a poisoned replica: %v", name, err)
		}
		if err := queryBounded(t, path); err == nil || strings.Contains(err.Error(), "busy_timeout") {
			t.Fatalf("%s: SQLite read a poisoned replica (%v)", name, err)
		} else if at == 1 {
			t.Logf("%s: a read on the poisoned replica: %v", name, err)
		}
		if full {
			// The disk is still full: the repair fails and stays poisoned.
			if err := r.Repair(ctx); !errors.Is(err, vfs.ErrPoisoned) || !vfs.IsDiskFull(err) {
				t.Fatalf("%s: repair on a full disk: %v", name, err)
			}
		}
		f.Clear()
		if err := r.Repair(ctx); err != nil {
			t.Fatalf("%s: repair: %v", name, err)
		}
	}
	if r.Version() != fx.a.Version() || r.Checksum() != fx.a.Checksum() || r.Poisoned() != nil {
		t.Fatalf("%s: replica at %d/%016x, server at %d/%016x", name, r.Version(), r.Checksum(), fx.a.Version(), fx.a.Checksum())
	}
	main, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(main, fx.expect) {
		t.Fatalf("%s: the repaired main file differs from the server's", name)
	}
	db := openDB(t, path)
	integrityOK(t, db)
	var n int
	if err := db.QueryRow("SELECT count(*) FROM other").Scan(&n); err != nil || n != 35 {
		t.Fatalf("%s: after repair other has %d rows (%v), want 35: pending frames must be gone", name, n, err)
	}
	if err := db.QueryRow("SELECT count(*) FROM sqlite_schema WHERE name = 'pend'").Scan(&n); err != nil || n != 0 {
		t.Fatalf("%s: after repair the pending table is still there (%d, %v)", name, n, err)
	}
	db.Close()
	// The repaired replica goes on: new pending frames, another drop.
	pend(t, path)
	if err := r.Rebase(ctx); err != nil {
		t.Fatalf("%s: rebase after repair: %v", name, err)
	}
	r.Close()
}

// TestFaultAtEveryPointOfInstall fails each write, sync and truncate of a
// snapshot install in turn; Repair copies the image again.
func TestFaultAtEveryPointOfInstall(t *testing.T) {
	ctx := context.Background()
	a := newAuthority(t)
	serverExec(t, a, "INSERT INTO other SELECT randomblob(1000) FROM generate_series(1, 600)") // over one chunk of pages
	snap, err := a.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []vfs.Durability{vfs.Normal, vfs.Full} {
		for _, tc := range []struct {
			op   vfs.Op
			full bool
		}{{vfs.OpWrite, false}, {vfs.OpWrite, true}, {vfs.OpSync, false}, {vfs.OpTruncate, false}} {
			count := -1
			for at := 1; count < 0 || at <= count; at++ {
				name := fmt.Sprintf("%s/%s/full=%v/at=%d", d, tc.op, tc.full, at)
				img, raw := image(t, snap)
				f := vfs.NewFaults(uint64(at))
				path := filepath.Join(t.TempDir(), "replica.db")
				r, err := vfs.OpenReplicaWith(path, vfs.ReplicaOptions{Durability: d, Faults: f})
				if err != nil {
					t.Fatal(err)
				}
				pend(t, path)
				if count < 0 {
					f.Count(tc.op)
					if err := r.InstallSnapshot(ctx, img); err != nil {
						t.Fatal(err)
					}
					count = f.Seen()
					r.Close()
					at = 0
					continue
				}
				f.FailAt(at, tc.op, tc.full)
				err = r.InstallSnapshot(ctx, img)
				switch {
				case err == nil:
					t.Fatalf("%s: the install succeeded despite the fault", name)
				case tc.full && !strings.Contains(err.Error(), "no space left on device"):
					t.Fatalf("%s: %v", name, err)
				case errors.Is(err, vfs.ErrPoisoned):
					if err := queryBounded(t, path); err == nil {
						t.Fatalf("%s: SQLite read a poisoned replica", name)
					}
					f.Clear()
					if err := r.Repair(ctx); err != nil {
						t.Fatalf("%s: repair: %v", name, err)
					}
				default:
					f.Clear()
					if err := r.InstallSnapshot(ctx, img); err != nil {
						t.Fatalf("%s: retry: %v", name, err)
					}
				}
				main, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				if r.Version() != a.Version() || r.Checksum() != a.Checksum() || !bytes.Equal(main, raw) {
					t.Fatalf("%s: after repair the replica is not the snapshot", name)
				}
				r.Close()
			}
		}
	}
}

// TestFaultsRandomDeterministic: the same seed fails the same points.
func TestFaultsRandomDeterministic(t *testing.T) {
	run := func(seed uint64) []int {
		f := vfs.NewFaults(seed)
		var failed []int
		for i := 0; i < 40; i++ {
			f.FailRandom(0.3, vfs.OpAll, false)
			r, err := vfs.OpenReplicaWith(filepath.Join(t.TempDir(), "r.db"), vfs.ReplicaOptions{Faults: f})
			if err != nil {
				if !errors.Is(err, vfs.ErrInjected) {
					t.Fatalf("open %d: %v", i, err)
				}
				failed = append(failed, i)
				continue
			}
			r.Close()
		}
		return failed
	}
	a, b := run(7), run(7)
	if fmt.Sprint(a) != fmt.Sprint(b) || len(a) == 0 || len(a) == 40 {
		t.Fatalf("seed 7 failed opens %v, then %v", a, b)
	}
}

// TestFaultVFSDiskFull: the fault VFS fails SQLite's own writes with
// SQLITE_FULL, which IsDiskFull recognises and WrapDiskFull says as "no
// space left on device"; once cleared, SQLite writes again.
func TestFaultVFSDiskFull(t *testing.T) {
	f := vfs.NewFaults(3)
	if err := vfs.RegisterFaultVFS("sqlrebase-test-faults", "", f); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "plain.db")
	db, err := driver.Open("file:"+path+"?vfs=sqlrebase-test-faults", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	mustExec(t, db, "PRAGMA journal_mode=WAL", "CREATE TABLE t(x)")
	f.DiskFull()
	_, err = db.Exec("INSERT INTO t SELECT randomblob(5000) FROM generate_series(1, 50)")
	if err == nil {
		t.Fatal("an insert on a full disk succeeded")
	}
	if !vfs.IsDiskFull(err) {
		t.Fatalf("not recognised as a full disk: %v", err)
	}
	if w := vfs.WrapDiskFull(err); !errors.Is(w, vfs.ErrDiskFull) || !strings.Contains(w.Error(), "no space left on device") {
		t.Fatalf("wrapped: %v", w)
	}
	if f.Fired() == 0 {
		t.Fatal("the hook fired no fault")
	}
	f.Clear()
	mustExec(t, db, "INSERT INTO t SELECT randomblob(5000) FROM generate_series(1, 50)")
	var n int
	if err := db.QueryRow("SELECT count(*) FROM t").Scan(&n); err != nil || n != 50 {
		t.Fatalf("after the disk has space: %d rows, %v", n, err)
	}
	if vfs.IsDiskFull(errors.New("other")) || vfs.WrapDiskFull(nil) != nil {
		t.Fatal("IsDiskFull or WrapDiskFull misclassifies")
	}
}
