package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// memStore is an AccessStore in memory with revisions, compare-and-set
// and watchers, as the cluster's KV bucket behaves: what two nodes share.
// external makes a change as another node would.
type memStore struct {
	mu        sync.Mutex
	rev       uint64 // the store's last revision (over all records, as a bucket's)
	recs      map[string]AccessRecord
	fns       []func(string, AccessRecord)
	saves     int // saves refused as conflicts
	refreshes int // records read by Refresh
}

func newMemStore() *memStore { return &memStore{recs: map[string]AccessRecord{}} }

func (m *memStore) Databases(context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	for n := range m.recs {
		names = append(names, n)
	}
	return names, nil
}

func (m *memStore) Create(_ context.Context, db string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.recs[db]; !ok {
		m.rev++
		m.recs[db] = AccessRecord{Value: []byte("{}"), Revision: m.rev}
	}
	return nil
}

func (m *memStore) Load(_ context.Context, db string) (AccessRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.recs[db], nil
}

func (m *memStore) Save(_ context.Context, db string, value []byte, rev uint64) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur := m.recs[db]; cur.Revision != rev {
		m.saves++
		return 0, &AccessConflictError{Current: cur}
	}
	m.rev++
	m.recs[db] = AccessRecord{Value: value, Revision: m.rev}
	return m.rev, nil
}

// Refresh reads db's record as it is now (memStore's Load already does).
func (m *memStore) Refresh(_ context.Context, db string) (AccessRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, ok := m.recs[db]
	if !ok {
		return AccessRecord{}, fmt.Errorf("%w: %q", ErrUnknownDatabase, db)
	}
	m.refreshes++
	return rec, nil
}

// refreshed is how many records Refresh has read.
func (m *memStore) refreshed() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.refreshes
}

func (m *memStore) Watch(fn func(string, AccessRecord)) func() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fns = append(m.fns, fn)
	return func() {}
}

// external writes db's record as another node would (value as is, valid
// or not) and tells the watchers.
func (m *memStore) external(db string, value []byte) {
	m.mu.Lock()
	m.rev++
	rec := AccessRecord{Value: value, Revision: m.rev}
	m.recs[db] = rec
	fns := slices.Clone(m.fns)
	m.mu.Unlock()
	for _, fn := range fns {
		fn(db, rec)
	}
}

// externalChange applies fn to db's record as another node would.
func (m *memStore) externalChange(t *testing.T, db string, fn func(f *accessFile)) {
	t.Helper()
	rec, _ := m.Load(context.Background(), db)
	f, err := decodeAccess(rec.Value)
	if err != nil {
		t.Fatal(err)
	}
	fn(&f)
	b, err := encodeAccess(&f)
	if err != nil {
		t.Fatal(err)
	}
	m.external(db, b)
}

// TestDecodeAccess: a record is a JSON object of the access file's shape;
// anything else is an error (never a panic), and nil is no record yet.
func TestDecodeAccess(t *testing.T) {
	for _, c := range []struct {
		name  string
		value []byte
		ok    bool
		creds int
	}{
		{"none", nil, true, 0},
		{"empty object", []byte(`{}`), true, 0},
		{"spaces around", []byte(" \n{\"revoked_users\":[\"m\"]}\n"), true, 0},
		{"a credential", []byte(`{"credentials":[{"id":"ab","salt":"AAAA","hash":"AAAA"}],"clients":{"c":"ab"}}`), true, 1},
		{"empty value", []byte{}, false, 0},
		{"null", []byte(`null`), false, 0},
		{"array", []byte(`[]`), false, 0},
		{"string", []byte(`"x"`), false, 0},
		{"truncated", []byte(`{"credentials":[{"id":"ab"`), false, 0},
		{"wrong type", []byte(`{"credentials":5}`), false, 0},
		{"bad base64", []byte(`{"credentials":[{"id":"ab","salt":"!!"}]}`), false, 0},
		{"bad time", []byte(`{"credentials":[{"id":"ab","prev":{"until":"x"}}]}`), false, 0},
		{"garbage", []byte("\x00\xff{"), false, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, err := decodeAccess(c.value)
			if (err == nil) != c.ok {
				t.Fatalf("decode %q: %v, want ok %v", c.value, err, c.ok)
			}
			if err := CheckAccessRecord(c.value); (err == nil) != c.ok {
				t.Fatalf("CheckAccessRecord %q: %v", c.value, err)
			}
			if c.ok && (f.Clients == nil || len(f.Credentials) != c.creds) {
				t.Fatalf("decoded %+v", f)
			}
		})
	}
}

// FuzzDecodeAccess: whatever a store holds, decoding it fails with an
// error or gives a record that encodes and decodes again.
func FuzzDecodeAccess(f *testing.F) {
	f.Add([]byte(`{"credentials":[{"id":"ab","name":"alice","salt":"AAAA","hash":"AAAA","gen":2,"prev":{"salt":"AAAA","hash":"AAAA","gen":1,"until":"2999-01-01T00:00:00Z"}}],"clients":{"c":"ab"},"revoked":["x"],"revoked_users":["m"]}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := decodeAccess(b)
		if err != nil {
			return
		}
		enc, err := encodeAccess(&a)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := decodeAccess(enc); err != nil {
			t.Fatalf("a decoded record does not decode again: %v\n%s", err, enc)
		}
	})
}

// TestAccessApplyKeepsTheGoodCopy: a corrupt record reported by the
// store is an error and the credentials in memory stay as they were; an
// older record is no news; a newer valid one replaces them.
func TestAccessApplyKeepsTheGoodCopy(t *testing.T) {
	m := newMemStore()
	m.Create(context.Background(), "db")
	a, err := openAccess(context.Background(), storeRecord{m, "db"}, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.add("alice", "good"); err != nil {
		t.Fatal(err)
	}
	rev := a.rev
	for _, bad := range []string{"", "null", "[]", `{"credentials":`, "\xff"} {
		if changed, err := a.apply(AccessRecord{Value: []byte(bad), Revision: rev + 10}); err == nil || changed {
			t.Fatalf("apply %q: changed %v, %v", bad, changed, err)
		}
	}
	if c, err := a.check("good"); err != nil || c.userID() != "alice" || a.rev != rev {
		t.Fatalf("after corrupt records: %+v, %v, rev %d (was %d)", c, err, a.rev, rev)
	}
	if changed, err := a.apply(AccessRecord{Value: []byte(`{}`), Revision: rev}); err != nil || changed {
		t.Fatalf("a record no later than the one held: changed %v, %v", changed, err)
	}
	if changed, err := a.apply(AccessRecord{Value: []byte(`{"revoked_users":["alice"]}`), Revision: rev + 1}); err != nil || !changed {
		t.Fatalf("a later record: changed %v, %v", changed, err)
	}
	if why := a.revokedReason(Identity{UserID: "alice"}); why == "" {
		t.Fatal("the later record's revocation is not in force")
	}
	if _, err := a.check("good"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("a credential the later record dropped still checks: %v", err)
	}
}

// TestAccessChangeRetriesOnConflict: two nodes' copies of one record
// (one store), each changed from the same revision: the second save
// conflicts and is applied again to the first one's record, so both
// changes are in it, and the loser's onRemote hears of it. Every kind of
// change re-checks on the fresh record: a name the other node took is
// refused, a rotation builds on the other's.
func TestAccessChangeRetriesOnConflict(t *testing.T) {
	ctx := context.Background()
	m := newMemStore()
	m.Create(ctx, "db")
	open := func() *access {
		a, err := openAccess(ctx, storeRecord{m, "db"}, 1000)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	a, b := open(), open()
	remote := 0
	b.onRemote = func() { remote++ }
	if _, err := a.add("alice", "sa"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.add("bob", "sb"); err != nil { // b still at the first revision
		t.Fatal(err)
	}
	if m.saves != 1 || remote != 1 {
		t.Fatalf("%d conflicts, %d onRemote; want 1 and 1", m.saves, remote)
	}
	if _, err := a.check("sb"); !errors.Is(err, errWrongCredential) {
		t.Fatal("a knew of b's change without being told")
	}
	if err := a.revokeUser("mallory"); err != nil { // a is behind now
		t.Fatal(err)
	}
	if err := addErr(a.add("carol", "sc1")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.add("carol", "sc2"); !errors.Is(err, ErrCredentialExists) {
		t.Fatalf("a name the other node took: %v", err)
	}
	if _, err := a.rotate("alice", "sa2", time.Minute); err != nil {
		t.Fatal(err)
	}
	c, err := b.rotate("alice", "sa3", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if c.Gen != 2 || c.Prev == nil || c.Prev.Gen != 1 {
		t.Fatalf("the second rotation did not build on the first: gen %d, prev %+v", c.Gen, c.Prev)
	}
	if err := a.bind("phone", "alice"); err != nil {
		t.Fatal(err)
	}
	if err := b.bind("phone", "bob"); !errors.Is(err, errClientBound) {
		t.Fatalf("a client id the other node bound: %v", err)
	}
	// One secret added on both (an unnamed one, as `serve --db` adds on
	// every node): one credential, whichever node's it is.
	s1, err := b.add("", "shared")
	if err != nil {
		t.Fatal(err)
	}
	s2, err := a.add("", "shared")
	if err != nil || s2.ID != s1.ID {
		t.Fatalf("the same secret added on the other node: %+v, %v; want credential %s", s2, err, s1.ID)
	}
	if _, err := b.add("someone", "shared"); !errors.Is(err, ErrCredentialExists) {
		t.Fatalf("the same secret under another name: %v", err)
	}
	if m.saves != 8 {
		t.Fatalf("%d conflicts, want 8 (each change made on a stale copy)", m.saves)
	}
	rec, _ := m.Load(ctx, "db")
	f, err := decodeAccess(rec.Value)
	if err != nil {
		t.Fatal(err)
	}
	var users []string
	for _, c := range f.Credentials {
		users = append(users, c.userID())
	}
	if fmt.Sprint(users) != "[alice bob carol "+s1.ID+"]" || fmt.Sprint(f.RevokedUsers) != "[mallory]" || f.Clients["phone"] != "alice" {
		t.Fatalf("the record lost a change: users %v, revoked %v, clients %v", users, f.RevokedUsers, f.Clients)
	}
	for _, secret := range []string{"sa3", "sa2"} { // the current one and the one in its grace
		if c, err := b.check(secret); err != nil || c.userID() != "alice" {
			t.Fatalf("secret %s on b: %+v, %v", secret, c, err)
		}
	}
}

// TestRemoteChangeReachesSessions: a record another node changed reaches
// this server through its store's Watch: a database created there is
// served here, and a revocation there ends the matching sessions here
// (with CodeCredentialRevoked and the reason) and refuses their Hellos;
// a corrupt record changes nothing.
func TestRemoteChangeReachesSessions(t *testing.T) {
	m := newMemStore()
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.AccessStore = m; c.CredentialHashIterations = 1000 })
	ctx := context.Background()
	srv.AddSecret(ctx, "demo", "alice", "alice-secret")
	srv.AddSecret(ctx, "demo", "bob", "bob-secret")

	// A database another node made, with a secret it added.
	other, err := openAccess(ctx, storeRecord{m, "elsewhere"}, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.add("carol", "carol-secret"); err != nil {
		t.Fatal(err)
	}
	rec, _ := m.Load(ctx, "elsewhere")
	m.external("elsewhere", rec.Value)
	if !slices.Contains(srv.Databases(), "elsewhere") {
		t.Fatalf("databases %v: the one made elsewhere is unknown", srv.Databases())
	}
	conn := dial(t, addr, srv.Fingerprint())
	c, msg := openClient(t, conn, protocol.Hello{Database: "elsewhere", ClientID: "c1", Credential: "carol-secret"})
	welcome(t, msg)
	c.until(1)

	a1, msg := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "alice-secret"})
	welcome(t, msg)
	a1.until(1)
	b1, msg := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "b1", Credential: "bob-secret"})
	welcome(t, msg)
	b1.until(1)

	m.external("demo", []byte(`{"credentials":`)) // corrupt: nothing changes
	b1.push(1)
	b1.acked(1)

	good, err := srv.accessOf("demo")
	if err != nil {
		t.Fatal(err)
	}
	v := good.view()
	b, _ := encodeAccess(&v)
	m.external("demo", b) // repaired, as it was
	m.externalChange(t, "demo", func(f *accessFile) { f.RevokedUsers = append(f.RevokedUsers, "alice") })
	e := endsWith(t, a1, protocol.CodeCredentialRevoked, 2*time.Second)
	if !strings.Contains(e.Message, `user "alice" was revoked`) {
		t.Fatalf("ended with %q", e.Message)
	}
	_, msg = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a2", Credential: "alice-secret"})
	refusedWith(t, msg, protocol.CodeUnauthorized, `user "alice" was revoked`)
	b1.push(2)
	b1.acked(2) // bob's session goes on
}

// TestRefreshBeforeRefusing: a Hello for a database this server has not
// heard of, or with a secret its copy lacks, is checked against the
// store's record as it is now before it is refused (another node changed
// it, and the watch has not said so yet); a refusal stays a refusal.
func TestRefreshBeforeRefusing(t *testing.T) {
	m := newMemStore()
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.AccessStore = m; c.CredentialHashIterations = 1000 })
	ctx := context.Background()
	other, err := openAccess(ctx, storeRecord{m, "late"}, 1000) // another node's, whose saves nobody hears of
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.add("dave", "dave-secret"); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, addr, srv.Fingerprint())
	_, msg := openClient(t, conn, protocol.Hello{Database: "late", ClientID: "d1", Credential: "dave-secret"})
	welcome(t, msg)
	if _, err := other.add("erin", "erin-secret"); err != nil {
		t.Fatal(err)
	}
	before := m.refreshed()
	_, msg = openClient(t, conn, protocol.Hello{Database: "late", ClientID: "e1", Credential: "erin-secret"})
	welcome(t, msg)
	if m.refreshed() != before+1 {
		t.Fatalf("%d refreshes for a secret the copy lacked, want 1", m.refreshed()-before)
	}
	_, msg = openClient(t, conn, protocol.Hello{Database: "late", ClientID: "e2", Credential: "wrong"})
	refusedWith(t, msg, protocol.CodeUnauthorized, "wrong credential")
	_, msg = openClient(t, conn, protocol.Hello{Database: "nowhere", ClientID: "n1", Credential: "x"})
	refusedWith(t, msg, protocol.CodeUnknownDatabase, "nowhere")
	before = m.refreshed()
	_, msg = openClient(t, conn, protocol.Hello{Database: "late", ClientID: "d2", Credential: "dave-secret"})
	welcome(t, msg)
	if m.refreshed() != before {
		t.Fatal("a Hello that passed read the store")
	}
}

func addErr(_ credential, err error) error { return err }

// TestRemoteRotationGraceEndsSessions: a rotation made on another node
// with a grace leaves this node's sessions on the old secret open until
// the grace ends, and then ends them (this node arms the timer the
// rotating node arms for its own sessions).
func TestRemoteRotationGraceEndsSessions(t *testing.T) {
	m := newMemStore()
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.AccessStore = m; c.CredentialHashIterations = 1000 })
	ctx := context.Background()
	if _, err := srv.AddSecret(ctx, "demo", "alice", "alice-secret"); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, addr, srv.Fingerprint())
	a1, msg := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "alice-secret"})
	welcome(t, msg)
	a1.until(1)
	const grace = time.Second
	m.externalChange(t, "demo", func(f *accessFile) {
		i := f.find("alice")
		old := f.Credentials[i]
		f.Credentials[i].Gen = old.Gen + 1
		f.Credentials[i].Hash = []byte("another secret's hash, 32 bytes")
		f.Credentials[i].Prev = &prevSecret{Salt: old.Salt, Hash: old.Hash, Iter: old.iterations(), Gen: old.Gen, Until: time.Now().Add(grace)}
	})
	a1.push(1)
	a1.acked(1) // within the grace: goes on
	t.Cleanup(func() {
		if t.Failed() {
			a, _ := srv.accessOf("demo")
			f := a.view()
			for _, c := range f.Credentials {
				t.Logf("at %v: credential %s gen %d prev %+v", time.Now(), c.ID, c.Gen, c.Prev)
			}
		}
	})
	e := endsWith(t, a1, protocol.CodeCredentialRevoked, grace+3*time.Second)
	if !strings.Contains(e.Message, "rotated") {
		t.Fatalf("ended with %q", e.Message)
	}
}
