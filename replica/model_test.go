package replica

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	sqlitedriver "github.com/ncruces/go-sqlite3/driver"
	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// modelWorld is the model test's world: one authority, several replicas, and
// the server's database image at every version, from which the reference
// state of a replica is rebuilt on plain SQLite.
type modelWorld struct {
	t        *rapid.T
	dir      string
	reg      *mutators.Registry
	a        *server.Authority
	replicas []*Replica
	paths    []string
	images   map[uint64][]byte // server database at each version
	sums     map[uint64]uint64 // server checksum at each version
}

func (w *modelWorld) record(sets []*wal.PageSet) {
	for _, ps := range sets {
		if _, ok := w.images[ps.Version]; ok {
			continue
		}
		prev := w.images[ps.Version-1]
		img := make([]byte, int(ps.DBSize)*int(ps.PageSize))
		copy(img, prev)
		for _, p := range ps.Pages {
			copy(img[int(p.Pgno-1)*int(ps.PageSize):], p.Data)
		}
		w.images[ps.Version] = img
		w.sums[ps.Version] = ps.PostChecksum
	}
}

func dump(ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) (string, error) {
	rows, err := q.QueryContext(ctx, "SELECT name, count FROM Categories ORDER BY name")
	if err != nil {
		if strings.Contains(err.Error(), "no such table") {
			return "", nil
		}
		return "", err
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var n string
		var c int64
		if err := rows.Scan(&n, &c); err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "%s|%d\n", n, c)
	}
	return b.String(), rows.Err()
}

// reference rebuilds what replica i must show: the server's database at its
// version with its pending mutations replayed, on plain SQLite.
func (w *modelWorld) reference(i int) string {
	ctx := context.Background()
	r := w.replicas[i]
	st := r.Status()
	img, ok := w.images[st.Version]
	if !ok {
		w.t.Fatalf("no image of version %d", st.Version)
	}
	path := filepath.Join(w.dir, fmt.Sprintf("ref-%d.db", i))
	os.Remove(path + "-wal")
	os.Remove(path + "-shm")
	if err := os.WriteFile(path, img, 0o644); err != nil {
		w.t.Fatal(err)
	}
	db, err := sqlitedriver.Open("file:" + path)
	if err != nil {
		w.t.Fatal(err)
	}
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		w.t.Fatal(err)
	}
	defer conn.Close()
	conn.ExecContext(ctx, "BEGIN")
	for _, m := range r.Pending() {
		conn.ExecContext(ctx, "SAVEPOINT m")
		if err := w.reg.Run(ctx, mutators.NewTx(ctx, conn), m.Name, m.Args); err != nil {
			conn.ExecContext(ctx, "ROLLBACK TO m")
		}
		conn.ExecContext(ctx, "RELEASE m")
	}
	out, err := dump(ctx, conn)
	if err != nil {
		w.t.Fatal(err)
	}
	conn.ExecContext(ctx, "COMMIT")
	return out
}

// check asserts the invariants of replica i after a rebase or reopen.
func (w *modelWorld) check(i int) {
	ctx := context.Background()
	r := w.replicas[i]
	st := r.Status()
	if want, ok := w.sums[st.Version]; !ok || st.Checksum != want {
		w.t.Fatalf("replica %d at version %d: checksum %016x, server had %016x", i, st.Version, st.Checksum, want)
	}
	got, err := dump(ctx, r.DB())
	if err != nil {
		w.t.Fatal(err)
	}
	if want := w.reference(i); got != want {
		w.t.Fatalf("replica %d at version %d with %d pending shows\n%s\nreference\n%s", i, st.Version, st.Pending, got, want)
	}
	var ok string
	if err := r.DB().QueryRowContext(ctx, "PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		w.t.Fatalf("replica %d integrity: %q %v", i, ok, err)
	}
}

// cliAgrees has the stock sqlite3 CLI read copies of a replica's files: the
// main file alone must be the server's database at the replica's version,
// and main plus WAL must show the optimistic state.
func (w *modelWorld) cliAgrees(i int) {
	cli, err := exec.LookPath("sqlite3")
	if err != nil {
		return
	}
	r := w.replicas[i]
	st := r.Status()
	copyFile := func(src, dst string) {
		b, err := os.ReadFile(src)
		if err != nil && !os.IsNotExist(err) {
			w.t.Fatal(err)
		}
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			w.t.Fatal(err)
		}
	}
	run := func(db string, sql string) string {
		out, err := exec.Command(cli, db, sql).CombinedOutput()
		if err != nil {
			w.t.Fatalf("sqlite3 %s: %v\n%s", db, err, out)
		}
		return string(out)
	}
	mainOnly := filepath.Join(w.dir, fmt.Sprintf("cli-main-%d.db", i))
	copyFile(w.paths[i], mainOnly)
	if b, _ := os.ReadFile(mainOnly); !bytes.Equal(b, w.images[st.Version]) {
		w.t.Fatalf("replica %d main file differs from the server's database at version %d", i, st.Version)
	}
	if out := run(mainOnly, "PRAGMA integrity_check"); strings.TrimSpace(out) != "ok" {
		w.t.Fatalf("sqlite3 CLI on replica %d main file: %s", i, out)
	}
	withWAL := filepath.Join(w.dir, fmt.Sprintf("cli-wal-%d.db", i))
	copyFile(w.paths[i], withWAL)
	copyFile(w.paths[i]+"-wal", withWAL+"-wal")
	os.Remove(withWAL + "-shm")
	var tables int
	r.DB().QueryRowContext(context.Background(), "SELECT count(*) FROM sqlite_schema WHERE name = 'Categories'").Scan(&tables)
	query := "PRAGMA integrity_check"
	if tables == 1 {
		query += "; SELECT name || '|' || count FROM Categories ORDER BY name"
	}
	out := run(withWAL, query)
	lines := strings.SplitN(out, "\n", 2)
	if lines[0] != "ok" {
		w.t.Fatalf("sqlite3 CLI on replica %d main+WAL: %s", i, out)
	}
	want, _ := dump(context.Background(), r.DB())
	if len(lines) < 2 || lines[1] != want {
		w.t.Fatalf("sqlite3 CLI sees the optimistic state of replica %d as\n%q\nthe replica shows\n%q", i, lines[1:], want)
	}
}

// TestModel: random local mutations on several replicas, server batches,
// rebases in random order, partial catch-ups and close/reopen. After every
// rebase the replica's main file has the server's checksum at its version,
// its visible content equals the reference, and integrity holds; at the end
// the stock sqlite3 CLI agrees on copies of the files.
func TestModel(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		dir, err := os.MkdirTemp("", "model")
		if err != nil {
			rt.Fatal(err)
		}
		defer os.RemoveAll(dir)
		reg := testRegistry(rt)
		a, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg, demoSetup)
		if err != nil {
			rt.Fatal(err)
		}
		defer a.Close()
		w := &modelWorld{t: rt, dir: dir, reg: reg, a: a,
			images: map[uint64][]byte{0: wal.EmptyDatabase(wal.DefaultPageSize)}, sums: map[uint64]uint64{}}
		w.sums[0] = wal.PageChecksum(1, w.images[0])
		all, err := a.Since(0)
		if err != nil {
			rt.Fatal(err)
		}
		w.record(all)
		n := rapid.IntRange(1, 3).Draw(rt, "replicas")
		for i := 0; i < n; i++ {
			p := filepath.Join(dir, fmt.Sprintf("r%d.db", i))
			r, err := Open(ctx, p, Options{Mutators: reg})
			if err != nil {
				rt.Fatal(err)
			}
			w.replicas = append(w.replicas, r)
			w.paths = append(w.paths, p)
		}
		defer func() {
			for _, r := range w.replicas {
				r.Close()
			}
		}()
		names := []string{"Food", "Rent", "Fun"}
		steps := rapid.IntRange(1, 30).Draw(rt, "steps")
		for s := 0; s < steps; s++ {
			i := rapid.IntRange(0, n-1).Draw(rt, "replica")
			r := w.replicas[i]
			switch rapid.IntRange(0, 9).Draw(rt, "action") {
			case 0, 1, 2, 3: // a local mutation
				if rapid.IntRange(0, 9).Draw(rt, "fails") == 0 {
					mustMutate(rt, r, "fail", []byte(`"nope"`))
				} else {
					name := rapid.SampledFrom(names).Draw(rt, "name")
					delta := int64(rapid.IntRange(-5, 5).Draw(rt, "delta"))
					mustMutate(rt, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(name, delta))
				}
			case 4, 5: // the server takes this replica's batch
				var batch []server.Mutation
				for _, m := range r.Pending() {
					batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
				}
				if len(batch) > 0 {
					k := rapid.IntRange(1, len(batch)).Draw(rt, "batch")
					ps, _, err := a.Push(ctx, batch[:k])
					if err != nil {
						rt.Fatal(err)
					}
					if ps != nil {
						w.record([]*wal.PageSet{ps})
					}
				}
			case 6, 7, 8: // rebase onto some or all of what the server has
				sets, err := a.Since(r.Status().Version)
				if err != nil {
					rt.Fatal(err)
				}
				k := rapid.IntRange(0, len(sets)).Draw(rt, "versions")
				if err := r.Rebase(ctx, sets[:k]...); err != nil {
					rt.Fatal(err)
				}
				w.check(i)
			case 9: // close and reopen
				if err := r.Close(); err != nil {
					rt.Fatal(err)
				}
				r2, err := Open(ctx, w.paths[i], Options{Mutators: reg})
				if err != nil {
					rt.Fatal(err)
				}
				w.replicas[i] = r2
				w.check(i)
			}
		}
		// Settle everything and converge.
		for i := range w.replicas {
			w.cliAgrees(i)
		}
		for round := 0; round < 2; round++ {
			for _, r := range w.replicas {
				var batch []server.Mutation
				for _, m := range r.Pending() {
					batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
				}
				if ps, _, err := a.Push(ctx, batch); err != nil {
					rt.Fatal(err)
				} else if ps != nil {
					w.record([]*wal.PageSet{ps})
				}
			}
			for i, r := range w.replicas {
				sets, _ := a.Since(r.Status().Version)
				if err := r.Rebase(ctx, sets...); err != nil {
					rt.Fatal(err)
				}
				w.check(i)
			}
		}
		want, _ := dump(ctx, serverDB{a})
		for i, r := range w.replicas {
			st := r.Status()
			got, _ := dump(ctx, r.DB())
			if st.Pending != 0 || st.Checksum != a.Checksum() || got != want {
				rt.Fatalf("replica %d did not converge: %+v, shows %q, server %q", i, st, got, want)
			}
		}
	})
}
