package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// adminCall makes one admin API call and decodes its JSON answer into out
// (if not nil); it returns the status.
func adminCall(t testing.TB, h http.Handler, token, method, path string, body any, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req := httptest.NewRequest(method, path, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if out != nil && rec.Code < 300 {
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			t.Fatalf("%s %s: %v in %q", method, path, err, rec.Body.String())
		}
	}
	return rec.Code
}

// refusedWith opens a session and wants it refused with code, saying says.
func refusedWith(t testing.TB, m protocol.Message, code protocol.Code, says string) {
	t.Helper()
	e, ok := m.(*protocol.Error)
	if !ok || e.Code != code || !strings.Contains(e.Message, says) {
		t.Fatalf("got %#v, want code %v saying %q", m, code, says)
	}
}

// endsWith reads the session until an Error and wants code within
// within (versions and acks before it are fine).
func endsWith(t testing.TB, c *client, code protocol.Code, within time.Duration) *protocol.Error {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c.stream.SetReadDeadline(deadline)
		m, err := c.r.Read()
		if err != nil {
			t.Fatalf("session did not end with code %v within %v: %v", code, within, err)
		}
		if e, ok := m.(*protocol.Error); ok {
			if e.Code != code {
				t.Fatalf("ended with %v, want %v", e.Err(), code)
			}
			return e
		}
	}
}

func TestAdminAPI(t *testing.T) {
	srv, _ := testServer(t, t.TempDir(), func(c *Config) { c.CredentialHashIterations = 1000 })
	h := srv.AdminHandler("tok")
	// Without the token, or with a wrong one, nothing is done.
	for _, tok := range []string{"", "wrong", "tok2"} {
		if code := adminCall(t, h, tok, "POST", "/v1/databases", map[string]string{"name": "acme"}, nil); code != http.StatusUnauthorized {
			t.Fatalf("token %q: status %d", tok, code)
		}
	}
	if code := adminCall(t, srv.AdminHandler(""), "", "GET", "/v1/databases/demo/users", nil, nil); code != http.StatusUnauthorized {
		t.Fatalf("a handler with no token answered %d", code)
	}
	if len(srv.Databases()) != 1 {
		t.Fatal("an unauthorized call created a database")
	}
	if code := adminCall(t, h, "tok", "POST", "/v1/databases", map[string]string{"name": "acme"}, nil); code != http.StatusCreated {
		t.Fatalf("create: %d", code)
	}
	if code := adminCall(t, h, "tok", "POST", "/v1/databases", map[string]string{"name": "../x"}, nil); code != http.StatusBadRequest {
		t.Fatalf("create a bad name: %d", code)
	}
	var alice CredentialInfo
	if code := adminCall(t, h, "tok", "POST", "/v1/databases/acme/secrets", map[string]string{"user": "alice", "secret": "a1"}, &alice); code != http.StatusCreated || alice.User != "alice" || alice.ID == "" {
		t.Fatalf("add secret: %d %+v", code, alice)
	}
	cases := []struct {
		method, path string
		body         any
		want         int
	}{
		{"POST", "/v1/databases/acme/secrets", map[string]string{"user": "alice", "secret": "other"}, http.StatusConflict},
		{"POST", "/v1/databases/acme/secrets", map[string]string{"user": "bob"}, http.StatusBadRequest},
		{"POST", "/v1/databases/acme/secrets", map[string]string{"user": "bob", "secret": "b", "extra": "x"}, http.StatusBadRequest},
		{"POST", "/v1/databases/nosuch/secrets", map[string]string{"user": "bob", "secret": "b"}, http.StatusNotFound},
		{"PUT", "/v1/databases/acme/secrets/nobody", map[string]string{"secret": "x"}, http.StatusNotFound},
		{"PUT", "/v1/databases/acme/secrets/alice", map[string]string{"secret": "x", "grace": "soon"}, http.StatusBadRequest},
		{"PUT", "/v1/databases/acme/secrets/alice", map[string]string{"secret": "x", "grace": "-1s"}, http.StatusBadRequest},
		{"PUT", "/v1/databases/acme/secrets/alice", map[string]string{"secret": "x", "grace": "1000h"}, http.StatusBadRequest},
		{"DELETE", "/v1/databases/acme/secrets/nobody", nil, http.StatusNotFound},
		{"GET", "/v1/databases/nosuch/clients", nil, http.StatusNotFound},
		{"POST", "/v1/databases/nosuch/users/mallory/restore", nil, http.StatusNotFound},
	}
	for _, c := range cases {
		if code := adminCall(t, h, "tok", c.method, c.path, c.body, nil); code != c.want {
			t.Errorf("%s %s %v: %d, want %d", c.method, c.path, c.body, code, c.want)
		}
	}
	var rotated CredentialInfo
	if code := adminCall(t, h, "tok", "PUT", "/v1/databases/acme/secrets/alice", map[string]string{"secret": "a2", "grace": "30s"}, &rotated); code != http.StatusOK || rotated != alice {
		t.Fatalf("rotate: %d %+v, want %+v", code, rotated, alice)
	}
	var users []UserInfo
	if code := adminCall(t, h, "tok", "GET", "/v1/databases/acme/users", nil, &users); code != http.StatusOK || len(users) != 1 || users[0].User != "alice" || len(users[0].Credentials) != 1 {
		t.Fatalf("users: %d %+v", code, users)
	}
	var ended map[string]int
	if code := adminCall(t, h, "tok", "POST", "/v1/databases/acme/users/mallory/revoke", nil, &ended); code != http.StatusOK || ended["ended"] != 0 {
		t.Fatalf("revoke user: %d %v", code, ended)
	}
	if code := adminCall(t, h, "tok", "DELETE", "/v1/databases/acme/secrets/"+alice.ID, nil, &ended); code != http.StatusOK {
		t.Fatalf("revoke secret: %d", code)
	}
	users = nil
	adminCall(t, h, "tok", "GET", "/v1/databases/acme/users", nil, &users)
	if len(users) != 1 || users[0].User != "mallory" || !users[0].Revoked {
		t.Fatalf("users after revocations: %+v", users)
	}
	var restored map[string]bool
	if code := adminCall(t, h, "tok", "POST", "/v1/databases/acme/users/mallory/restore", nil, &restored); code != http.StatusOK || !restored["restored"] {
		t.Fatalf("restore user: %d %v", code, restored)
	}
	users = nil
	adminCall(t, h, "tok", "GET", "/v1/databases/acme/users", nil, &users)
	if len(users) != 0 {
		t.Fatalf("users after restoring the only one: %+v", users)
	}
}

// TestClientIDOfAnotherUser: a client id is bound to the user that first
// used it; another user's secret cannot open a session as that client (so
// it can neither push nor read its acks), and nothing changes.
func TestClientIDOfAnotherUser(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.CredentialHashIterations = 1000 })
	ctx := context.Background()
	for _, u := range []string{"alice", "bob"} {
		if _, err := srv.AddSecret(ctx, "demo", u, u+"-secret"); err != nil {
			t.Fatal(err)
		}
	}
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "phone", Credential: "alice-secret"})
	welcome(t, m)
	c.until(1)
	c.push(1)
	c.acked(1)
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "phone", Credential: "bob-secret"})
	refusedWith(t, m, protocol.CodeUnauthorized, "client id phone belongs to another user")
	// Alice on another stream is still herself.
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "phone", Credential: "alice-secret", Version: c.im.version, Checksum: c.im.sums.Sum()})
	if w := welcome(t, m); w.LastMutationID != 1 {
		t.Fatalf("alice's welcome %+v", w)
	}
	if n := sumOf(t, srv.Authority("demo"), "Food"); n != 1 {
		t.Fatalf("Food = %d, want 1", n)
	}
	cs, err := srv.Clients(ctx, "demo")
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 || cs[0].ClientID != "phone" || cs[0].User != "alice" || cs[0].LastPush.IsZero() || cs[0].Sessions != 2 {
		t.Fatalf("clients: %+v", cs)
	}
}

// TestRevokeSecretEndsSessions: revoking a secret ends its live sessions
// within 1 s with CodeCredentialRevoked and leaves the others open; the
// secret is then refused (fatal).
func TestRevokeSecretEndsSessions(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.CredentialHashIterations = 1000 })
	ctx := context.Background()
	alice, _ := srv.AddSecret(ctx, "demo", "alice", "alice-secret")
	srv.AddSecret(ctx, "demo", "bob", "bob-secret")
	conn := dial(t, addr, srv.Fingerprint())
	var as []*client
	for _, id := range []string{"a1", "a2"} {
		c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: id, Credential: "alice-secret"})
		welcome(t, m)
		c.until(1)
		as = append(as, c)
	}
	b, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "b1", Credential: "bob-secret"})
	welcome(t, m)
	b.until(1)
	n, err := srv.RevokeSecret(ctx, "demo", "alice")
	if err != nil || n != 2 {
		t.Fatalf("revoke: %d sessions, %v", n, err)
	}
	for _, c := range as {
		e := endsWith(t, c, protocol.CodeCredentialRevoked, time.Second)
		if !strings.Contains(e.Message, alice.ID) {
			t.Fatalf("revoked session told %q", e.Message)
		}
	}
	b.push(1)
	b.acked(1) // bob's session goes on
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "alice-secret"})
	refusedWith(t, m, protocol.CodeUnauthorized, "wrong credential")
	if !protocol.CodeUnauthorized.Fatal() || protocol.CodeCredentialRevoked.Fatal() {
		t.Fatal("revoked must be retried (reconnect), unauthorized must be fatal")
	}
}

// TestRevokeUserEndsSessions: revoking a user ends the sessions of that
// user whatever their credential (here tokens of an app authenticator),
// and refuses the user's Hellos from then on, after a restart too.
func TestRevokeUserEndsSessions(t *testing.T) {
	dir := t.TempDir()
	tokens := func(c *Config) {
		c.Authenticator = AuthenticatorFunc(func(ctx context.Context, req AuthRequest) (Identity, error) {
			user, ok := strings.CutPrefix(req.Credential, "token-of-")
			if !ok {
				return Identity{}, &AuthError{Reason: "not a token"}
			}
			return Identity{UserID: user, Credential: "jti-" + req.ClientID}, nil
		})
	}
	srv, addr := testServer(t, dir, tokens)
	conn := dial(t, addr, srv.Fingerprint())
	m1, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "m1", Credential: "token-of-mallory"})
	welcome(t, m)
	a1, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "token-of-alice"})
	welcome(t, m)
	a1.until(1)
	if n, err := srv.RevokeUser(context.Background(), "demo", "mallory"); err != nil || n != 1 {
		t.Fatalf("revoke user: %d, %v", n, err)
	}
	endsWith(t, m1, protocol.CodeCredentialRevoked, time.Second)
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "m2", Credential: "token-of-mallory"})
	refusedWith(t, m, protocol.CodeUnauthorized, `user "mallory" was revoked`)
	a1.push(1)
	a1.acked(1)
	srv.Close()

	srv, addr = testServer(t, dir, tokens)
	conn = dial(t, addr, srv.Fingerprint())
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "m3", Credential: "token-of-mallory"})
	refusedWith(t, m, protocol.CodeUnauthorized, `user "mallory" was revoked`)
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "token-of-alice"})
	welcome(t, m)

	// Restoring lifts the cut-off, and that is saved too.
	if ok, err := srv.RestoreUser(context.Background(), "demo", "mallory"); err != nil || !ok {
		t.Fatalf("restore user: %v, %v", ok, err)
	}
	if ok, err := srv.RestoreUser(context.Background(), "demo", "mallory"); err != nil || ok {
		t.Fatalf("restore a user not revoked: %v, %v (want false, nil)", ok, err)
	}
	if _, err := srv.RestoreUser(context.Background(), "demo", ""); !errors.Is(err, ErrInvalid) {
		t.Fatalf("restore no user: %v, want ErrInvalid", err)
	}
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "m3", Credential: "token-of-mallory"})
	welcome(t, m)
	srv.Close()
	srv, addr = testServer(t, dir, tokens)
	conn = dial(t, addr, srv.Fingerprint())
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "m1", Credential: "token-of-mallory"})
	welcome(t, m)
}

// TestAuthenticatorRefusals: an app authenticator's refusals reach the
// client with their reasons and codes; its internal errors do not leak.
func TestAuthenticatorRefusals(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) {
		c.Authenticator = AuthenticatorFunc(func(ctx context.Context, req AuthRequest) (Identity, error) {
			switch req.Credential {
			case "expired":
				return Identity{}, &AuthError{Reason: "token expired", Expired: true}
			case "audience":
				return Identity{}, &AuthError{Reason: "audience mismatch"}
			case "past":
				return Identity{UserID: "u", Expires: time.Now().Add(-time.Second)}, nil
			case "nobody":
				return Identity{}, nil
			case "broken":
				return Identity{}, errors.New("identity provider down: secret detail")
			case "short":
				return Identity{UserID: "u", Expires: time.Now().Add(200 * time.Millisecond)}, nil
			}
			return Identity{}, &AuthError{Reason: "no"}
		})
	})
	conn := dial(t, addr, srv.Fingerprint())
	for _, c := range []struct {
		cred string
		code protocol.Code
		says string
	}{
		{"expired", protocol.CodeCredentialExpired, "token expired"},
		{"audience", protocol.CodeUnauthorized, "audience mismatch"},
		{"past", protocol.CodeCredentialExpired, "expired"},
		{"nobody", protocol.CodeInternal, "could not open"},
		{"broken", protocol.CodeInternal, "could not open"},
	} {
		_, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "c-" + c.cred, Credential: c.cred})
		refusedWith(t, m, c.code, c.says)
	}
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "s", Credential: "short"})
	welcome(t, m)
	endsWith(t, c, protocol.CodeCredentialExpired, 5*time.Second)
}

// TestBadHellosRateLimited: 200 concurrent Hellos with wrong secrets from
// one address; those past the failure budget are refused at once with
// CodeRateLimited (no hashing), and a good Hello from the same address,
// whose secret was verified before, still succeeds during and after.
func TestBadHellosRateLimited(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) {
		c.MaxConnsPerAddr = 1000
		c.AuthFailureEvery = time.Hour // no refill during the test
		// Cheap hashes: under -race the default's ten bad checks at once
		// take longer than a client waits for its answer.
		c.CredentialHashIterations = 1000
	})
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "good", Credential: "s3cret"})
	welcome(t, m)
	c.stream.Close()
	conns := make([]*quic.Conn, 8) // as an attacker would: streams spread over connections
	for i := range conns {
		conns[i] = dial(t, addr, srv.Fingerprint())
	}
	const bad = 200
	var mu sync.Mutex
	codes := map[protocol.Code]int{}
	var wg sync.WaitGroup
	for i := range bad {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, m := openClient(t, conns[i%len(conns)], protocol.Hello{Database: "demo", ClientID: "bad", Credential: "guess-" + string(rune('a'+i%26))})
			e, ok := m.(*protocol.Error)
			mu.Lock()
			defer mu.Unlock()
			if !ok {
				codes[0]++
				return
			}
			codes[e.Code]++
		}()
	}
	wg.Wait()
	if codes[protocol.CodeUnauthorized] != defaultAuthFailureBurst || codes[protocol.CodeRateLimited] != bad-defaultAuthFailureBurst {
		t.Fatalf("refusals %v: want %d unauthorized (the budget) and the rest rate-limited", codes, defaultAuthFailureBurst)
	}
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "good", Credential: "s3cret"})
	welcome(t, m)
	// A secret never verified is refused at once from this address,
	// even a right one: its check would cost a hash.
	if _, err := srv.AddSecret(context.Background(), "demo", "late", "late-secret"); err != nil {
		t.Fatal(err)
	}
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "late", Credential: "late-secret"})
	refusedWith(t, m, protocol.CodeRateLimited, "too many failed credential checks")
	if protocol.CodeRateLimited.Fatal() {
		t.Fatal("rate limited must be retried")
	}
}

// TestAdminRestart: everything the admin calls change survives a restart:
// databases, named and rotated secrets, revocations, client bindings.
func TestAdminRestart(t *testing.T) {
	dir := t.TempDir()
	quiet := func(c *Config) {
		c.CredentialHashIterations = 1000
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	srv, addr := testServer(t, dir, quiet)
	ctx := context.Background()
	if err := srv.CreateDatabase(ctx, "acme"); err != nil {
		t.Fatal(err)
	}
	srv.AddSecret(ctx, "acme", "alice", "a1")
	srv.AddSecret(ctx, "acme", "bob", "b1")
	srv.AddSecret(ctx, "acme", "carol", "c1")
	conn := dial(t, addr, srv.Fingerprint())
	_, m := openClient(t, conn, protocol.Hello{Database: "acme", ClientID: "phone", Credential: "a1"})
	welcome(t, m)
	if _, err := srv.RotateSecret(ctx, "acme", "alice", "a2", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.RevokeSecret(ctx, "acme", "bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.RevokeUser(ctx, "acme", "carol"); err != nil {
		t.Fatal(err)
	}
	srv.Close()

	srv, addr = testServer(t, dir, quiet)
	conn = dial(t, addr, srv.Fingerprint())
	for _, c := range []struct {
		client, cred string
		code         protocol.Code
		says         string
	}{
		{"phone", "a1", protocol.CodeUnauthorized, "wrong credential"},
		{"laptop", "b1", protocol.CodeUnauthorized, "wrong credential"},
		{"tablet", "c1", protocol.CodeUnauthorized, `user "carol" was revoked`},
	} {
		_, m := openClient(t, conn, protocol.Hello{Database: "acme", ClientID: c.client, Credential: c.cred})
		refusedWith(t, m, c.code, c.says)
	}
	_, m = openClient(t, conn, protocol.Hello{Database: "acme", ClientID: "phone", Credential: "a2"})
	welcome(t, m)
	cs, err := srv.Clients(ctx, "acme")
	if err != nil || len(cs) != 1 || cs[0].User != "alice" {
		t.Fatalf("clients after restart: %+v %v", cs, err)
	}
}

// TestRefusedStreamsReleased: a refused stream is released on both sides,
// so one connection can be refused more times than its stream limit (256)
// and still open streams: the server does not keep refused streams.
func TestRefusedStreamsReleased(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	conn := dial(t, addr, srv.Fingerprint())
	for i := range 300 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		m, err := helloOnce(ctx, conn, protocol.Hello{Database: "nosuch", ClientID: "c"})
		cancel()
		if err != nil {
			t.Fatalf("refusal %d: %v (stream never released?)", i+1, err)
		}
		if e, ok := m.(*protocol.Error); !ok || e.Code != protocol.CodeUnknownDatabase {
			t.Fatalf("refusal %d: %#v", i+1, m)
		}
	}
}

// TestRevocationRacingAdmission: a revocation that lands after a Hello
// passed its revocation check but before its session subscribed (here:
// while the database opens for it) finds no session to end; the session's
// second look, once subscribed, ends it.
func TestRevocationRacingAdmission(t *testing.T) {
	var ended atomic.Int64 // sessions the revocation found; written by the Hello's goroutine
	var calls atomic.Int64
	e := racingAdmission(t, func(ctx context.Context, srv *Server) error {
		n, err := srv.RevokeUser(ctx, "demo", "alice")
		ended.Add(int64(n))
		calls.Add(1)
		return err
	})
	if !strings.Contains(e.Message, `user "alice" was revoked`) || calls.Load() != 1 || ended.Load() != 0 {
		t.Fatalf("revoked %d times, ending %d sessions; told %q", calls.Load(), ended.Load(), e.Message)
	}
}

// TestRotationRacingAdmission: a rotation without grace that lands after a
// Hello with the old secret was checked, before its session subscribed,
// still ends that session (its second look at the access file once
// subscribed sees the generation is no longer accepted).
func TestRotationRacingAdmission(t *testing.T) {
	var rotated atomic.Int64 // written by the Hello's goroutine
	e := racingAdmission(t, func(ctx context.Context, srv *Server) error {
		_, err := srv.RotateSecret(ctx, "demo", "alice", "b", 0)
		rotated.Add(1)
		return err
	})
	if !strings.Contains(e.Message, "rotated") || rotated.Load() != 1 {
		t.Fatalf("rotated %d times, told %q", rotated.Load(), e.Message)
	}
}

// racingAdmission opens a server with alice's secret "a" on "demo", makes
// change while the database opens for alice's Hello (after her credential
// was checked, before her session subscribed), and returns the Error that
// ends her welcomed session, which must be CodeCredentialRevoked within 1 s.
func racingAdmission(t *testing.T, change func(ctx context.Context, srv *Server) error) *protocol.Error {
	t.Helper()
	ctx := context.Background()
	cfg := Config{Dir: t.TempDir(), Mutators: testRegistry(t), Setup: demoSetup, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), CredentialHashIterations: 1000}
	srv, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.CreateDatabase(ctx, "demo"); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.AddSecret(ctx, "demo", "alice", "a"); err != nil {
		t.Fatal(err)
	}
	open := srv.reg.openDB
	srv.reg.openDB = func(ctx context.Context, tn *tenant) (*database, error) {
		if err := change(ctx, srv); err != nil {
			return nil, err
		}
		return open(ctx, tn)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "phone", Credential: "a"})
	welcome(t, m)
	return endsWith(t, c, protocol.CodeCredentialRevoked, time.Second)
}

// TestRotateSecretEndsOldSessions: a rotation without grace ends the
// sessions opened with the old secret within 1 s, with the retryable
// CodeCredentialRevoked; the old secret is then refused (fatal) and the
// new one opens the same client id.
func TestRotateSecretEndsOldSessions(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.CredentialHashIterations = 1000 })
	ctx := context.Background()
	srv.AddSecret(ctx, "demo", "alice", "old")
	srv.AddSecret(ctx, "demo", "bob", "bob-secret")
	conn := dial(t, addr, srv.Fingerprint())
	a, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "old"})
	welcome(t, m)
	a.until(1)
	b, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "b1", Credential: "bob-secret"})
	welcome(t, m)
	b.until(1)
	if _, err := srv.RotateSecret(ctx, "demo", "alice", "new", -time.Second); !errors.Is(err, ErrInvalid) {
		t.Fatalf("negative grace: %v, want ErrInvalid", err)
	}
	if _, err := srv.RotateSecret(ctx, "demo", "alice", "new", 0); err != nil {
		t.Fatal(err)
	}
	if e := endsWith(t, a, protocol.CodeCredentialRevoked, time.Second); !strings.Contains(e.Message, "rotated") {
		t.Fatalf("rotated-out session told %q", e.Message)
	}
	b.push(1)
	b.acked(1) // bob's session goes on
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "old"})
	refusedWith(t, m, protocol.CodeUnauthorized, "wrong credential")
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "new"})
	welcome(t, m)
}

// TestRotateSecretGrace: during a rotation's grace both secrets open
// sessions; when it ends, those on the old secret end (within 1 s of it)
// and the new secret's go on. The grace is saved: after a restart within
// it the old secret still opens a session, which ends when the grace does.
func TestRotateSecretGrace(t *testing.T) {
	dir := t.TempDir()
	tune := func(c *Config) { c.CredentialHashIterations = 1000 }
	srv, addr := testServer(t, dir, tune)
	ctx := context.Background()
	srv.AddSecret(ctx, "demo", "alice", "old")
	conn := dial(t, addr, srv.Fingerprint())
	before, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "old"})
	welcome(t, m)
	before.until(1)
	const grace = 1500 * time.Millisecond
	start := time.Now()
	if _, err := srv.RotateSecret(ctx, "demo", "alice", "new", grace); err != nil {
		t.Fatal(err)
	}
	during, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a2", Credential: "old"})
	welcome(t, m)
	during.until(1)
	fresh, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a3", Credential: "new"})
	welcome(t, m)
	fresh.until(1)
	before.push(1)
	before.acked(1) // the old secret's session goes on during the grace
	for _, c := range []*client{before, during} {
		endsWith(t, c, protocol.CodeCredentialRevoked, grace+time.Second)
	}
	if time.Since(start) < grace {
		t.Fatalf("old sessions ended after %v, before the grace of %v", time.Since(start), grace)
	}
	fresh.push(1)
	fresh.acked(1)
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "old"})
	refusedWith(t, m, protocol.CodeUnauthorized, "wrong credential")

	// A grace across a restart.
	const grace2 = 2 * time.Second
	start = time.Now()
	if _, err := srv.RotateSecret(ctx, "demo", "alice", "newer", grace2); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	files, _ := filepath.Glob(filepath.Join(dir, "*", "access.json"))
	if len(files) != 1 {
		files, _ = filepath.Glob(filepath.Join(dir, "*", "*", "access.json"))
	}
	if len(files) != 1 {
		t.Fatalf("access.json: found %v", files)
	}
	b, err := os.ReadFile(files[0])
	if err != nil || !strings.Contains(string(b), `"prev"`) || !strings.Contains(string(b), `"until"`) {
		t.Fatalf("access.json does not keep the grace: %v\n%s", err, b)
	}
	srv, addr = testServer(t, dir, tune)
	conn = dial(t, addr, srv.Fingerprint())
	after, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "new"})
	welcome(t, m)
	after.until(1)
	endsWith(t, after, protocol.CodeCredentialRevoked, grace2+time.Second)
	if time.Since(start) < grace2 {
		t.Fatalf("session after restart ended after %v, before the grace of %v", time.Since(start), grace2)
	}
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "new"})
	refusedWith(t, m, protocol.CodeUnauthorized, "wrong credential")
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "a1", Credential: "newer"})
	welcome(t, m)
}
