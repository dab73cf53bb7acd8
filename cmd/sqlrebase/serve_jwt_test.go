package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

func mintHS256(t *testing.T, secret []byte, claims map[string]any) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: secret}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestServeJWT: serve --jwt-hs256-secret-file admits a replica whose token
// grants its database (a mutation is confirmed), and refuses one whose
// token grants another, fatally, saying why.
func TestServeJWT(t *testing.T) {
	dir := t.TempDir()
	secret := bytes.Repeat([]byte("k"), 32)
	secretFile := filepath.Join(dir, "hs256.secret")
	if err := os.WriteFile(secretFile, append(secret, '\n'), 0o600); err != nil { // a newline, as editors leave
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	exited := make(chan int, 1)
	go func() {
		code := cmdServe(ctx, []string{"--data", filepath.Join(dir, "d"), "--listen", "127.0.0.1:0", "--db", "acme",
			"--jwt-hs256-secret-file", secretFile, "--jwt-issuer", "https://auth.example", "--jwt-audience", "todo-sync"}, pw, io.Discard, nil)
		pw.Close()
		exited <- code
	}()
	defer func() {
		cancel()
		select {
		case code := <-exited:
			if code != 0 {
				t.Errorf("serve exited %d", code)
			}
		case <-time.After(20 * time.Second):
			t.Error("serve did not stop")
		}
	}()
	var addr, fp string
	lines := bufio.NewScanner(pr)
	for (addr == "" || fp == "") && lines.Scan() {
		if v, ok := strings.CutPrefix(lines.Text(), "listening: "); ok {
			addr = v
		}
		if v, ok := strings.CutPrefix(lines.Text(), "fingerprint: "); ok {
			fp = v
		}
	}
	if addr == "" || fp == "" {
		t.Fatal("serve printed no address or fingerprint")
	}
	go io.Copy(io.Discard, pr)

	claims := func(dbs ...string) map[string]any {
		return map[string]any{"iss": "https://auth.example", "aud": "todo-sync", "sub": "alice",
			"exp": time.Now().Add(time.Hour).Unix(), "dbs": dbs}
	}
	open := func(name, token string) *replica.Replica {
		t.Helper()
		r, err := replica.Open(ctx, filepath.Join(dir, name+".db"), replica.Options{Mutators: demoRegistry(), User: "alice",
			Remote: &replica.Remote{Addr: addr, Database: "acme", Credential: token, Fingerprint: fp}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()

	good := open("good", mintHS256(t, secret, claims("acme")))
	h, err := good.Mutate(wctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("work", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(wctx); err != nil {
		t.Fatalf("mutation with a good token: %v", err)
	}

	other := open("other", mintHS256(t, secret, claims("beta")))
	err = other.WaitConnected(wctx)
	if err == nil || !strings.Contains(err.Error(), `no access to database "acme"`) {
		t.Fatalf("token for another database: %v, want a fatal refusal that says why", err)
	}
}

// TestServeJWTFlagErrors: incomplete or contradictory JWT flags stop serve
// before it opens anything, saying what is missing.
func TestServeJWTFlagErrors(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "s")
	if err := os.WriteFile(secretFile, bytes.Repeat([]byte("k"), 32), 0o600); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(dir, "short")
	if err := os.WriteFile(short, []byte("tiny\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"--data", filepath.Join(dir, "d"), "--listen", "127.0.0.1:0"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no key", []string{"--db", "acme", "--jwt-issuer", "i", "--jwt-audience", "a"}, "JWT mode needs --jwt-jwks FILE or --jwt-hs256-secret-file FILE"},
		{"no audience", []string{"--db", "acme", "--jwt-hs256-secret-file", secretFile, "--jwt-issuer", "i"}, "needs --jwt-issuer and --jwt-audience"},
		{"short secret", []string{"--db", "acme", "--jwt-hs256-secret-file", short, "--jwt-issuer", "i", "--jwt-audience", "a"}, "has 4 bytes; at least 32"},
		{"missing jwks", []string{"--db", "acme", "--jwt-jwks", filepath.Join(dir, "nope.json"), "--jwt-issuer", "i", "--jwt-audience", "a"}, "no such file"},
		{"secret in jwt mode", []string{"--db", "acme:tok", "--jwt-hs256-secret-file", secretFile, "--jwt-issuer", "i", "--jwt-audience", "a"}, "tokens grant access, not secrets"},
		{"dbs claim alone", []string{"--db", "acme", "--jwt-dbs-claim", "tenants"}, "JWT mode needs --jwt-jwks FILE or --jwt-hs256-secret-file FILE"},
		{"name alone without jwt", []string{"--db", "acme"}, "want NAME:SECRET (NAME alone only with --jwt-*)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			code := cmdServe(context.Background(), append(base, tc.args...), io.Discard, &stderr, nil)
			if code != 2 || !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("exit %d, stderr %q; want 2 and %q", code, stderr.String(), tc.want)
			}
		})
	}
}
