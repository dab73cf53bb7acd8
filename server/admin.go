package server

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// Credentials managed while the server runs. Every change is saved to the
// database's access record (access.json, written atomically, or the
// cluster's KV bucket: Config.AccessStore) before it takes effect, so it
// survives a restart; the HTTP API of AdminHandler and `sqlrebase admin`
// are these calls.

// CredentialInfo names a stored secret: its id and the user it speaks for
// (its name, or its id for an unnamed secret). The secret itself is never
// kept.
type CredentialInfo struct {
	ID   string `json:"id"`
	User string `json:"user"`
}

// ClientInfo is a client id a database has seen.
type ClientInfo struct {
	ClientID string `json:"client_id"`
	// User is the user the client id is bound to.
	User string `json:"user"`
	// LastPush is when the server last took a push from it, to the hour
	// (zero: never, or not known: its record was collected).
	LastPush time.Time `json:"last_push,omitzero"`
	// Sessions is how many sessions the client has open now.
	Sessions int `json:"sessions"`
}

// UserInfo is a user a database knows: one with a secret, one a client id
// is bound to, or one revoked.
type UserInfo struct {
	User string `json:"user"`
	// Credentials are the ids of the user's secrets.
	Credentials []string `json:"credentials,omitempty"`
	// Clients is how many client ids are bound to the user.
	Clients int `json:"clients"`
	// Sessions is how many sessions the user has open now.
	Sessions int `json:"sessions"`
	// Revoked says the user was cut off (RevokeUser).
	Revoked bool `json:"revoked,omitempty"`
}

// access returns the named database's access file.
func (s *Server) accessOf(db string) (*access, error) {
	t, err := s.tenant(db)
	if err != nil {
		return nil, err
	}
	return t.credentials(s.openTenantAccess)
}

// AddSecret adds a secret for db, named user (empty: unnamed, its user
// is its id). Adding a secret the database has under the same name does
// nothing; under another name, or a name taken, is ErrCredentialExists.
func (s *Server) AddSecret(_ context.Context, db, user, secret string) (CredentialInfo, error) {
	if secret == "" {
		return CredentialInfo{}, fmt.Errorf("%w: empty secret", ErrInvalid)
	}
	if user != "" {
		if err := validUserID(user); err != nil {
			return CredentialInfo{}, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	a, err := s.accessOf(db)
	if err != nil {
		return CredentialInfo{}, err
	}
	c, err := a.add(user, secret)
	if err != nil {
		return CredentialInfo{}, err
	}
	return CredentialInfo{ID: c.ID, User: c.userID()}, nil
}

// RotateSecret gives db's secret ref (its id or name) a new value. It
// keeps its id and user, so the client ids bound to it keep working with
// the new secret. The old secret is still accepted for grace (0: refused
// at once; at most a week), saved with its end so that it survives a
// restart; when the grace ends, the sessions opened with the old secret
// end with protocol.CodeCredentialRevoked (retryable: a replica
// reconnects, with the new secret if its token source gives it, and is
// otherwise refused as unauthorized). A rotation during an earlier one's
// grace ends that earlier secret's sessions at once.
func (s *Server) RotateSecret(_ context.Context, db, ref, secret string, grace time.Duration) (CredentialInfo, error) {
	if secret == "" {
		return CredentialInfo{}, fmt.Errorf("%w: empty secret", ErrInvalid)
	}
	if grace < 0 || grace > maxRotationGrace {
		return CredentialInfo{}, fmt.Errorf("%w: grace %v is not within 0 to %v", ErrInvalid, grace, maxRotationGrace)
	}
	a, err := s.accessOf(db)
	if err != nil {
		return CredentialInfo{}, err
	}
	c, err := a.rotate(ref, secret, grace)
	if err != nil {
		return CredentialInfo{}, err
	}
	// The sessions of the secrets before the one replaced now (a grace
	// just cut short) end at once; those of the one replaced when the
	// grace ends. A session on the old secret admitted meanwhile has its
	// own timer (session.admit, access.graceEnd), so one admitted after a
	// restart ends on time too; these calls catch the ones already open.
	stale := func(before int) func(Identity) bool {
		return func(id Identity) bool { return id.secret && id.Credential == c.ID && id.secretGen < before }
	}
	msg := fmt.Sprintf("secret %s was rotated; reconnect with the new one", c.ID)
	n := 0
	if grace == 0 {
		n = s.endSessions(db, stale(c.Gen), msg)
	} else {
		n = s.endSessions(db, stale(c.Gen-1), msg)
		time.AfterFunc(grace, func() { s.endSessions(db, stale(c.Gen), msg) })
	}
	s.log.Info("rotated secret", "db", db, "credential", c.ID, "user", c.userID(), "grace", grace, "sessions_ended", n)
	return CredentialInfo{ID: c.ID, User: c.userID()}, nil
}

// RevokeSecret deletes db's secret ref (its id or name) and ends the open
// sessions that presented it, with protocol.CodeCredentialRevoked: they
// reconnect, and the secret is then refused (fatal). It returns how many
// sessions it ended.
func (s *Server) RevokeSecret(_ context.Context, db, ref string) (int, error) {
	a, err := s.accessOf(db)
	if err != nil {
		return 0, err
	}
	c, err := a.revoke(ref)
	if err != nil {
		return 0, err
	}
	n := s.endSessions(db, func(id Identity) bool { return id.Credential == c.ID },
		fmt.Sprintf("credential %s was revoked", c.ID))
	s.log.Info("revoked secret", "db", db, "credential", c.ID, "user", c.userID(), "sessions", n)
	return n, nil
}

// RevokeUser cuts user off from db, whatever credential it presents (a
// secret or a token): its open sessions end with
// protocol.CodeCredentialRevoked and its Hellos are refused from now on.
// It returns how many sessions it ended.
func (s *Server) RevokeUser(_ context.Context, db, user string) (int, error) {
	if err := validUserID(user); err != nil {
		return 0, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	a, err := s.accessOf(db)
	if err != nil {
		return 0, err
	}
	if err := a.revokeUser(user); err != nil {
		return 0, err
	}
	n := s.endSessions(db, func(id Identity) bool { return id.UserID == user },
		fmt.Sprintf("user %q was revoked", user))
	s.log.Info("revoked user", "db", db, "user", user, "sessions", n)
	return n, nil
}

// RestoreUser lifts RevokeUser's cut-off of user from db, saved before it
// takes effect: the user's Hellos are accepted again (each credential
// still has to be valid; a secret or token revoked by itself stays
// revoked). It reports whether the user was revoked.
func (s *Server) RestoreUser(_ context.Context, db, user string) (bool, error) {
	if err := validUserID(user); err != nil {
		return false, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	a, err := s.accessOf(db)
	if err != nil {
		return false, err
	}
	restored, err := a.restoreUser(user)
	if err != nil {
		return false, err
	}
	s.log.Info("restored user", "db", db, "user", user, "was_revoked", restored)
	return restored, nil
}

// sessionsOf returns the identities and client ids of db's open sessions
// (none if the database is not open: then it has none).
func (s *Server) sessionsOf(db string) (ids []Identity, clients []string) {
	s.eachSession(db, func(sess *session) {
		ids = append(ids, sess.identity)
		clients = append(clients, sess.clientID)
	})
	return ids, clients
}

// eachSession calls fn for each session subscribed to db, under the
// database's Authority.mu (the lock that guards its subscribers; fn takes
// at most a session's own mutex, which sits below it). The tenant's lock
// is let go before Authority.mu is taken.
func (s *Server) eachSession(db string, fn func(*session)) {
	t := s.reg.lookup(db)
	if t == nil {
		return
	}
	t.mu.Lock()
	d := t.db
	t.mu.Unlock()
	if d == nil {
		return
	}
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	for sess := range d.subs {
		fn(sess)
	}
}

// endSessions ends db's sessions whose identity match says, with
// CodeCredentialRevoked and msg, and returns how many. A session admitted
// but not yet subscribed is not found here; it checks the access file
// again once subscribed (session.admit), and a revocation records itself
// there before it calls this.
func (s *Server) endSessions(db string, match func(Identity) bool, msg string) int {
	n := 0
	s.eachSession(db, func(sess *session) {
		if match(sess.identity) {
			sess.fail(protocol.CodeCredentialRevoked, msg)
			n++
		}
	})
	return n
}

// endRevoked ends db's sessions that a's record no longer admits (their
// user or credential revoked, their secret rotated out), each with
// CodeCredentialRevoked and its reason, and returns how many: the way a
// change made on another node reaches the sessions here. It also arranges
// to look again when a rotated-out secret's grace ends, as RotateSecret
// does for the sessions of the node it ran on.
func (s *Server) endRevoked(db string, a *access) int {
	n := 0
	s.eachSession(db, func(sess *session) {
		if why := a.revokedReason(sess.identity); why != "" {
			sess.fail(protocol.CodeCredentialRevoked, why)
			n++
		}
	})
	for _, end := range a.graceEnds() {
		s.endRevokedAt(db, a, end)
	}
	if n > 0 {
		s.log.Info("ended sessions the access record no longer admits", "db", db, "sessions", n)
	}
	return n
}

// endRevokedAt runs endRevoked once the wall clock has reached end. A
// grace's end is a wall-clock time (saved in the record) and a timer runs
// on the monotonic clock, so a timer may fire a little before it (the
// wall clock slewed): it then waits for the rest.
func (s *Server) endRevokedAt(db string, a *access, end time.Time) {
	time.AfterFunc(time.Until(end), func() {
		if time.Now().Before(end) {
			s.endRevokedAt(db, a, end)
			return
		}
		s.endRevoked(db, a)
	})
}

// Clients lists the client ids db has bound, each with its user, when it
// last pushed (read from the database, which this opens if needed) and
// its open sessions.
func (s *Server) Clients(ctx context.Context, db string) ([]ClientInfo, error) {
	a, err := s.accessOf(db)
	if err != nil {
		return nil, err
	}
	f := a.view()
	_, open := s.sessionsOf(db)
	pushed := map[string]int64{}
	err = s.WithAuthority(ctx, db, func(auth *Authority) error {
		rows, err := auth.Query(ctx, `SELECT client_id, last_push FROM `+mutators.TableActivity)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var id string
			var at sql.NullInt64
			if err := rows.Scan(&id, &at); err != nil {
				return err
			}
			pushed[id] = at.Int64
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("server: clients of %s: %w", db, err)
	}
	out := make([]ClientInfo, 0, len(f.Clients))
	for id, user := range f.Clients {
		ci := ClientInfo{ClientID: id, User: user}
		if at, ok := pushed[id]; ok && at > 0 {
			ci.LastPush = time.Unix(at, 0).UTC()
		}
		for _, c := range open {
			if c == id {
				ci.Sessions++
			}
		}
		out = append(out, ci)
	}
	slices.SortFunc(out, func(x, y ClientInfo) int { return strings.Compare(x.ClientID, y.ClientID) })
	return out, nil
}

// Users lists db's users: those with a secret, those a client id is bound
// to, and those revoked.
func (s *Server) Users(_ context.Context, db string) ([]UserInfo, error) {
	a, err := s.accessOf(db)
	if err != nil {
		return nil, err
	}
	f := a.view()
	ids, _ := s.sessionsOf(db)
	users := map[string]*UserInfo{}
	get := func(u string) *UserInfo {
		if users[u] == nil {
			users[u] = &UserInfo{User: u}
		}
		return users[u]
	}
	for _, c := range f.Credentials {
		u := get(c.userID())
		u.Credentials = append(u.Credentials, c.ID)
	}
	for _, u := range f.Clients {
		get(u).Clients++
	}
	for _, u := range f.RevokedUsers {
		get(u).Revoked = true
	}
	for _, id := range ids {
		get(id.UserID).Sessions++
	}
	out := make([]UserInfo, 0, len(users))
	for _, u := range users {
		out = append(out, *u)
	}
	slices.SortFunc(out, func(x, y UserInfo) int { return strings.Compare(x.User, y.User) })
	return out, nil
}
