package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// fakeEntry is a watch entry made by hand.
type fakeEntry struct {
	key   string
	value []byte
	rev   uint64
	op    jetstream.KeyValueOp
}

func (e fakeEntry) Key() string                     { return e.key }
func (e fakeEntry) Value() []byte                   { return e.value }
func (e fakeEntry) Revision() uint64                { return e.rev }
func (e fakeEntry) Operation() jetstream.KeyValueOp { return e.op }

// TestAccessDeliverKeepsTheGoodCopy: of the entries the watch delivers,
// only a valid record later than the one held replaces it and reaches the
// watchers; a corrupt value, a deletion or an older record changes
// nothing (and never panics). Keys map back to names with dots.
func TestAccessDeliverKeepsTheGoodCopy(t *testing.T) {
	a := &Access{log: quiet, recs: map[string]server.AccessRecord{}, fns: map[int]func(string, server.AccessRecord){}}
	var heard []uint64
	a.Watch(func(db string, rec server.AccessRecord) {
		if db != "shop.eu" {
			t.Errorf("watcher told of %q", db)
		}
		heard = append(heard, rec.Revision)
	})
	good := []byte(`{"revoked_users":["m"]}`)
	for _, c := range []struct {
		name string
		e    fakeEntry
		want uint64 // the revision held after
	}{
		{"valid", fakeEntry{"shop=eu", good, 5, jetstream.KeyValuePut}, 5},
		{"corrupt", fakeEntry{"shop=eu", []byte(`{"credentials":`), 6, jetstream.KeyValuePut}, 5},
		{"null", fakeEntry{"shop=eu", []byte(`null`), 7, jetstream.KeyValuePut}, 5},
		{"empty", fakeEntry{"shop=eu", []byte{}, 8, jetstream.KeyValuePut}, 5},
		{"not an object", fakeEntry{"shop=eu", []byte("\xff\x00"), 9, jetstream.KeyValuePut}, 5},
		{"deleted", fakeEntry{"shop=eu", nil, 10, jetstream.KeyValueDelete}, 5},
		{"purged", fakeEntry{"shop=eu", nil, 11, jetstream.KeyValuePurge}, 5},
		{"older", fakeEntry{"shop=eu", []byte(`{}`), 4, jetstream.KeyValuePut}, 5},
		{"same", fakeEntry{"shop=eu", []byte(`{}`), 5, jetstream.KeyValuePut}, 5},
		{"later", fakeEntry{"shop=eu", []byte(`{}`), 12, jetstream.KeyValuePut}, 12},
	} {
		a.deliver(c.e)
		rec, err := a.Load(context.Background(), "shop.eu")
		if err != nil || rec.Revision != c.want || server.CheckAccessRecord(rec.Value) != nil {
			t.Fatalf("after %s: %d %q, %v; want revision %d", c.name, rec.Revision, rec.Value, err, c.want)
		}
	}
	if !slices.Equal(heard, []uint64{5, 12}) {
		t.Fatalf("watchers heard %v, want [5 12]", heard)
	}
	if dbs, _ := a.Databases(context.Background()); !slices.Equal(dbs, []string{"shop.eu"}) {
		t.Fatalf("databases %v", dbs)
	}
}

// gatedStore holds back the watch's reports to its server while held: a
// node that has not heard of another's change yet.
type gatedStore struct {
	server.AccessStore
	mu   sync.Mutex
	gate chan struct{} // nil or closed: open
}

func (g *gatedStore) hold() {
	g.mu.Lock()
	g.gate = make(chan struct{})
	g.mu.Unlock()
}

func (g *gatedStore) release() {
	g.mu.Lock()
	if g.gate != nil {
		close(g.gate)
		g.gate = nil
	}
	g.mu.Unlock()
}

// Refresh is the store's own: a refresh is not the watch.
func (g *gatedStore) Refresh(ctx context.Context, db string) (server.AccessRecord, error) {
	return g.AccessStore.(server.AccessRefresher).Refresh(ctx, db)
}

func (g *gatedStore) Watch(fn func(string, server.AccessRecord)) func() {
	return g.AccessStore.Watch(func(db string, rec server.AccessRecord) {
		g.mu.Lock()
		ch := g.gate
		g.mu.Unlock()
		if ch != nil {
			<-ch
		}
		fn(db, rec)
	})
}

// accessServer is a node's server on a shared access store: its own
// directory, no version log (each node's files are its own here; this is
// about the credentials).
func accessServer(t *testing.T, store server.AccessStore) (*server.Server, string) {
	t.Helper()
	srv, err := server.Open(context.Background(), server.Config{
		Dir: t.TempDir(), Mutators: demoRegistry(t), Logger: quiet, AccessStore: store, CredentialHashIterations: 1000,
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	addr, err := srv.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return srv, addr
}

// connectAs opens a replica of db at a node with secret and waits for its
// Hello's answer: nil if accepted.
func connectAs(t *testing.T, ctx context.Context, srv *server.Server, addr, db, secret string) (*replica.Replica, error) {
	t.Helper()
	r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "replica.db"), replica.Options{
		Mutators: demoRegistry(t),
		Remote:   &replica.Remote{Addr: addr, Database: db, Credential: secret, Fingerprint: srv.Fingerprint()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return r, r.WaitConnected(wctx)
}

// eventually polls cond every 20 ms until it holds, and fails the test
// after within.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// userOf returns db's user u as srv lists it (zero if it does not).
func userOf(t *testing.T, srv *server.Server, db, u string) server.UserInfo {
	t.Helper()
	us, err := srv.Users(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range us {
		if x.User == u {
			return x
		}
	}
	return server.UserInfo{}
}

// storedCredential is a credential as the bucket's JSON holds it (the
// fields this test reads).
type storedCredential struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Gen  int    `json:"gen"`
	Prev *struct {
		Gen int `json:"gen"`
	} `json:"prev"`
}

// credentialIn reads user's credential from db's key in the bucket.
func credentialIn(t *testing.T, ctx context.Context, kv jetstream.KeyValue, db, user string) storedCredential {
	t.Helper()
	e, err := kv.Get(ctx, token(db))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		Credentials []storedCredential `json:"credentials"`
	}
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		t.Fatal(err)
	}
	for _, c := range rec.Credentials {
		if c.Name == user {
			return c
		}
	}
	t.Fatalf("no credential of %s in %s", user, e.Value())
	return storedCredential{}
}

// TestAccessSharedByTwoNodes: two servers (nodes A and B, each with its
// own connection and watch) on one JetStream's access bucket. A database
// created and a secret added on A are served on B (even before B's watch
// delivers them: B reads the bucket before refusing); a user revoked on A
// has the session at B ended and refused; a rotation on each node of the
// same secret, B's made on a copy that has not heard of A's, both stay:
// the second builds on the first, and both secrets work on both nodes.
func TestAccessSharedByTwoNodes(t *testing.T) {
	n, _, js := single(t)
	ctx := bounded(t, 90*time.Second)
	open := func() *Access {
		_, js := connect(t, n)
		a, err := OpenAccess(ctx, js, AccessConfig{Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		return a
	}
	accA, accB := open(), open()
	gateB := &gatedStore{AccessStore: accB}
	t.Cleanup(gateB.release)
	srvA, addrA := accessServer(t, accA)
	srvB, addrB := accessServer(t, gateB)
	const db = "shop.eu"
	if err := srvA.CreateDatabase(ctx, db); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"alice", "bob", "carol"} {
		if _, err := srvA.AddSecret(ctx, db, u, u+"-secret"); err != nil {
			t.Fatal(err)
		}
	}

	// Created and added on A; known and served on B.
	eventually(t, 10*time.Second, "B knows A's database and its secrets", func() bool {
		return slices.Contains(srvB.Databases(), db) && userOf(t, srvB, db, "carol").Credentials != nil
	})
	r, err := connectAs(t, ctx, srvB, addrB, db, "alice-secret")
	if err != nil {
		t.Fatalf("alice at B: %v", err)
	}
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if u := userOf(t, srvB, db, "alice"); u.Sessions != 1 {
		t.Fatalf("alice at B: %+v", u)
	}

	// Revoked on A: the session at B ends, and alice is refused there.
	revoked := time.Now()
	if n, err := srvA.RevokeUser(ctx, db, "alice"); err != nil || n != 0 {
		t.Fatalf("revoke at A: %d sessions, %v", n, err)
	}
	eventually(t, 10*time.Second, "alice's session at B ends", func() bool {
		var re *protocol.RemoteError
		st := r.Status()
		return !st.Connected && errors.As(st.LastError, &re) && (re.Code == protocol.CodeUnauthorized || re.Code == protocol.CodeCredentialRevoked)
	})
	t.Logf("alice's session at B ended within %v of the revocation on A (until the replica saw its session end; 20 ms polls)", time.Since(revoked).Round(time.Millisecond))
	if u := userOf(t, srvB, db, "alice"); u.Sessions != 0 || !u.Revoked {
		t.Fatalf("alice at B after the revocation: %+v", u)
	}
	if _, err := connectAs(t, ctx, srvB, addrB, db, "alice-secret"); err == nil {
		t.Fatal("B admitted a user revoked on A")
	}

	// Made on A, presented at B before B's watch says so: B reads the
	// bucket before it refuses.
	gateB.hold()
	if err := srvA.CreateDatabase(ctx, "late"); err != nil {
		t.Fatal(err)
	}
	if _, err := srvA.AddSecret(ctx, "late", "dave", "dave-secret"); err != nil {
		t.Fatal(err)
	}
	if _, err := connectAs(t, ctx, srvB, addrB, "late", "dave-secret"); err != nil {
		t.Fatalf("a database and secret made on A a moment ago, at B: %v", err)
	}
	if _, err := srvA.AddSecret(ctx, "late", "erin", "erin-secret"); err != nil {
		t.Fatal(err)
	}
	if _, err := connectAs(t, ctx, srvB, addrB, "late", "erin-secret"); err != nil {
		t.Fatalf("a secret added on A a moment ago, at B: %v", err)
	}
	gateB.release()

	// Rotated on A, and on B before B heard of it.
	kv, err := js.KeyValue(ctx, DefaultAccessBucket)
	if err != nil {
		t.Fatal(err)
	}
	gateB.hold()
	if _, err := srvA.RotateSecret(ctx, db, "bob", "bob-a", time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := srvB.RotateSecret(ctx, db, "bob", "bob-b", time.Minute); err != nil {
		t.Fatal(err)
	}
	gateB.release()
	if c := credentialIn(t, ctx, kv, db, "bob"); c.Gen != 2 || c.Prev == nil || c.Prev.Gen != 1 {
		t.Fatalf("bob's credential after two rotations: %+v (want gen 2, the one before in its grace)", c)
	}
	// And at the same time, on both nodes.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, srv := range []*server.Server{srvA, srvB} {
		wg.Go(func() {
			_, errs[i] = srv.RotateSecret(ctx, db, "carol", []string{"carol-a", "carol-b"}[i], time.Minute)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if c := credentialIn(t, ctx, kv, db, "carol"); c.Gen != 2 || c.Prev == nil || c.Prev.Gen != 1 {
		t.Fatalf("carol's credential after two concurrent rotations: %+v", c)
	}
	// Each node ends up with the record both rotations made: the current
	// secret and the one in its grace work on both.
	for _, node := range []struct {
		srv  *server.Server
		addr string
	}{{srvA, addrA}, {srvB, addrB}} {
		for _, secret := range []string{"bob-a", "bob-b", "carol-a", "carol-b"} {
			eventually(t, 20*time.Second, secret+" works at "+node.addr, func() bool {
				_, err := connectAs(t, ctx, node.srv, node.addr, db, secret)
				return err == nil
			})
		}
	}
}

// TestAccessConflictsOnThreeNodes: on an R3 bucket (where JetStream
// reports a compare-and-set conflict as 10164, not 10071), a save on a
// stale revision, or of a new key another node created, is an
// AccessConflictError holding the winner's record; a save whose bytes are
// already the record's (a retry of one that landed) is the save done; and
// the other node's watch delivers each record.
func TestAccessConflictsOnThreeNodes(t *testing.T) {
	nodes := trio(t)
	ctx := bounded(t, 60*time.Second)
	open := func(n *Node) *Access {
		_, js := connect(t, n)
		a, err := OpenAccess(ctx, js, AccessConfig{Replicas: 3, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		return a
	}
	a, b := open(nodes[0]), open(nodes[1])
	heard := make(chan server.AccessRecord, 16)
	b.Watch(func(db string, rec server.AccessRecord) { heard <- rec })
	if err := a.Create(ctx, "x.y"); err != nil {
		t.Fatal(err)
	}
	if err := b.Create(ctx, "x.y"); err != nil { // exists: fine
		t.Fatal(err)
	}
	r0, err := b.Load(ctx, "x.y")
	if err != nil || string(r0.Value) != "{}" {
		t.Fatalf("b's copy of a new database: %q, %v", r0.Value, err)
	}
	r1, err := a.Save(ctx, "x.y", []byte(`{"revoked_users":["m"]}`), r0.Revision)
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.Save(ctx, "x.y", []byte(`{"revoked_users":["n"]}`), r0.Revision)
	var conflict *server.AccessConflictError
	if !errors.As(err, &conflict) || !errors.Is(err, server.ErrAccessConflict) || conflict.Current.Revision != r1 || string(conflict.Current.Value) != `{"revoked_users":["m"]}` {
		t.Fatalf("a stale save: %v", err)
	}
	if _, err := b.Save(ctx, "new", []byte(`{}`), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Save(ctx, "new", []byte(`{"clients":{"c":"u"}}`), 0); !errors.As(err, &conflict) {
		t.Fatalf("a new key another node made: %v", err)
	}
	// A retry of a save that landed (the same bytes, the old revision).
	if r, err := a.Save(ctx, "x.y", []byte(`{"revoked_users":["m"]}`), r0.Revision); err != nil || r != r1 {
		t.Fatalf("a save already in the bucket: %d, %v; want %d", r, err, r1)
	}
	deadline := time.After(10 * time.Second)
	for {
		select {
		case rec := <-heard:
			if rec.Revision == r1 {
				return
			}
		case <-deadline:
			t.Fatal("b's watch did not deliver a's save")
		}
	}
}

// BenchmarkAccessChange: one admin change (a user revoked, then restored:
// each a saved record) through a server on its files (access.json, an
// fsync) and on the access bucket of a one-node JetStream with sync
// always (a compare-and-set with its fsync), alternating in one run so
// both see the same machine. The ratio is kv/file.
//
//	go test -run X -bench AccessChange -benchtime 200x ./cluster/
func BenchmarkAccessChange(b *testing.B) {
	_, _, js := single(b)
	ctx := bounded(b, 5*time.Minute)
	acc, err := OpenAccess(ctx, js, AccessConfig{Logger: quiet})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(acc.Close)
	open := func(store server.AccessStore) *server.Server {
		srv, err := server.Open(ctx, server.Config{Dir: b.TempDir(), Mutators: mutators.NewRegistry(), Logger: quiet, AccessStore: store, CredentialHashIterations: 1000})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { srv.Close() })
		if err := srv.AddDatabase(ctx, "db", "s"); err != nil {
			b.Fatal(err)
		}
		return srv
	}
	srvs := []*server.Server{open(nil), open(acc)}
	var took [2]time.Duration
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		for k, srv := range srvs {
			start := time.Now()
			var err error
			if i%2 == 0 {
				_, err = srv.RevokeUser(ctx, "db", "u")
			} else {
				_, err = srv.RestoreUser(ctx, "db", "u")
			}
			if err != nil {
				b.Fatal(err)
			}
			took[k] += time.Since(start)
		}
	}
	b.ReportMetric(float64(took[0].Microseconds())/float64(b.N), "file-µs/change")
	b.ReportMetric(float64(took[1].Microseconds())/float64(b.N), "kv-µs/change")
	b.ReportMetric(float64(took[1])/float64(took[0]), "kv/file")
}

// staleKV answers its first stale Gets with an old entry, as a replica of
// the bucket that has not yet applied the latest revision answers a
// direct get.
type staleKV struct {
	jetstream.KeyValue
	old   jetstream.KeyValueEntry
	stale int
	gets  int
}

func (s *staleKV) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	s.gets++
	if s.gets <= s.stale {
		return s.old, nil
	}
	return s.KeyValue.Get(ctx, key)
}

// TestAccessSaveWaitsOutAStaleRead: a save refused for its revision reads
// the record again until the read is newer than that revision, so that
// the conflict it reports holds the record the other change saved, not a
// stale copy that would fail the next attempt the same way.
func TestAccessSaveWaitsOutAStaleRead(t *testing.T) {
	n, _, js := single(t)
	ctx := bounded(t, 30*time.Second)
	a, err := OpenAccess(ctx, js, AccessConfig{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	_, js2 := connect(t, n)
	b, err := OpenAccess(ctx, js2, AccessConfig{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	if err := a.Create(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	rec, err := a.Load(ctx, "db")
	if err != nil {
		t.Fatal(err)
	}
	rev1, err := a.Save(ctx, "db", []byte(`{"v":1}`), rec.Revision)
	if err != nil {
		t.Fatal(err)
	}
	old, err := a.kv.Get(ctx, token("db"))
	if err != nil {
		t.Fatal(err)
	}
	rev2, err := b.Save(ctx, "db", []byte(`{"v":2}`), rev1) // another node's change
	if err != nil {
		t.Fatal(err)
	}
	skv := &staleKV{KeyValue: a.kv, old: old, stale: 3}
	a.kv = skv
	_, err = a.Save(ctx, "db", []byte(`{"v":3}`), rev1)
	var conflict *server.AccessConflictError
	if !errors.As(err, &conflict) {
		t.Fatalf("a save on a revision another node moved past: %v, want an AccessConflictError", err)
	}
	if conflict.Current.Revision != rev2 || string(conflict.Current.Value) != `{"v":2}` {
		t.Fatalf("the conflict holds revision %d %s, want the other node's %d (read %d times, %d of them stale)",
			conflict.Current.Revision, conflict.Current.Value, rev2, skv.gets, skv.stale)
	}
}
