package server

import (
	"context"
	"fmt"
	"net"
	"time"
)

// AuthRequest is what a Hello presents to an [Authenticator].
type AuthRequest struct {
	// Database is the database the client asks for. It exists: an unknown
	// name is refused before any authenticator runs.
	Database string
	// ClientID is the replica's id, as the Hello gives it.
	ClientID string
	// Credential is the Hello's credential: a shared secret or a token.
	Credential string
	// Remote is the client's address.
	Remote net.Addr
}

// Identity is who a session speaks for, as an [Authenticator] established
// it. Every mutator the session pushes sees it through
// mutators.CallerFrom.
type Identity struct {
	// UserID is the user (a JWT's "sub", a secret's name). It must not be
	// empty: the server binds each client id to the UserID that first used
	// it, and refuses that client id to every other user.
	UserID string
	// Claims are the token's claims (nil for a secret).
	Claims map[string]any
	// Expires is when the credential stops being valid (zero: never). The
	// server ends the session then, with CodeCredentialExpired, and the
	// replica reconnects with a fresh token.
	Expires time.Time
	// Credential names what was presented, for revocation: a secret's id,
	// or a token's "jti" where it has one. Revoking it ends the sessions
	// that hold it.
	Credential string

	// secret says Credential is a stored secret's id (the built-in
	// authenticator's), and secretGen is the generation of the secret
	// presented: a rotation ends the sessions of the generations it
	// replaced once their grace is over.
	secret    bool
	secretGen int
}

// Authenticator decides whether a Hello may open a database, and as whom.
// It is called for every Hello, concurrently, with no server lock held; it
// must honour ctx. A refusal is an *[AuthError]; any other error is an
// internal failure (the client is told to retry later).
type Authenticator interface {
	Authenticate(ctx context.Context, req AuthRequest) (Identity, error)
}

// AuthenticatorFunc adapts a function to [Authenticator].
type AuthenticatorFunc func(ctx context.Context, req AuthRequest) (Identity, error)

// Authenticate calls f.
func (f AuthenticatorFunc) Authenticate(ctx context.Context, req AuthRequest) (Identity, error) {
	return f(ctx, req)
}

// AuthError is an authenticator's refusal, with a reason the client is
// shown ("token expired", "audience mismatch", "no access to database
// acme"). Expired refusals reach the client as CodeCredentialExpired (it
// fetches a fresh token and retries); all others as CodeUnauthorized, which
// is fatal.
type AuthError struct {
	Reason  string
	Expired bool
}

func (e *AuthError) Error() string { return fmt.Sprintf("unauthorized: %s", e.Reason) }
