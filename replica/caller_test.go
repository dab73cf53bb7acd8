package replica

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/sqlrebase/sqlrebase/internal/policytest"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// callerRegistry is the test registry plus "whoami", which records its
// caller (mutators.CallerFrom) as a row of Callers tagged with its args,
// and fails where the context carries no caller.
func callerRegistry(t tb) *mutators.Registry {
	reg := testRegistry(t)
	policytest.RegisterWhoami(reg)
	return reg
}

func callerSetup(ctx context.Context, tx mutators.Tx) error {
	if err := demoSetup(ctx, tx); err != nil {
		return err
	}
	_, err := tx.Exec(policytest.CallersTable)
	return err
}

func callerRows(t *testing.T, r *Replica) []string {
	t.Helper()
	rows, err := r.DB().QueryContext(context.Background(), `SELECT tag, client, user, role FROM Callers ORDER BY tag`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var tag, client, user, role string
		if err := rows.Scan(&tag, &client, &user, &role); err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprintf("%s %s %s %s", tag, client, user, role))
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestReplicaCaller: Mutate's optimistic run and every replay see the
// identity the app configured (Options.User, Claims) with the replica's
// client id; once the server has run a mutation, its run (with the
// server's idea of the caller) is what the replica shows.
func TestReplicaCaller(t *testing.T) {
	ctx := context.Background()
	reg := callerRegistry(t)
	a, err := server.OpenAuthority(ctx, filepath.Join(t.TempDir(), "server.db"), reg, callerSetup)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	r, err := Open(ctx, filepath.Join(t.TempDir(), "r.db"), Options{Mutators: reg, User: "alice", Claims: map[string]any{"role": "admin"}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	catchUp(t, a, r)
	id := r.Status().ClientID
	for _, tag := range []string{"t1", "t2"} {
		h, err := r.Mutate(ctx, "whoami", json.RawMessage(fmt.Sprintf("%q", tag)))
		if err != nil {
			t.Fatal(err)
		}
		if h.LocalErr() != nil {
			t.Fatalf("local run of %s: %v", tag, h.LocalErr())
		}
	}
	want := []string{"t1 " + id + " alice admin", "t2 " + id + " alice admin"}
	if got := callerRows(t, r); !slices.Equal(got, want) {
		t.Fatalf("optimistic rows %q, want %q", got, want)
	}
	// A rebase with no versions drops both and replays them: the replay
	// runs as the same caller.
	if err := r.Rebase(ctx); err != nil {
		t.Fatal(err)
	}
	if got := callerRows(t, r); !slices.Equal(got, want) {
		t.Fatalf("after a replay %q, want %q", got, want)
	}
	// The server runs t1 as the user its authenticator established, which
	// here differs from the local claim: the server's run wins, and t2 is
	// replayed on top as the local user again.
	p := r.Pending()[0]
	if _, _, err := a.Push(ctx, []server.Mutation{{ClientID: p.ClientID, ID: p.ID, Name: p.Name, Args: p.Args, UserID: "alice@server"}}); err != nil {
		t.Fatal(err)
	}
	catchUp(t, a, r)
	want = []string{"t1 " + id + " alice@server ", "t2 " + id + " alice admin"}
	if got := callerRows(t, r); !slices.Equal(got, want) {
		t.Fatalf("after the server ran t1 %q, want %q", got, want)
	}
}
