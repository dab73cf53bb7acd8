package server

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// authorize is the built-in admission of a secret, as admitDatabase runs
// it without the limiter: check, then bind.
func authorize(a *access, clientID, secret string) error {
	c, err := a.check(secret)
	if err != nil {
		return err
	}
	return a.bind(clientID, c.userID())
}

func TestAccess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.json")
	a, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.add("", "correct horse"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if bytes.Contains(b, []byte("correct horse")) {
		t.Fatal("the secret is stored in clear")
	}
	if err := authorize(a, "c1", "wrong"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("wrong secret: %v", err)
	}
	if err := authorize(a, "c1", "correct horse"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.add("", "second"); err != nil {
		t.Fatal(err)
	}
	if err := authorize(a, "c1", "second"); !errors.Is(err, errClientBound) {
		t.Fatalf("client id bound to one user accepted with another: %v", err)
	}
	// The binding survives a reload.
	a2, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if err := authorize(a2, "c1", "second"); !errors.Is(err, errClientBound) {
		t.Fatalf("binding lost on reload: %v", err)
	}
	if err := authorize(a2, "c2", "second"); err != nil {
		t.Fatal(err)
	}
}

// TestAccessNamedSecrets: a named secret speaks for its name; names are
// unique and may not take another credential's id; the same secret added
// again under its name is a no-op.
func TestAccessNamedSecrets(t *testing.T) {
	a, err := loadAccess(filepath.Join(t.TempDir(), "access.json"), 1000)
	if err != nil {
		t.Fatal(err)
	}
	alice, err := a.add("alice", "alice-secret")
	if err != nil {
		t.Fatal(err)
	}
	if alice.userID() != "alice" || alice.identity().UserID != "alice" || alice.identity().Credential != alice.ID {
		t.Fatalf("identity of a named secret: %+v", alice.identity())
	}
	if again, err := a.add("alice", "alice-secret"); err != nil || again.ID != alice.ID {
		t.Fatalf("adding the same secret again: %+v %v", again, err)
	}
	if _, err := a.add("alice", "other"); !errors.Is(err, ErrCredentialExists) {
		t.Fatalf("a second secret under a taken name: %v", err)
	}
	if _, err := a.add("bob", "alice-secret"); !errors.Is(err, ErrCredentialExists) {
		t.Fatalf("alice's secret under another name: %v", err)
	}
	if again, err := a.add("", "alice-secret"); err != nil || again.ID != alice.ID {
		t.Fatalf("alice's secret added unnamed (serve --db at a restart): %+v %v", again, err)
	}
	anon, err := a.add("", "anon")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.add(anon.ID, "impostor"); !errors.Is(err, ErrCredentialExists) {
		t.Fatalf("a name equal to another credential's id: %v", err)
	}
	if _, err := a.add(string(make([]byte, maxUserID+1)), "x"); err == nil {
		t.Fatal("a name over the bound accepted")
	}
}

// TestAccessMigration: an access file written before secrets had names
// binds client ids to credential ids; those are the unnamed secrets' user
// ids, so its clients keep working and stay bound.
func TestAccessMigration(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.json")
	old, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	c1, _ := old.add("", "one")
	c2, _ := old.add("", "two")
	// Write the file as the previous build did: no names, clients bound
	// to credential ids.
	f := map[string]any{
		"credentials": []map[string]any{
			{"id": c1.ID, "salt": c1.Salt, "hash": c1.Hash, "iter": 1000},
			{"id": c2.ID, "salt": c2.Salt, "hash": c2.Hash, "iter": 1000},
		},
		"clients": map[string]string{"phone": c1.ID},
	}
	b, _ := json.Marshal(f)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if err := authorize(a, "phone", "one"); err != nil {
		t.Fatalf("an old binding no longer works: %v", err)
	}
	if err := authorize(a, "phone", "two"); !errors.Is(err, errClientBound) {
		t.Fatalf("an old binding no longer binds: %v", err)
	}
}

// TestAccessRotateRevoke: rotation keeps the id and user and drops the
// old secret at once, though it was cached; revocation drops the secret
// and records its id; both survive a reload.
func TestAccessRotateRevoke(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.json")
	a, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := a.add("alice", "old")
	if err := authorize(a, "phone", "old"); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.cached("old"); !ok {
		t.Fatal("a verified secret is not cached")
	}
	r, err := a.rotate("alice", "new", 0)
	if err != nil || r.ID != c.ID || r.userID() != "alice" {
		t.Fatalf("rotate: %+v %v", r, err)
	}
	if _, ok := a.cached("old"); ok {
		t.Fatal("the old secret is still cached after rotation")
	}
	if err := authorize(a, "phone", "old"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("the old secret after rotation: %v", err)
	}
	if err := authorize(a, "phone", "new"); err != nil {
		t.Fatalf("the bound client with the new secret: %v", err)
	}
	if _, err := a.rotate("nobody", "x", 0); !errors.Is(err, ErrNoCredential) {
		t.Fatalf("rotate an unknown secret: %v", err)
	}
	if _, err := a.revoke(c.ID); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.cached("new"); ok {
		t.Fatal("a revoked secret is still cached")
	}
	if err := authorize(a, "phone", "new"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("a revoked secret: %v", err)
	}
	if why := a.revokedReason(Identity{UserID: "alice", Credential: c.ID}); why == "" {
		t.Fatal("a revoked credential is not reported revoked")
	}
	if err := a.revokeUser("mallory"); err != nil {
		t.Fatal(err)
	}
	b, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if err := authorize(b, "phone", "new"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("revocation lost on reload: %v", err)
	}
	if b.revokedReason(Identity{UserID: "mallory"}) == "" || b.revokedReason(Identity{UserID: "alice", Credential: c.ID}) == "" {
		t.Fatal("revocations lost on reload")
	}
	if b.revokedReason(Identity{UserID: "bob", Credential: "x"}) != "" {
		t.Fatal("an unrevoked identity reported revoked")
	}
}

// TestAccessSaveFailureChangesNothing: a change that cannot be saved does
// not take effect in memory either.
func TestAccessSaveFailureChangesNothing(t *testing.T) {
	dir := t.TempDir()
	a, err := loadAccess(filepath.Join(dir, "sub", "access.json"), 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.add("alice", "s"); err == nil {
		t.Fatal("saved into a directory that does not exist")
	}
	if f := a.view(); len(f.Credentials) != 0 {
		t.Fatalf("a failed save left %d credentials", len(f.Credentials))
	}
}

// TestAccessHashesUnlocked: while a check hashes a secret, the access
// lock is free: a cached secret is found and a client bound without
// waiting for it.
func TestAccessHashesUnlocked(t *testing.T) {
	a, err := loadAccess(filepath.Join(t.TempDir(), "access.json"), 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.add("alice", "good"); err != nil {
		t.Fatal(err)
	}
	if err := authorize(a, "phone", "good"); err != nil { // now cached
		t.Fatal(err)
	}
	hold, held := make(chan struct{}), make(chan struct{})
	a.hashing = func() { close(held); <-hold }
	done := make(chan error, 1)
	go func() { done <- authorize(a, "laptop", "bad") }()
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the bad check never reached its hashing")
	}
	ok := make(chan error, 1)
	go func() { ok <- authorize(a, "phone", "good") }()
	select {
	case err := <-ok:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a cached secret waited on another check's hashing: the lock is held while hashing")
	}
	close(hold)
	if err := <-done; !errors.Is(err, errWrongCredential) {
		t.Fatalf("bad check: %v", err)
	}
}

// TestAccessRotationDuringCheck: a secret verified against a credential
// that was rotated while it hashed is refused, and not cached.
func TestAccessRotationDuringCheck(t *testing.T) {
	a, err := loadAccess(filepath.Join(t.TempDir(), "access.json"), 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.add("alice", "old"); err != nil {
		t.Fatal(err)
	}
	a.hashing = func() {
		a.hashing = nil
		if _, err := a.rotate("alice", "new", 0); err != nil {
			t.Error(err)
		}
	}
	if _, err := a.check("old"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("a secret rotated during its check: %v", err)
	}
	if _, ok := a.cached("old"); ok {
		t.Fatal("the rotated secret was cached")
	}
}

// TestAccessRotateGrace: during a grace both secrets match, each with its
// generation; a second rotation drops the first's previous secret at once;
// the grace is reloaded from the file; past its end the old secret is
// refused and a session that presented it is told so.
func TestAccessRotateGrace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.json")
	a, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	a.add("alice", "s0")
	c0, err := a.check("s0")
	if err != nil {
		t.Fatal(err)
	}
	c1, err := a.rotate("alice", "s1", time.Hour)
	if err != nil || c1.Gen != c0.Gen+1 || c1.Prev == nil || c1.Prev.Gen != c0.Gen {
		t.Fatalf("rotate with grace: %+v %v", c1, err)
	}
	for secret, gen := range map[string]int{"s0": c0.Gen, "s1": c1.Gen} {
		m, err := a.check(secret)
		if err != nil || m.Gen != gen {
			t.Fatalf("check %s during the grace: gen %d, %v; want gen %d", secret, m.Gen, err, gen)
		}
		if why := a.revokedReason(m.identity()); why != "" {
			t.Fatalf("%s during the grace: %s", secret, why)
		}
	}
	if end := a.graceEnd(c0.identity()); end.IsZero() || !end.Equal(c1.Prev.Until) {
		t.Fatalf("grace end of the old secret's session: %v, want %v", end, c1.Prev.Until)
	}
	if end := a.graceEnd(c1.identity()); !end.IsZero() {
		t.Fatalf("grace end of the current secret's session: %v, want none", end)
	}

	// A second rotation in the grace: s0 is out at once, s1 in grace.
	c2, err := a.rotate("alice", "s2", time.Hour)
	if err != nil || c2.Gen != c1.Gen+1 {
		t.Fatalf("second rotation: %+v %v", c2, err)
	}
	if _, err := a.check("s0"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("s0 after a second rotation: %v", err)
	}
	if why := a.revokedReason(c0.identity()); !strings.Contains(why, "rotated") {
		t.Fatalf("a session on s0 after a second rotation: %q", why)
	}

	// Reloaded from the file, s1 is still in its grace (uncached: hashed).
	b, err := loadAccess(path, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := b.check("s1"); err != nil || m.Gen != c1.Gen {
		t.Fatalf("s1 after a reload: gen %d, %v", m.Gen, err)
	}
	// Past the grace's end (moved, not waited for) it is refused, cached
	// or not.
	b.mu.Lock()
	i := b.file.findID(c2.ID)
	b.file.Credentials[i].Prev.Until = time.Now().Add(-time.Second)
	b.mu.Unlock()
	if _, err := b.check("s1"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("s1 past its grace (cached): %v", err)
	}
	b.verified = map[[sha256.Size]byte]verifiedSecret{}
	if _, err := b.check("s1"); !errors.Is(err, errWrongCredential) {
		t.Fatalf("s1 past its grace (hashed): %v", err)
	}
	if why := b.revokedReason(c1.identity()); !strings.Contains(why, "rotated") {
		t.Fatalf("a session on s1 past its grace: %q", why)
	}
	if m, err := b.check("s2"); err != nil || m.Gen != c2.Gen {
		t.Fatalf("s2: gen %d, %v", m.Gen, err)
	}
}
