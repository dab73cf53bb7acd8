package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/replica"
)

// servedAdmin is a `serve --admin` running in-process.
type servedAdmin struct {
	addr, fp, admin, tokenFile string
}

// startServeAdmin runs serve with --admin on dir and returns what it
// printed, and stop (idempotent), which the test's end calls too.
func startServeAdmin(t *testing.T, dir string, extra ...string) (servedAdmin, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	exited := make(chan int, 1)
	go func() {
		args := append([]string{"--data", dir, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"}, extra...)
		code := cmdServe(ctx, args, pw, io.Discard, nil)
		pw.Close()
		exited <- code
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case code := <-exited:
				if code != 0 {
					t.Errorf("serve exited %d", code)
				}
			case <-time.After(20 * time.Second):
				t.Error("serve did not stop")
			}
		})
	}
	t.Cleanup(stop)
	var s servedAdmin
	adminLine := regexp.MustCompile(`^admin: http://(\S+) \(token in (.+)\)$`)
	lines := bufio.NewScanner(pr)
	for (s.addr == "" || s.fp == "" || s.admin == "") && lines.Scan() {
		if v, ok := strings.CutPrefix(lines.Text(), "listening: "); ok {
			s.addr = v
		}
		if v, ok := strings.CutPrefix(lines.Text(), "fingerprint: "); ok {
			s.fp = v
		}
		if m := adminLine.FindStringSubmatch(lines.Text()); m != nil {
			s.admin, s.tokenFile = m[1], m[2]
		}
	}
	if s.addr == "" || s.fp == "" || s.admin == "" {
		t.Fatal("serve printed no address, fingerprint or admin address")
	}
	go io.Copy(io.Discard, pr)
	return s, stop
}

// admin runs `sqlrebase admin` against s and returns its exit status and
// output.
func (s servedAdmin) call(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), append([]string{"admin", "--addr", s.admin, "--token-file", s.tokenFile}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

// mustAdmin runs an admin command that must succeed.
func (s servedAdmin) mustAdmin(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errs := s.call(t, args...)
	if code != 0 {
		t.Fatalf("admin %v: exit %d: %s", args, code, errs)
	}
	return out
}

// TestAdminCLI: against a real server in-process, `sqlrebase admin`
// creates a database and secrets that replicas then use, lists clients
// and users, rotates (a bound client keeps working with the new secret)
// and revokes mid-session: the revoked replica's session ends, its
// reconnect is refused fatally as unauthorized, and its mutations stay
// queued; given a new secret, the same replica pushes them and the
// server's total is exactly what it made.
func TestAdminCLI(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "d")
	s, _ := startServeAdmin(t, dir)
	if fi, err := os.Stat(s.tokenFile); err != nil || fi.Mode().Perm() != 0o600 || filepath.Dir(s.tokenFile) != dir {
		t.Fatalf("generated token file %s: %v %v", s.tokenFile, fi, err)
	}
	// A wrong token is refused.
	var errb bytes.Buffer
	if code := run(context.Background(), []string{"admin", "--addr", s.admin, "--token", "wrong", "users", "--db", "acme"}, io.Discard, &errb); code != 1 || !strings.Contains(errb.String(), "missing or wrong admin token") {
		t.Fatalf("wrong token: exit %d: %s", code, errb.String())
	}
	if code, _, errs := s.call(t, "add-secret", "--db", "acme"); code != 2 || !strings.Contains(errs, "--secret is required") {
		t.Fatalf("missing flag: %d %s", code, errs)
	}
	s.mustAdmin(t, "create-db", "--db", "acme")
	s.mustAdmin(t, "add-secret", "--db", "acme", "--user", "alice", "--secret", "alice-1")
	s.mustAdmin(t, "add-secret", "--db", "acme", "--user", "bob", "--secret", "bob-1")
	if code, _, errs := s.call(t, "add-secret", "--db", "acme", "--user", "alice", "--secret", "x"); code != 1 || !strings.Contains(errs, "409") {
		t.Fatalf("a taken name: %d %s", code, errs)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rdir := t.TempDir()
	open := func(name, user, secret string) *replica.Replica {
		t.Helper()
		r, err := replica.Open(ctx, filepath.Join(rdir, name+".db"), replica.Options{Mutators: demoRegistry(), User: user,
			Remote: &replica.Remote{Addr: s.addr, Database: "acme", Credential: secret, Fingerprint: s.fp}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	food := func(r *replica.Replica) int64 {
		t.Helper()
		var n int64
		if err := r.DB().QueryRowContext(ctx, `SELECT coalesce(sum(count),0) FROM Categories WHERE name = 'Food'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	alice := open("alice", "alice", "alice-1")
	h, err := alice.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	out := s.mustAdmin(t, "clients", "--db", "acme")
	if !regexp.MustCompile(`(?m)^\S+\s+alice\s+\d{4}-\d\d-\d\dT\S+\s+1$`).MatchString(out) {
		t.Fatalf("clients:\n%s", out)
	}
	out = s.mustAdmin(t, "users", "--db", "acme")
	if !regexp.MustCompile(`(?m)^alice\s+[0-9a-f]{16}\s+1\s+1\s+false$`).MatchString(out) || !strings.Contains(out, "bob") {
		t.Fatalf("users:\n%s", out)
	}

	// Rotation: alice's client id stays hers with the new secret.
	s.mustAdmin(t, "rotate-secret", "--db", "acme", "--id", "alice", "--secret", "alice-2", "--grace", "30s")
	alice.Close()
	alice = open("alice", "alice", "alice-2")
	if err := alice.WaitConnected(ctx); err != nil {
		t.Fatalf("alice with the rotated secret: %v", err)
	}

	// Revocation mid-session, while alice keeps mutating: her session
	// ends at once; the reconnect is refused for good.
	var made atomic.Int64
	made.Store(1)
	stopMaking := make(chan struct{})
	madeAll := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stopMaking:
				madeAll <- nil
				return
			default:
			}
			if _, err := alice.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
				madeAll <- err
				return
			}
			made.Add(1)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	time.Sleep(100 * time.Millisecond)
	out = s.mustAdmin(t, "revoke-secret", "--db", "acme", "--id", "alice")
	if !strings.Contains(out, "ended 1 sessions") {
		t.Fatalf("revoke-secret: %s", out)
	}
	err = alice.WaitConnected(ctx)
	deadline := time.Now().Add(30 * time.Second)
	for err == nil && time.Now().Before(deadline) { // still the old session's view: wait for the refusal
		time.Sleep(10 * time.Millisecond)
		err = alice.WaitConnected(ctx)
	}
	var re *protocol.RemoteError
	if !errors.As(err, &re) || re.Code != protocol.CodeUnauthorized {
		t.Fatalf("alice after revocation: %v, want a fatal unauthorized", err)
	}
	close(stopMaking)
	if err := <-madeAll; err != nil {
		t.Fatal(err)
	}
	// Made after sync stopped: queued, not lost.
	if _, err := alice.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1)); err != nil {
		t.Fatal(err)
	}
	made.Add(1)
	pending := int64(len(alice.Pending()))

	bob := open("bob", "bob", "bob-1")
	// bobSees confirms a mutation of bob's (another category): his replica
	// is then at a version after everything the server had applied.
	bobSees := func() {
		t.Helper()
		h, err := bob.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Work", 1))
		if err != nil {
			t.Fatal(err)
		}
		if err := h.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	bobSees()
	onServer := food(bob)
	// Queued includes what the server applied but could not acknowledge
	// before the session ended: it is deduplicated when pushed again.
	if onServer > made.Load() || onServer+pending < made.Load() || pending == 0 {
		t.Fatalf("%d made by alice, %d on the server, %d still queued", made.Load(), onServer, pending)
	}
	t.Logf("alice made %d: %d on the server, %d queued after revocation", made.Load(), onServer, pending)
	// A new secret for alice: the same replica file (its client id bound
	// to alice) pushes what it kept, each mutation exactly once.
	s.mustAdmin(t, "add-secret", "--db", "acme", "--user", "alice", "--secret", "alice-3")
	alice.Close()
	alice = open("alice", "alice", "alice-3")
	if err := alice.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	// Sync waits for bob's own pushes only: a mutation of his, confirmed,
	// puts his replica at a version after alice's pushes.
	bobSees()
	if got := food(bob); got != made.Load() || len(alice.Pending()) != 0 {
		t.Fatalf("after alice's new secret: %d on the server, %d pending, %d made", got, len(alice.Pending()), made.Load())
	}
	s.mustAdmin(t, "revoke-user", "--db", "acme", "--user", "bob")
	bob.Close()
	alice.Close()
}

// TestAdminCLIRestart: what the admin CLI changed is there after serve
// restarts on the same directory, with the same generated token.
func TestAdminCLIRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "d")
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokenFile, []byte("operator-chosen-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	func() {
		s, stop := startServeAdmin(t, dir, "--admin-token-file", tokenFile)
		defer stop()
		if s.tokenFile != tokenFile {
			t.Fatalf("serve used %s, not --admin-token-file", s.tokenFile)
		}
		s.mustAdmin(t, "create-db", "--db", "acme")
		s.mustAdmin(t, "add-secret", "--db", "acme", "--user", "alice", "--secret", "a")
		s.mustAdmin(t, "add-secret", "--db", "acme", "--user", "bob", "--secret", "b")
		s.mustAdmin(t, "revoke-user", "--db", "acme", "--user", "bob")
	}()
	s, _ := startServeAdmin(t, dir, "--admin-token-file", tokenFile)
	out := s.mustAdmin(t, "users", "--db", "acme")
	if !regexp.MustCompile(`(?m)^alice\s+[0-9a-f]{16}\s+0\s+0\s+false$`).MatchString(out) || !regexp.MustCompile(`(?m)^bob\s+\S+\s+0\s+0\s+true$`).MatchString(out) {
		t.Fatalf("users after restart:\n%s", out)
	}
	if out := s.mustAdmin(t, "restore-user", "--db", "acme", "--user", "bob"); !strings.Contains(out, "restored user bob") {
		t.Fatalf("restore-user said %q", out)
	}
	if out := s.mustAdmin(t, "users", "--db", "acme"); !regexp.MustCompile(`(?m)^bob\s+\S+\s+0\s+0\s+false$`).MatchString(out) {
		t.Fatalf("users after restore-user:\n%s", out)
	}
	if out := s.mustAdmin(t, "restore-user", "--db", "acme", "--user", "bob"); !strings.Contains(out, "was not revoked") {
		t.Fatalf("restore-user again said %q", out)
	}
}

// TestAdminCLIRotateWithTokenSource: a rotation without grace ends the
// session of a replica whose token source gives its secret; once the source
// gives the new secret, the replica reconnects and goes on, and the
// server's total is exactly what it made.
func TestAdminCLIRotateWithTokenSource(t *testing.T) {
	s, _ := startServeAdmin(t, filepath.Join(t.TempDir(), "d"))
	s.mustAdmin(t, "create-db", "--db", "acme")
	s.mustAdmin(t, "add-secret", "--db", "acme", "--user", "alice", "--secret", "alice-1")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var secret atomic.Value
	secret.Store("alice-1")
	var connects atomic.Int64 // the source is called on every connect
	r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "alice.db"), replica.Options{Mutators: demoRegistry(), User: "alice",
		Remote: &replica.Remote{Addr: s.addr, Database: "acme", Fingerprint: s.fp,
			Token: func(context.Context) (string, error) { connects.Add(1); return secret.Load().(string), nil }}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	mutate := func() {
		t.Helper()
		h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
		if err != nil {
			t.Fatal(err)
		}
		if err := h.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	mutate()
	before := connects.Load()
	secret.Store("alice-2")
	s.mustAdmin(t, "rotate-secret", "--db", "acme", "--id", "alice", "--secret", "alice-2")
	for range 5 {
		mutate()
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	var n int64
	if err := r.DB().QueryRowContext(ctx, `SELECT coalesce(sum(count),0) FROM Categories WHERE name = 'Food'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); n != 6 || len(r.Pending()) != 0 {
		t.Fatalf("after the rotation: Food = %d (want 6), %d pending, status %+v", n, len(r.Pending()), st)
	}
	if connects.Load() <= before {
		t.Fatalf("the replica did not reconnect after the rotation (%d connects, %d before)", connects.Load(), before)
	}
}
