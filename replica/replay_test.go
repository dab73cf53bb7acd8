package replica

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// TestReplayUndoesOnlyTheFailedMutator: a replay runs without a savepoint
// per mutation until a mutator fails; then it starts again with one each,
// so that the failed mutator's partial write goes and the effects of the
// mutations around it stay, in every rebase.
func TestReplayUndoesOnlyTheFailedMutator(t *testing.T) {
	ctx := context.Background()
	reg := testRegistry(t)
	r := openReplica(t, filepath.Join(t.TempDir(), "replica.db"), reg)
	half, err := json.Marshal([]string{
		`INSERT INTO Categories(name, count) VALUES ('half', 1)`,
		`INSERT INTO no_such_table VALUES (1)`,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct {
		name string
		args []byte
	}{{mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("a", 1)}, {"exec", half}, {mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("b", 2)}} {
		if _, err := r.Mutate(ctx, m.name, m.args); err != nil {
			t.Fatal(err)
		}
	}
	h := r.Handle(2)
	for round := range 3 {
		if err := r.Rebase(ctx); err != nil {
			t.Fatal(err)
		}
		var got string
		if err := r.DB().QueryRowContext(ctx, `SELECT group_concat(name || '=' || count, ',') FROM (SELECT * FROM Categories ORDER BY name)`).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != "a=1,b=2" {
			t.Fatalf("round %d: categories %q, want a=1,b=2 (the failed mutator's write undone, the others kept)", round, got)
		}
		if h.LocalErr() == nil {
			t.Fatalf("round %d: the failing mutation has no local error", round)
		}
	}
}
