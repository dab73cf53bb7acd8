package replica

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// rebaseEvery is how many Mutate calls BenchmarkMutate lets pile up before it
// pushes them and rebases, with the timer stopped. Pending work must be
// bounded or the benchmark would measure an ever larger WAL; 1000 is well
// above what a connected client accumulates between two versions, so the
// WAL a Mutate appends to is, if anything, larger than in real use. The
// rebase itself is measured by BenchmarkRebase, not here.
const rebaseEvery = 1000

// BenchmarkMutate compares one optimistic mutation on a replica (queue append
// plus the mutator in its own write transaction) with the same upsert as one
// autocommit statement on a plain go-sqlite3 database in WAL mode with
// synchronous=NORMAL, the replica's default durability. Both increment an
// existing row.
func BenchmarkMutate(b *testing.B) {
	ctx := context.Background()
	b.Run("demo", func(b *testing.B) {
		reg := testRegistry(b)
		a := newAuthority(b, reg)
		r := openReplica(b, filepath.Join(b.TempDir(), "replica.db"), reg)
		args := mutators.CategoryArgs("bench", 1)
		mutate(b, r, args)
		catchUpWith(b, a, r)
		b.ResetTimer()
		for i := range b.N {
			if i > 0 && i%rebaseEvery == 0 {
				b.StopTimer()
				catchUpWith(b, a, r)
				b.StartTimer()
			}
			mutate(b, r, args)
		}
	})
	b.Run("plain-autocommit", func(b *testing.B) {
		db, err := driver.Open("file:"+filepath.Join(b.TempDir(), "plain.db"), nil)
		if err != nil {
			b.Fatal(err)
		}
		defer db.Close()
		db.SetMaxOpenConns(1)
		conn, err := db.Conn(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		for _, q := range []string{"PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", mutators.DemoSchema} {
			if _, err := conn.ExecContext(ctx, q); err != nil {
				b.Fatalf("%s: %v", q, err)
			}
		}
		// The demo mutator's statement, with its arguments bound the same
		// way (database/sql on one *sql.Conn, no prepared-statement cache).
		const upsert = `INSERT INTO Categories(name, count) VALUES (?, ?)
		ON CONFLICT(name) DO UPDATE SET count = count + excluded.count`
		if _, err := conn.ExecContext(ctx, upsert, "bench", 1); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for range b.N {
			if _, err := conn.ExecContext(ctx, upsert, "bench", 1); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkDrop times the drop alone (vfs.Replica.Rebase with no page sets:
// every wal-index lock, a fresh wal-index header, a truncate only for a huge
// WAL) with N pending mutations in the WAL. The design says it is O(1) in N.
// Each iteration rebuilds the N pending frames with the timer stopped, by
// replaying the queue in one transaction as a rebase does. The wal-bytes
// metric is the size of -wal before the drop.
func BenchmarkDrop(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 10000} {
		b.Run(fmt.Sprintf("pending=%d", n), func(b *testing.B) {
			reg := testRegistry(b)
			a := newAuthority(b, reg)
			path := filepath.Join(b.TempDir(), "replica.db")
			r := openReplica(b, path, reg)
			catchUpWith(b, a, r)
			queueLocal(b, r, n)
			var walBytes int64
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				r.writeMu.Lock()
				if err := r.replay(ctx); err != nil {
					b.Fatal(err)
				}
				r.writeMu.Unlock()
				st, err := os.Stat(path + "-wal")
				if err != nil {
					b.Fatal(err)
				}
				walBytes += st.Size()
				b.StartTimer()
				if err := r.files.Rebase(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(walBytes)/float64(b.N), "wal-bytes")
		})
	}
}

// BenchmarkRebase times r.Rebase with P pending local mutations (each on a
// row of its own) and one server version made by another client's demo
// mutation on another row: drop, write the version's pages, settle (nothing
// of ours is acknowledged) and replay the P mutations in one transaction.
// Each iteration needs the next version: with the timer stopped, the other
// client pushes one mutation to the authority. The replica's P mutations are
// never pushed, so they stay pending and every iteration starts from the
// same shape: version V, P pending, and the page set of V+1.
func BenchmarkRebase(b *testing.B) {
	ctx := context.Background()
	for _, p := range []int{0, 1, 10, 100, 1000} {
		b.Run(fmt.Sprintf("pending=%d/server=1", p), func(b *testing.B) {
			reg := testRegistry(b)
			a := newAuthority(b, reg)
			r := openReplica(b, filepath.Join(b.TempDir(), "replica.db"), reg)
			catchUpWith(b, a, r)
			queueLocal(b, r, p)
			args := mutators.CategoryArgs("server", 1)
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				ps, res, err := a.Push(ctx, []server.Mutation{{
					ClientID: "other", ID: uint64(i) + 1, Name: mutators.CreateCategoryOrIncrementIfExists, Args: args,
				}})
				if err != nil || ps == nil || res[0].Outcome != server.Applied {
					b.Fatalf("push from the other client: %v %+v", err, res)
				}
				b.StartTimer()
				if err := r.Rebase(ctx, ps); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if got := r.queue.Len(); got != p {
				b.Fatalf("%d pending after the rebases, want %d", got, p)
			}
		})
	}
}

// mutate runs the demo mutator on r and fails on any error, the mutator's
// own included.
func mutate(b *testing.B, r *Replica, args []byte) {
	h, err := r.Mutate(context.Background(), mutators.CreateCategoryOrIncrementIfExists, args)
	if err != nil {
		b.Fatal(err)
	}
	if err := h.LocalErr(); err != nil {
		b.Fatal(err)
	}
}

// catchUpWith pushes r's pending mutations (if any) and rebases r onto
// everything the authority has.
func catchUpWith(b *testing.B, a *server.Authority, r *Replica) {
	b.Helper()
	if r.queue.Len() > 0 {
		push(b, a, r)
	}
	catchUp(b, a, r)
	if n := r.queue.Len(); n != 0 {
		b.Fatalf("%d mutations still pending after catching up", n)
	}
}

// queueLocal makes n demo mutations pending on r, each on a row of its own
// ("local-<i>"). They go into the queue directly and are then replayed in
// one transaction, which is the state n Mutate calls followed by a rebase
// leave, at a fraction of the set-up time (n commits for n = 10000 would
// dominate the benchmark's wall time).
func queueLocal(b *testing.B, r *Replica, n int) {
	b.Helper()
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	for i := range n {
		m := queuedMutation{ID: r.queue.NextID(), Name: mutators.CreateCategoryOrIncrementIfExists,
			Args: mutators.CategoryArgs(fmt.Sprintf("local-%d", i), 1)}
		if err := r.queue.Append(m); err != nil {
			b.Fatal(err)
		}
	}
	if err := r.files.Rebase(context.Background()); err != nil {
		b.Fatal(err)
	}
	if err := r.replay(context.Background()); err != nil {
		b.Fatal(err)
	}
	for _, m := range pendingOf(b, r.queue) {
		if err := r.Handle(m.ID).LocalErr(); err != nil {
			b.Fatalf("local mutation %d: %v", m.ID, err)
		}
	}
}
