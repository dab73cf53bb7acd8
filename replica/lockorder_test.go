package replica

import (
	"context"
	"errors"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/wal"
)

// bounded runs fn and fails the test with a goroutine dump if it has not
// returned within d: a deadlock fails, it never hangs the run.
func bounded(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Fatalf("%s: still blocked after %s (deadlock?)\n%s", what, d, buf)
	}
}

// lockOrderSetup gives a replica caught up with an authority, and a server
// version (applying mutations of a second client) for it to rebase on.
func lockOrderSetup(t *testing.T, opts Options) (*Replica, *wal.PageSet) {
	t.Helper()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	opts.Mutators = reg
	r, err := Open(context.Background(), filepath.Join(t.TempDir(), "r.db"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	catchUp(t, a, r)
	other := openReplica(t, filepath.Join(t.TempDir(), "other.db"), reg)
	catchUp(t, a, other)
	ctx := context.Background()
	for _, name := range []string{"Food", "Rent", "Fun"} {
		if _, err := other.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(name, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Mine", 1)); err != nil {
		t.Fatal(err)
	}
	// First the other client's, so that r rebases on a version of the
	// server whose rows the test reads.
	catchUp(t, a, other)
	ps := push(t, a, other)
	if err := r.Rebase(ctx, ps); err != nil {
		t.Fatal(err)
	}
	// Now one more server version for the test's rebase: r's own mutation.
	return r, push(t, a, r)
}

// waitClosing waits until a rebase waits at the gate.
func waitClosing(t *testing.T, r *Replica) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.gate.mu.Lock()
		c := r.gate.closing
		r.gate.mu.Unlock()
		if c {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the rebase never came to the gate")
		}
		time.Sleep(time.Millisecond)
	}
}

// for rows.Next() { r.Mutate(...) } while a rebase waits for that very
// reader: Mutate must not wait for the writer lock the rebase holds (on the
// old main it did, and neither could go on).
func TestRowsLoopMutateWhileRebaseWaits(t *testing.T) {
	r, ps := lockOrderSetup(t, Options{})
	ctx := context.Background()
	bounded(t, 20*time.Second, "rows loop with Mutate", func() {
		rows, err := r.DB().QueryContext(ctx, "SELECT name FROM Categories ORDER BY name")
		if err != nil {
			t.Error(err)
			return
		}
		rebased := make(chan error, 1)
		go func() { rebased <- r.Rebase(ctx, ps) }()
		waitClosing(t, r)
		n := 0
		for rows.Next() {
			var name string
			if err := rows.Scan(&name); err != nil {
				t.Error(err)
			}
			if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Seen", 1)); err != nil {
				t.Error(err)
			}
			_ = r.Status()
			_ = r.Pending()
			n++
		}
		if err := rows.Close(); err != nil {
			t.Error(err)
		}
		if n < 3 {
			t.Errorf("read %d rows, want at least 3", n)
		}
		if err := <-rebased; err != nil {
			t.Errorf("rebase: %v", err)
		}
	})
	if got := categories(t, r.DB()); got["Seen"] < 3 {
		t.Fatalf("the Mutates made in the loop are not visible after the rebase: %v", got)
	}
}

// Mutate, Status, Pending and Handle inside an open read transaction, with a
// rebase waiting for it, all return.
func TestAppCallsInsideReadTxWithRebasePending(t *testing.T) {
	r, ps := lockOrderSetup(t, Options{})
	ctx := context.Background()
	bounded(t, 20*time.Second, "app calls inside a read transaction", func() {
		tx, err := r.DB().BeginTx(ctx, nil)
		if err != nil {
			t.Error(err)
			return
		}
		var n int
		if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM Categories").Scan(&n); err != nil {
			t.Error(err)
		}
		rebased := make(chan error, 1)
		go func() { rebased <- r.Rebase(ctx, ps) }()
		waitClosing(t, r)
		h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("InTx", 1))
		if err != nil {
			t.Error(err)
			return
		}
		if st := r.Status(); st.Pending < 1 {
			t.Errorf("status %+v", st)
		}
		if len(r.Pending()) < 1 {
			t.Error("no pending mutations")
		}
		if r.Handle(h.ID) != h {
			t.Error("Handle does not find the mutation")
		}
		// The transaction still sees its snapshot.
		var m int
		if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM Categories").Scan(&m); err != nil || m != n {
			t.Errorf("read tx saw %d then %d rows (%v)", n, m, err)
		}
		if err := tx.Commit(); err != nil {
			t.Error(err)
		}
		if err := <-rebased; err != nil {
			t.Errorf("rebase: %v", err)
		}
	})
}

// A transaction begun with Exec (not BeginTx) on a *sql.Conn holds the
// gate: a rebase gives up after ReaderWait with ErrReadersBusy naming the
// connection, instead of spinning on the WAL locks; the app's ROLLBACK
// works, the next rebase goes through, and Close returns.
func TestExecBeginHoldsGateAndRebaseGivesUp(t *testing.T) {
	for _, begin := range []string{"BEGIN", "SAVEPOINT x", "BEGIN; SELECT 1"} {
		t.Run(begin, func(t *testing.T) {
			r, ps := lockOrderSetup(t, Options{ReaderWait: 300 * time.Millisecond})
			ctx := context.Background()
			bounded(t, 20*time.Second, "Exec(BEGIN) then rebase", func() {
				conn, err := r.DB().Conn(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := conn.ExecContext(ctx, begin); err != nil {
					t.Error(err)
					return
				}
				var n int
				if err := conn.QueryRowContext(ctx, "SELECT count(*) FROM Categories").Scan(&n); err != nil {
					t.Error(err)
				}
				err = r.Rebase(ctx, ps)
				if !errors.Is(err, ErrReadersBusy) {
					t.Errorf("rebase with a transaction open: %v, want ErrReadersBusy", err)
				} else if !strings.Contains(err.Error(), "DB() connection #") || !strings.Contains(err.Error(), "in a transaction") {
					t.Errorf("error does not name the connection: %v", err)
				}
				// Nothing changed: still readable, Mutate works.
				if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("During", 1)); err != nil {
					t.Error(err)
				}
				end := "ROLLBACK"
				if strings.HasPrefix(begin, "SAVEPOINT") {
					end = "RELEASE x"
				}
				if _, err := conn.ExecContext(ctx, end); err != nil {
					t.Errorf("%s: %v", end, err)
				}
				if err := r.Rebase(ctx, ps); err != nil {
					t.Errorf("rebase after %s: %v", end, err)
				}
				if err := conn.Close(); err != nil {
					t.Error(err)
				}
				if err := r.Close(); err != nil {
					t.Errorf("close: %v", err)
				}
			})
		})
	}
}

// db.Exec("BEGIN") on the pool leaves no connection in a transaction behind
// it: the pool drops the connection (IsValid), so rebases are not held out.
func TestPoolExecBeginDoesNotHoldGate(t *testing.T) {
	r, ps := lockOrderSetup(t, Options{ReaderWait: 300 * time.Millisecond})
	ctx := context.Background()
	bounded(t, 20*time.Second, "pool Exec(BEGIN) then rebase", func() {
		if _, err := r.DB().ExecContext(ctx, "BEGIN"); err != nil {
			t.Error(err)
		}
		if err := r.Rebase(ctx, ps); err != nil {
			t.Errorf("rebase: %v", err)
		}
	})
	if n := r.gate.readers(); n != 0 {
		t.Fatalf("%d readers still hold the gate", n)
	}
}

// Mutate's wait for the writer lock honours its context.
func TestMutateHonoursContextWaitingForWriter(t *testing.T) {
	r, _ := lockOrderSetup(t, Options{})
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	bounded(t, 20*time.Second, "Mutate with a cancelled context", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		_, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("X", 1))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Mutate: %v, want context.DeadlineExceeded", err)
		}
	})
}

// Status does not wait for the writer lock (a Mutate or rebase in progress).
func TestStatusDoesNotWaitForWriter(t *testing.T) {
	r, _ := lockOrderSetup(t, Options{})
	want := r.Status()
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	bounded(t, 20*time.Second, "Status while the writer is held", func() {
		if got := r.Status(); got.Version != want.Version || got.Pending != want.Pending {
			t.Errorf("status %+v, want %+v", got, want)
		}
		_ = r.Handle(1)
		_ = r.Pending()
	})
}

// A settle whose queue write fails changes nothing in memory: the handles
// stay pending, the acknowledged id stays, the queue keeps the mutations (on
// the old main the handles were settled and r.lmid advanced first).
func TestSettleQueueWriteFailureChangesNothing(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	ps := push(t, a, r)
	injected := errors.New("injected queue write failure")
	r.queue.failWrite = func(string) error { return injected }
	err = r.Rebase(ctx, ps)
	if !errors.Is(err, injected) {
		t.Fatalf("rebase: %v, want the injected failure", err)
	}
	select {
	case <-h.Done():
		t.Fatal("handle settled although the queue did not record it")
	default:
	}
	if r.lmid != 0 {
		t.Fatalf("acknowledged id advanced to %d", r.lmid)
	}
	if r.queue.Len() != 1 || r.queue.settled() != 0 || r.Handle(h.ID) != h {
		t.Fatalf("queue %d pending, base %d; handle %v", r.queue.Len(), r.queue.settled(), r.Handle(h.ID))
	}
}

// After a settle whose queue write failed, the rebase still replays the
// mutations the server has not acknowledged, and not those it has: DB()
// shows the server's state plus the rest, each once.
func TestSettleFailureStillReplaysTheRest(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatal(err)
	}
	ps := push(t, a, r)
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Rent", 1)); err != nil {
		t.Fatal(err)
	}
	r.queue.failWrite = func(string) error { return errors.New("injected") }
	if err := r.Rebase(ctx, ps); err == nil {
		t.Fatal("rebase hid the queue failure")
	}
	if got := categories(t, r.DB()); got["Food"] != 1 || got["Rent"] != 1 {
		t.Fatalf("after a failed settle DB() shows %v, want Food 1 (server) and Rent 1 (pending)", got)
	}
}
