package mutators

import "context"

// Caller is who ran a mutation: the client that queued it and the user
// that client authenticated as. A mutator reads it with [CallerFrom] to
// enforce permissions ("a user may change only their own rows").
//
// On the server it is the identity of the session that pushed the
// mutation, as the server's authenticator established it: a group-commit
// batch mixes callers, and each mutator sees its own. On a replica it is
// the identity the app configured for its local user (replica.Options.User
// and Claims), so that the optimistic run and the server's run agree. Where
// they differ, the server's run wins: its result is what every replica
// rebases onto, and a mutation it rejects is rolled back everywhere.
type Caller struct {
	// ClientID is the replica that queued the mutation.
	ClientID string
	// UserID is the authenticated user: a JWT's "sub", or the name of the
	// shared secret the client presented. Empty only where no identity was
	// configured (a replica without Options.User, or an in-process
	// Authority fed mutations without one).
	UserID string
	// Claims are the token's claims as JSON values (nil for a secret). A
	// mutator must treat them as read-only.
	Claims map[string]any
}

type callerKey struct{}

// callerCtx carries a Caller. It is context.WithValue with the value held
// in place: one allocation per mutator run instead of two (the value
// context, and the Caller boxed into an interface), which the server pays
// for every mutation of every batch.
type callerCtx struct {
	context.Context
	c Caller
}

// Value returns the caller for callerKey, and defers to the parent for
// every other key.
func (c *callerCtx) Value(key any) any {
	if _, ok := key.(callerKey); ok {
		return &c.c
	}
	return c.Context.Value(key)
}

// WithCaller returns ctx carrying c, for [CallerFrom]. The replica and the
// server call it before each mutator runs; an app calls it only in tests of
// its own mutators.
func WithCaller(ctx context.Context, c Caller) context.Context {
	return &callerCtx{Context: ctx, c: c}
}

// CallerFrom returns the caller of the mutation ctx belongs to, and false
// when ctx carries none.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(*Caller)
	if !ok {
		return Caller{}, false
	}
	return *c, true
}
