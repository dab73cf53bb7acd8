package server_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// addOwnedTodo records who added a todo: the caller, as the server's
// authenticator established it (a JWT's "sub"), not anything the client
// says in its arguments.
func addOwnedTodo(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
	var a struct {
		ID    string `json:"id"`
		Title string `json:"title"`
	}
	if err := json.Unmarshal(args, &a); err != nil {
		return err
	}
	c, ok := mutators.CallerFrom(ctx)
	if !ok || c.UserID == "" {
		return errors.New("sign in to add todos")
	}
	_, err := tx.Exec(`INSERT INTO todos(id, title, owner) VALUES (?, ?, ?)`, a.ID, a.Title, c.UserID)
	return err
}

// ExampleNewJWTAuthenticator is a server whose users present JWTs from an
// identity provider, and a replica whose token source mints them (here with
// go-jose and a key made on the spot; an app asks its provider instead).
func ExampleNewJWTAuthenticator() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "jwt-server")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// The identity provider's signing key, and the key set it publishes
	// (the server reads the file, and reads it again when it changes).
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	set, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: pub, KeyID: "2026-03", Algorithm: string(jose.EdDSA), Use: "sig"}}})
	if err != nil {
		log.Fatal(err)
	}
	jwksFile := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(jwksFile, set, 0o644); err != nil {
		log.Fatal(err)
	}

	auth, err := server.NewJWTAuthenticator(server.JWTConfig{
		JWKSFile: jwksFile,
		Issuer:   "https://auth.example.com",
		Audience: "todo-sync",
		// Which databases a token opens: its "dbs" claim (the default).
	})
	if err != nil {
		log.Fatal(err)
	}
	reg := mutators.NewRegistry()
	reg.MustRegister("addOwnedTodo", addOwnedTodo)
	quiet := slog.New(slog.DiscardHandler)
	srv, err := server.Open(ctx, server.Config{
		Dir: filepath.Join(dir, "server"), Mutators: reg, Authenticator: auth, Logger: quiet,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(`CREATE TABLE todos(id TEXT PRIMARY KEY, title TEXT NOT NULL, owner TEXT NOT NULL)`)
			return err
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.CreateDatabase(ctx, "acme"); err != nil { // no secret: tokens grant access
		log.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}

	// The app's side: a token source, called before every connection.
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: jose.JSONWebKey{Key: priv, KeyID: "2026-03"}}, nil)
	if err != nil {
		log.Fatal(err)
	}
	token := func(ctx context.Context) (string, error) {
		return jwt.Signed(signer).Claims(map[string]any{
			"iss": "https://auth.example.com", "aud": "todo-sync", "sub": "alice",
			"exp": time.Now().Add(15 * time.Minute).Unix(), "dbs": []string{"acme"},
		}).Serialize()
	}
	r, err := replica.Open(ctx, filepath.Join(dir, "alice.db"), replica.Options{
		Mutators: reg, Logger: quiet,
		User:   "alice", // what the server will say: the optimistic run agrees with it
		Remote: &replica.Remote{Addr: addr, Database: "acme", Token: token, Fingerprint: srv.Fingerprint()},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	h, err := r.Mutate(ctx, "addOwnedTodo", json.RawMessage(`{"id":"t1","title":"write the report"}`))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	fmt.Println("confirmed:", h.Wait(wctx) == nil)
	var owner string
	rows, err := srv.Authority("acme").Query(ctx, `SELECT owner FROM todos WHERE id = 't1'`)
	if err != nil {
		log.Fatal(err)
	}
	for rows.Next() {
		rows.Scan(&owner)
	}
	rows.Close()
	fmt.Println("owner on the server:", owner)
	// Output:
	// confirmed: true
	// owner on the server: alice
}
