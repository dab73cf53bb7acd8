package replica

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

// TestTokenSourceEveryConnect: the token source is asked before every
// connection attempt, not once: a replica whose server restarts presents a
// newly fetched token to the new one.
func TestTokenSourceEveryConnect(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	var calls atomic.Int64
	rm := ts.remote()
	rm.Credential = ""
	rm.Token = func(ctx context.Context) (string, error) {
		calls.Add(1)
		return testSecret, nil
	}
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 30*time.Second)
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatal(err)
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	first := calls.Load()
	if first < 1 {
		t.Fatalf("token source called %d times before the first session", first)
	}
	ts.restart()
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r)
	if calls.Load() <= first {
		t.Fatalf("token source called %d times in all, %d before the restart: not again for the new session", calls.Load(), first)
	}
	if got := categories(t, r.DB())["Food"]; got != 2 {
		t.Fatalf("Food = %d, want 2", got)
	}
}

// TestTokenSourceErrors: a failing token source is retried with backoff,
// and Status says why it is not connected; once it gives a token, the
// replica syncs. A source that returns ErrNoToken stops sync for good, and
// the pending mutation stays queued.
func TestTokenSourceErrors(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	idpDown := errors.New("identity provider unreachable")
	var calls atomic.Int64
	rm := ts.remote()
	rm.Credential = ""
	rm.Token = func(ctx context.Context) (string, error) {
		if calls.Add(1) <= 3 {
			return "", idpDown
		}
		return testSecret, nil
	}
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 30*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for st := r.Status(); !errors.Is(st.LastError, idpDown); st = r.Status() {
		if time.Now().After(deadline) {
			t.Fatalf("Status never showed the token source's error: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatalf("after the source recovered: %v", err)
	}
	if n := calls.Load(); n < 4 {
		t.Fatalf("connected after %d calls of a source that fails 3 times", n)
	}

	rm2 := ts.remote()
	rm2.Credential = ""
	rm2.Token = func(ctx context.Context) (string, error) {
		return "", errors.Join(errors.New("signed out"), ErrNoToken)
	}
	r2, err := Open(ctx, filepath.Join(t.TempDir(), "r2.db"), Options{Mutators: reg, Remote: rm2, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	h, err := r2.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := r2.WaitConnected(ctx); !errors.Is(err, ErrNoToken) || !strings.Contains(err.Error(), "signed out") {
		t.Fatalf("WaitConnected with a source out of tokens: %v", err)
	}
	if err := h.Wait(ctx); !errors.Is(err, ErrNoToken) {
		t.Fatalf("Wait: %v, want the fatal ErrNoToken", err)
	}
	if n := len(r2.Pending()); n != 1 {
		t.Fatalf("%d pending after sync stopped, want 1", n)
	}
}

// TestTokenExpiresMidSession: the server's authenticator issues identities
// that expire 300 ms after each Hello, and ends each session then with
// CodeCredentialExpired. A replica with a token source pushes increments
// throughout several expiries: it reconnects with a fresh token every
// time, the app sees no error, and at the end the server's count equals
// the mutations made (nothing lost, nothing applied twice) and the
// checksums agree.
func TestTokenExpiresMidSession(t *testing.T) {
	const life = 300 * time.Millisecond
	reg := testRegistry(t)
	var issued atomic.Int64
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) {
		c.Authenticator = server.AuthenticatorFunc(func(ctx context.Context, req server.AuthRequest) (server.Identity, error) {
			if !strings.HasPrefix(req.Credential, "tok-") {
				return server.Identity{}, &server.AuthError{Reason: "not a token"}
			}
			return server.Identity{UserID: "alice", Credential: req.Credential, Expires: time.Now().Add(life)}, nil
		})
	})
	rm := ts.remote()
	rm.Credential = ""
	rm.Token = func(ctx context.Context) (string, error) {
		return fmt.Sprintf("tok-%d", issued.Add(1)), nil
	}
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 60*time.Second)
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	var hs []*Handle
	end := time.Now().Add(5 * life)
	for time.Now().Before(end) {
		h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
		if err != nil {
			t.Fatal(err)
		}
		hs = append(hs, h)
		time.Sleep(2 * time.Millisecond)
	}
	for i, h := range hs {
		if err := h.Wait(ctx); err != nil {
			t.Fatalf("mutation %d: %v", i+1, err)
		}
	}
	converged(t, ts, r)
	if got := categories(t, authQuery{ts.srv.Authority(testDB)})["Food"]; got != int64(len(hs)) {
		t.Fatalf("server count %d after %d increments", got, len(hs))
	}
	sessions := r.stats.sessions.Load()
	if issued.Load() < 3 || sessions < 3 {
		t.Fatalf("%d tokens issued, %d sessions over %v of %v tokens: want several", issued.Load(), sessions, 5*life, life)
	}
	if st := r.Status(); !st.Connected && st.LastError != nil && !credentialEnded(st.LastError) {
		t.Fatalf("status after the test: %+v", st)
	}
	t.Logf("%d mutations, %d tokens, %d sessions", len(hs), issued.Load(), sessions)
}

// TestTokenRefusedAfterExpiry: once the session's token expires, the
// replica reconnects with the source's next token; a token the server then
// refuses for good stops sync with the server's reason, and the mutation
// made meanwhile stays queued.
func TestTokenRefusedAfterExpiry(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) {
		c.Authenticator = server.AuthenticatorFunc(func(ctx context.Context, req server.AuthRequest) (server.Identity, error) {
			if req.Credential != "good" {
				return server.Identity{}, &server.AuthError{Reason: "audience mismatch"}
			}
			return server.Identity{UserID: "alice", Expires: time.Now().Add(300 * time.Millisecond)}, nil
		})
	})
	var calls atomic.Int64
	hold := make(chan struct{})
	rm := ts.remote()
	rm.Credential = ""
	rm.Token = func(ctx context.Context) (string, error) {
		if calls.Add(1) == 1 {
			return "good", nil
		}
		select { // the second connection waits until the test has mutated
		case <-hold:
		case <-ctx.Done():
			return "", ctx.Err()
		}
		return "forged", nil
	}
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 30*time.Second)
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	for calls.Load() < 2 { // the session expired and the loop asked again
		select {
		case <-ctx.Done():
			t.Fatal("the token source was not asked again after the token expired")
		case <-time.After(5 * time.Millisecond):
		}
	}
	h2, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	close(hold)
	err = r.WaitConnected(ctx)
	var re *protocol.RemoteError
	if !errors.As(err, &re) || re.Code != protocol.CodeUnauthorized || !strings.Contains(re.Message, "audience mismatch") {
		t.Fatalf("after a refused token: %v, want unauthorized with the server's reason", err)
	}
	if err := h2.Wait(ctx); !errors.As(err, &re) {
		t.Fatalf("Wait of the mutation made meanwhile: %v, want the fatal refusal", err)
	}
	if p := r.Pending(); len(p) != 1 || p[0].ID != 2 {
		t.Fatalf("pending %+v, want mutation 2 still queued", p)
	}
}

// TestTokenRevokedMidSession: the secret a replica's token source hands out
// is revoked while the replica pushes; the server ends the session with
// CodeCredentialRevoked, and the replica reconnects with the source's new
// secret for the same user, with exact totals and no error to the app.
func TestTokenRevokedMidSession(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	ctx := waitCtx(t, 60*time.Second)
	if _, err := ts.srv.AddSecret(ctx, testDB, "alice", "alice-old"); err != nil {
		t.Fatal(err)
	}
	var rotating sync.RWMutex // held while the secret changes: no token is handed out meanwhile
	var current atomic.Value
	current.Store("alice-old")
	var calls atomic.Int64
	rm := ts.remote()
	rm.Credential = ""
	rm.Token = func(ctx context.Context) (string, error) {
		rotating.RLock()
		defer rotating.RUnlock()
		calls.Add(1)
		return current.Load().(string), nil
	}
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	var hs []*Handle
	mutate := func(n int) {
		for range n {
			h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
			if err != nil {
				t.Fatal(err)
			}
			hs = append(hs, h)
			time.Sleep(time.Millisecond)
		}
	}
	mutate(50)
	rotating.Lock()
	current.Store("alice-new")
	ended, err := ts.srv.RevokeSecret(ctx, testDB, "alice")
	if err == nil {
		_, err = ts.srv.AddSecret(ctx, testDB, "alice", "alice-new")
	}
	rotating.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if ended != 1 {
		t.Fatalf("revocation ended %d sessions, want the replica's one", ended)
	}
	mutate(50)
	for i, h := range hs {
		if err := h.Wait(ctx); err != nil {
			t.Fatalf("mutation %d: %v", i+1, err)
		}
	}
	converged(t, ts, r)
	if got := categories(t, authQuery{ts.srv.Authority(testDB)})["Food"]; got != int64(len(hs)) {
		t.Fatalf("server count %d after %d increments", got, len(hs))
	}
	if calls.Load() < 2 || r.stats.sessions.Load() < 2 {
		t.Fatalf("%d tokens, %d sessions: the replica did not reconnect with the new secret", calls.Load(), r.stats.sessions.Load())
	}
}
