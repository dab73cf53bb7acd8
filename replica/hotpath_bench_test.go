package replica

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/wal"
)

// The hot paths of a rebase, each timed alone so that benchstat shows which
// one regressed: the drop, the apply of a server version's pages, and the
// replay of the pending mutations. The whole rebase is BenchmarkRebase, the
// local write BenchmarkMutate (bench_test.go); the page-set codec is in
// package wal.

// BenchmarkDropAfterGC is BenchmarkDrop with the garbage collector run
// before every timed drop, at three depths: the set-up replay of N
// mutations leaves garbage in proportion to N, and without the collection
// a drop at N = 10,000 pays for it (the drop itself makes the same system
// calls at every N).
func BenchmarkDropAfterGC(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("pending=%d", n), func(b *testing.B) {
			reg := testRegistry(b)
			a := newAuthority(b, reg)
			r := openReplica(b, filepath.Join(b.TempDir(), "replica.db"), reg)
			catchUpWith(b, a, r)
			queueLocal(b, r, n)
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				r.writeMu.Lock()
				if err := r.replay(ctx); err != nil {
					b.Fatal(err)
				}
				r.writeMu.Unlock()
				runtime.GC()
				b.StartTimer()
				if err := r.files.Rebase(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkApply times the drop and the apply of one server version that
// changed about P pages (vfs.Replica.Rebase with one page set: check,
// journal, page writes, wal-index reset), with nothing pending. A filler
// table holds one 3000-byte row per page, and each version rewrites the
// blobs of the first P rows.
func BenchmarkApply(b *testing.B) {
	ctx := context.Background()
	for _, p := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("pages=%d", p), func(b *testing.B) {
			reg := testRegistry(b)
			a := newAuthority(b, reg)
			if _, err := a.Exec(ctx, func(tx mutators.Tx) error {
				_, err := tx.Exec(`CREATE TABLE filler (id INTEGER PRIMARY KEY, b BLOB);
					WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
					INSERT INTO filler(b) SELECT randomblob(3000) FROM n`)
				return err
			}); err != nil {
				b.Fatal(err)
			}
			r := openReplica(b, filepath.Join(b.TempDir(), "replica.db"), reg)
			catchUpWith(b, a, r)
			var pages int
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				ps, err := a.Exec(ctx, func(tx mutators.Tx) error {
					_, err := tx.Exec(`UPDATE filler SET b = randomblob(3000) WHERE id <= ?`, p)
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
				pages += len(ps.Pages)
				b.StartTimer()
				if err := r.files.Rebase(ctx, ps); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(pages)/float64(b.N), "pages/op")
		})
	}
}

// BenchmarkCheck times the validation of page sets against the replica
// (version chain, pre and post checksums, merge) that every rebase does
// before it drops anything: 10 versions of 10 pages each.
func BenchmarkCheck(b *testing.B) {
	ctx := context.Background()
	reg := testRegistry(b)
	a := newAuthority(b, reg)
	if _, err := a.Exec(ctx, func(tx mutators.Tx) error {
		_, err := tx.Exec(`CREATE TABLE filler (id INTEGER PRIMARY KEY, b BLOB);
			WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
			INSERT INTO filler(b) SELECT randomblob(3000) FROM n`)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	r := openReplica(b, filepath.Join(b.TempDir(), "replica.db"), reg)
	catchUpWith(b, a, r)
	var sets []*wal.PageSet
	for v := range 10 {
		ps, err := a.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`UPDATE filler SET b = randomblob(3000) WHERE id > ? AND id <= ?`, v*10, v*10+10)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		sets = append(sets, ps)
	}
	b.ResetTimer()
	for range b.N {
		if _, err := r.files.Check(sets...); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplay times the replay alone: N pending demo mutations run
// again in one write transaction, a savepoint each, on a freshly dropped
// WAL (the drop is untimed).
func BenchmarkReplay(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("pending=%d", n), func(b *testing.B) {
			reg := testRegistry(b)
			a := newAuthority(b, reg)
			r := openReplica(b, filepath.Join(b.TempDir(), "replica.db"), reg)
			catchUpWith(b, a, r)
			queueLocal(b, r, n)
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				if err := r.files.Rebase(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				r.writeMu.Lock()
				err := r.replay(ctx)
				r.writeMu.Unlock()
				if err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if got := r.queue.Len(); got != n {
				b.Fatalf("%d pending, want %d", got, n)
			}
		})
	}
}
