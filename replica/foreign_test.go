package replica

import (
	"context"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// TestForeignWriteDropped: another process (the stock sqlite3 shell) can
// append to a live replica's WAL, since it takes the same locks as the
// replica's own writer. The replica finds the frames at its next Mutate or
// rebase, counts and logs them, and drops them; the pending mutations stay.
func TestForeignWriteDropped(t *testing.T) {
	shell, err := exec.LookPath("sqlite3")
	if err != nil {
		t.Fatal("the tests need the stock sqlite3 shell on PATH:", err)
	}
	ctx := context.Background()
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	path := filepath.Join(t.TempDir(), "replica.db")
	r := openReplica(t, path, reg)
	catchUp(t, a, r)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))

	foreign := func(sql string) {
		t.Helper()
		if out, err := exec.Command(shell, path, sql).CombinedOutput(); err != nil {
			t.Fatalf("sqlite3 %q: %v\n%s", sql, err, out)
		}
	}
	foreign(`INSERT INTO Categories(name, count) VALUES ('Intruder', 99)`)
	if got := categories(t, r.DB()); got["Intruder"] != 99 {
		t.Fatalf("the shell's write is not in the WAL as the test expects: %v", got)
	}

	// The next Mutate finds it, drops it and builds on the replica's own state.
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	got := categories(t, r.DB())
	if _, ok := got["Intruder"]; ok || got["Food"] != 2 {
		t.Fatalf("after the next Mutate: %v, want Food 2 and no Intruder", got)
	}
	if st := r.Status(); st.ForeignWrites != 1 || st.Pending != 2 {
		t.Fatalf("status %+v: want 1 foreign write found, 2 pending", st)
	}

	// A rebase finds one too.
	foreign(`UPDATE Categories SET count = 1000 WHERE name = 'Food'`)
	if err := r.Rebase(ctx); err != nil {
		t.Fatal(err)
	}
	if got := categories(t, r.DB()); got["Food"] != 2 {
		t.Fatalf("after a rebase: %v, want Food 2", got)
	}
	if st := r.Status(); st.ForeignWrites != 2 || st.Pending != 2 {
		t.Fatalf("status %+v: want 2 foreign writes found, 2 pending", st)
	}
	// And the replica's own commits are never taken for foreign ones.
	for range 5 {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	}
	if err := r.Rebase(ctx); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.ForeignWrites != 2 {
		t.Fatalf("status %+v: the replica's own commits counted as foreign", st)
	}
	catchUp(t, a, r)
}
