package replica

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
	"pgregory.net/rapid"
)

// TestWatchModel: random local mutations, server versions (from another
// replica) and rebases over three tables, with live queries on each table
// and on a join. After every step each live query's deliveries must reach
// the result of running its query now (no missed final state); no delivery
// equals the one before; and rows written by local mutations, which nothing
// removes, never vanish from a delivery (no state without a pending
// mutation, nothing torn).
func TestWatchModel(t *testing.T) {
	queries := []string{
		"SELECT id, v FROM a ORDER BY id",
		"SELECT id, v FROM b ORDER BY id",
		"SELECT id, v FROM c ORDER BY id",
		"SELECT a.id, a.v, b.v FROM a JOIN b USING (id) ORDER BY a.id",
	}
	tables := []string{"a", "b", "c"}
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		dir, err := os.MkdirTemp("", "watchmodel")
		if err != nil {
			rt.Fatal(err)
		}
		defer os.RemoveAll(dir)
		reg := testRegistry(rt)
		a, err := server.OpenAuthority(ctx, filepath.Join(dir, "server.db"), reg, func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(`CREATE TABLE a (id INTEGER PRIMARY KEY, v INTEGER);
				CREATE TABLE b (id INTEGER PRIMARY KEY, v INTEGER);
				CREATE TABLE c (id INTEGER PRIMARY KEY, v INTEGER)`)
			return err
		})
		if err != nil {
			rt.Fatal(err)
		}
		defer a.Close()
		open := func(name string) *Replica {
			r, err := Open(ctx, filepath.Join(dir, name), Options{Mutators: reg})
			if err != nil {
				rt.Fatal(err)
			}
			return r
		}
		r, other := open("r.db"), open("o.db")
		defer r.Close()
		defer other.Close()
		sync := func(x *Replica) {
			sets, err := a.Since(x.Status().Version)
			if err != nil {
				rt.Fatal(err)
			}
			if err := x.Rebase(ctx, sets...); err != nil {
				rt.Fatal(err)
			}
		}
		pushAll := func(x *Replica) {
			var batch []server.Mutation
			for _, m := range x.Pending() {
				batch = append(batch, server.Mutation{ClientID: m.ClientID, ID: m.ID, Name: m.Name, Args: m.Args})
			}
			if _, _, err := a.Push(ctx, batch); err != nil {
				rt.Fatal(err)
			}
		}
		sync(r)
		sync(other)
		qs := make([]*LiveQuery, len(queries))
		prev := make([][][]any, len(queries))
		got := make([]bool, len(queries))
		local := make([]map[any]bool, len(queries)) // local ids seen
		for i, s := range queries {
			if qs[i], err = r.Watch(ctx, s); err != nil {
				rt.Fatal(err)
			}
			defer qs[i].Close()
			local[i] = map[any]bool{}
		}
		truth := func(i int) [][]any {
			rows, err := r.DB().QueryContext(ctx, queries[i])
			if err != nil {
				rt.Fatal(err)
			}
			defer rows.Close()
			var res Result
			if err := scanAll(rows, &res); err != nil {
				rt.Fatal(err)
			}
			return res.Rows
		}
		check := func(step int) {
			for i, q := range qs {
				want := truth(i)
				for !got[i] || !reflect.DeepEqual(prev[i], want) {
					wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
					res, err := q.Next(wctx)
					cancel()
					if err != nil {
						rt.Fatalf("step %d: %s: never delivered %v (last %v): %v", step, queries[i], want, prev[i], err)
					}
					if res.Err != nil {
						rt.Fatalf("step %d: %s: %v", step, queries[i], res.Err)
					}
					if got[i] && reflect.DeepEqual(res.Rows, prev[i]) {
						rt.Fatalf("step %d: %s: delivered the same result twice", step, queries[i])
					}
					now := map[any]bool{}
					for _, row := range res.Rows {
						now[row[0]] = true
					}
					for id := range local[i] {
						if !now[id] {
							rt.Fatalf("step %d: %s: locally written row %v vanished: %v", step, queries[i], id, res.Rows)
						}
					}
					for _, row := range res.Rows {
						if id, ok := row[0].(int64); ok && id < 1000 {
							local[i][id] = true
						}
					}
					prev[i], got[i] = res.Rows, true
				}
			}
		}
		check(0)
		steps := rapid.IntRange(1, 12).Draw(rt, "steps")
		for s := 1; s <= steps; s++ {
			tbl := rapid.SampledFrom(tables).Draw(rt, "table")
			v := rapid.IntRange(0, 3).Draw(rt, "v")
			switch rapid.IntRange(0, 3).Draw(rt, "action") {
			case 0: // local: upsert a row below 1000 (never removed)
				id := rapid.IntRange(1, 5).Draw(rt, "id")
				mustMutate(rt, r, "exec", execArgs(fmt.Sprintf("INSERT INTO %s VALUES (%d, %d) ON CONFLICT(id) DO UPDATE SET v = excluded.v", tbl, id, v)))
			case 1: // server: another client writes rows from 1000 on
				id := 1000 + rapid.IntRange(0, 3).Draw(rt, "id")
				stmt := fmt.Sprintf("INSERT INTO %s VALUES (%d, %d) ON CONFLICT(id) DO UPDATE SET v = excluded.v", tbl, id, v)
				if v == 0 {
					stmt = fmt.Sprintf("DELETE FROM %s WHERE id = %d", tbl, id)
				}
				sync(other)
				mustMutate(rt, other, "exec", execArgs(stmt))
				pushAll(other)
				sync(other)
			case 2: // rebase r onto what the server has
				sync(r)
			case 3: // push r's pending, then rebase
				pushAll(r)
				sync(r)
			}
			check(s)
		}
	})
}
