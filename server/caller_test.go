package server

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/internal/policytest"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// callerRegistry is the test registry plus "whoami", which records the
// mutation's caller (mutators.CallerFrom) as a row of Callers, tagged with
// its args, and fails if the context carries no caller.
func callerRegistry(t testing.TB) *mutators.Registry {
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

// callers reads Callers as "tag client user role" lines, in tag order.
func callers(t *testing.T, a *Authority) []string {
	t.Helper()
	rows, err := a.Query(context.Background(), `SELECT tag, client, user, role FROM Callers ORDER BY tag`)
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

func whoami(client string, id uint64, user, role, tag string) Mutation {
	m := Mutation{ClientID: client, ID: id, Name: "whoami", Args: json.RawMessage(fmt.Sprintf("%q", tag)), UserID: user}
	if role != "" {
		m.Claims = map[string]any{"role": role}
	}
	return m
}

// TestAuthorityCallerPerMutation: one batch interleaves two users' clients;
// each mutator sees the caller of its own mutation, under both kinds of
// context the authority runs mutators with (the writer's never-done one,
// with its reusable deadline, and a cancellable one).
func TestAuthorityCallerPerMutation(t *testing.T) {
	for _, cancellable := range []bool{false, true} {
		t.Run(fmt.Sprintf("cancellable=%v", cancellable), func(t *testing.T) {
			a, err := OpenAuthority(context.Background(), filepath.Join(t.TempDir(), "server.db"), callerRegistry(t), callerSetup)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			ctx := context.Background()
			if cancellable {
				var cancel context.CancelFunc
				ctx, cancel = context.WithCancel(ctx)
				defer cancel()
			}
			_, res, err := a.Push(ctx, []Mutation{
				whoami("c-alice", 1, "alice", "admin", "1"),
				whoami("c-bob", 1, "bob", "", "2"),
				whoami("c-alice", 2, "alice", "admin", "3"),
				whoami("c-anon", 1, "", "", "4"),
				whoami("c-bob", 2, "bob", "", "5"),
			})
			if err != nil {
				t.Fatal(err)
			}
			for i, r := range res {
				if r.Outcome != Applied {
					t.Fatalf("mutation %d: outcome %d (%s), want Applied", i, r.Outcome, r.Err)
				}
			}
			want := []string{"1 c-alice alice admin", "2 c-bob bob ", "3 c-alice alice admin", "4 c-anon  ", "5 c-bob bob "}
			if got := callers(t, a); !slices.Equal(got, want) {
				t.Fatalf("callers seen by the mutators:\n%q\nwant\n%q", got, want)
			}
		})
	}
}

// TestAuthorityCallerKeepsTimeLimit: the caller wraps the mutator's
// deadline; a mutator past the time limit is still interrupted and
// rejected, and the next one of the batch still sees its own caller.
func TestAuthorityCallerKeepsTimeLimit(t *testing.T) {
	a, err := openAuthorityWith(t, AuthorityOptions{MutatorTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	endless := Mutation{ClientID: "c-alice", ID: 1, Name: "query", UserID: "alice",
		Args: json.RawMessage(`"WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM r) SELECT i FROM r"`)}
	_, res, err := a.Push(context.Background(), []Mutation{endless, whoami("c-bob", 1, "bob", "", "after")})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Outcome != Rejected || !strings.Contains(res[0].Err, ErrTimeLimit.Error()) {
		t.Fatalf("endless mutator: outcome %d (%s), want Rejected with %v", res[0].Outcome, res[0].Err, ErrTimeLimit)
	}
	if res[1].Outcome != Applied {
		t.Fatalf("mutation after it: outcome %d (%s)", res[1].Outcome, res[1].Err)
	}
	if got, want := callers(t, a), []string{"after c-bob bob "}; !slices.Equal(got, want) {
		t.Fatalf("callers %q, want %q", got, want)
	}
}

func openAuthorityWith(t *testing.T, opts AuthorityOptions) (*Authority, error) {
	t.Helper()
	a, err := OpenAuthorityWith(context.Background(), filepath.Join(t.TempDir(), "server.db"), callerRegistry(t), callerSetup, opts)
	if err == nil {
		t.Cleanup(func() { a.Close() })
	}
	return a, err
}

// TestDatabaseBatchMixesCallers: two users' sessions push into one group
// commit batch (database.run, as the writer calls it); each mutator sees
// the identity of the session that pushed it, and each session gets its
// own ack.
func TestDatabaseBatchMixesCallers(t *testing.T) {
	srv, _ := testServer(t, t.TempDir(), func(c *Config) {
		c.Mutators = callerRegistry(t)
		c.Setup = callerSetup
	})
	ctx := context.Background()
	d, release, err := srv.acquire(ctx, "demo")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	sess := func(client string, id Identity) *session {
		return &session{srv: srv, db: d, clientID: client, identity: id, wake: make(chan struct{}, 1), done: make(chan struct{})}
	}
	alice := sess("c-alice", Identity{UserID: "alice", Claims: map[string]any{"role": "admin"}})
	bob := sess("c-bob", Identity{UserID: "bob"})
	mut := func(id uint64, tag string) protocol.Mutation {
		return protocol.Mutation{ID: id, Name: "whoami", Args: json.RawMessage(fmt.Sprintf("%q", tag))}
	}
	d.run(ctx, []pushRequest{
		{s: alice, mutations: []protocol.Mutation{mut(1, "a1"), mut(2, "a2")}},
		{s: bob, mutations: []protocol.Mutation{mut(1, "b1")}},
		{s: alice, mutations: []protocol.Mutation{mut(3, "a3")}},
	})
	want := []string{"a1 c-alice alice admin", "a2 c-alice alice admin", "a3 c-alice alice admin", "b1 c-bob bob "}
	if got := callers(t, d.auth); !slices.Equal(got, want) {
		t.Fatalf("callers seen by the mutators:\n%q\nwant\n%q", got, want)
	}
	acks := func(s *session) []uint64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		var ids []uint64
		for _, it := range s.queue {
			if it.ack != nil {
				ids = append(ids, it.ack.LastMutationID)
			}
		}
		return ids
	}
	if got := acks(alice); !slices.Equal(got, []uint64{2, 3}) {
		t.Errorf("alice's acks %v, want [2 3]", got)
	}
	if got := acks(bob); !slices.Equal(got, []uint64{1}) {
		t.Errorf("bob's acks %v, want [1]", got)
	}
}
