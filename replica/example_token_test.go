package replica_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// Example_tokenSource: a replica that presents a short-lived token, fetched
// from a token source before every connection. The server's authenticator
// (here a function; server.JWTAuthenticator in production) says who the
// token belongs to and when it expires; the server ends the session then,
// and the replica fetches a fresh token and reconnects, without losing or
// repeating a mutation.
func Example_tokenSource() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "sqlrebase-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		log.Fatal(err)
	}

	srv, err := server.Open(ctx, server.Config{
		Dir: filepath.Join(dir, "server"), Mutators: reg,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		},
		Authenticator: server.AuthenticatorFunc(func(ctx context.Context, req server.AuthRequest) (server.Identity, error) {
			user, ok := strings.CutPrefix(req.Credential, "token-of-")
			if !ok {
				return server.Identity{}, &server.AuthError{Reason: "not a token"}
			}
			return server.Identity{UserID: user, Expires: time.Now().Add(time.Hour)}, nil
		}),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.AddDatabase(ctx, "demo", "unused"); err != nil {
		log.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}

	var fetched atomic.Int64
	r, err := replica.Open(ctx, filepath.Join(dir, "client.db"), replica.Options{
		Mutators: reg,
		User:     "alice", // what the mutators see locally: the token's user
		Remote: &replica.Remote{
			Addr: addr, Database: "demo", Fingerprint: srv.Fingerprint(),
			// Called before every connection: ask the identity provider
			// for a token (an error is retried with backoff;
			// replica.ErrNoToken stops sync).
			Token: func(ctx context.Context) (string, error) {
				fetched.Add(1)
				return "token-of-alice", nil
			},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 1))
	if err != nil {
		log.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("confirmed; tokens fetched:", fetched.Load())
	// Output:
	// confirmed; tokens fetched: 1
}
