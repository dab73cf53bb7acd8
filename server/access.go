package server

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
	"unicode/utf8"
)

// hashIterations is the PBKDF2-SHA256 work factor of a stored credential.
// Operators choose the secrets, so they may be weak; the work factor makes a
// stolen access file expensive to guess from. A verified secret is cached in
// memory (by its SHA-256), so reconnects do not pay it again.
const hashIterations = 100_000

// maxUserID bounds a secret's name (its UserID), as a client id is bounded.
const maxUserID = 128

// maxRotationGrace bounds how long a rotated-out secret may still be
// accepted: a grace period is for replicas to pick up the new secret, not a
// second permanent credential.
const maxRotationGrace = 7 * 24 * time.Hour

// credential is a database credential as stored: never the secret itself.
type credential struct {
	ID string `json:"id"`
	// Name is the secret's user (Identity.UserID). Empty: an unnamed
	// secret, as `serve --db NAME:SECRET` adds, whose user is its id.
	Name string `json:"name,omitempty"`
	Salt []byte `json:"salt"`
	Hash []byte `json:"hash"`
	// Iter is the credential's PBKDF2 work factor (0: hashIterations, as
	// files written before it was stored say nothing).
	Iter int `json:"iter,omitempty"`
	// Gen counts the credential's rotations: a session remembers the
	// generation of the secret it presented, so that a rotation can end
	// the sessions of the secrets it replaced and only those.
	Gen int `json:"gen,omitempty"`
	// Prev is the secret the last rotation replaced, still accepted until
	// its Until (nil: none, or rotated without a grace period).
	Prev *prevSecret `json:"prev,omitempty"`
}

// prevSecret is a rotated-out secret still accepted during its grace
// period; stored with its expiry so that the grace survives a restart.
type prevSecret struct {
	Salt  []byte    `json:"salt"`
	Hash  []byte    `json:"hash"`
	Iter  int       `json:"iter,omitempty"`
	Gen   int       `json:"gen,omitempty"`
	Until time.Time `json:"until"`
}

// accepts says whether a session that presented c's secret of generation
// gen may go on at now: gen is c's current one, or the previous one while
// its grace lasts.
func (c *credential) accepts(gen int, now time.Time) bool {
	return gen == c.Gen || (c.Prev != nil && c.Prev.Gen == gen && now.Before(c.Prev.Until))
}

// iterations is c's work factor.
func (c *credential) iterations() int {
	if c.Iter > 0 {
		return c.Iter
	}
	return hashIterations
}

// userID is the user a session with c speaks for: its name, or for an
// unnamed secret its id. Files written before secrets had names bound
// client ids to credential ids, so those bindings name the same users.
func (c *credential) userID() string {
	if c.Name != "" {
		return c.Name
	}
	return c.ID
}

// identity is who a session with c speaks for. c is as check matched it:
// its Gen is that of the secret presented.
func (c *credential) identity() Identity {
	return Identity{UserID: c.userID(), Credential: c.ID, secret: true, secretGen: c.Gen}
}

// access is a database's credentials and the binding of client ids to
// users, kept in access.json next to the database (not inside it: the
// database is replicated to every client, the credentials must not be),
// or in a cluster's KV bucket (AccessStore).
//
// mu is a leaf: nothing else is taken under it, and no PBKDF2 runs under
// it (a check snapshots the credentials, hashes with mu released and takes
// mu again to record what it verified), so a flood of wrong secrets never
// holds up a Hello whose secret is cached.
type access struct {
	rec  recordStore // where the record is saved: access.json, or a cluster's KV bucket
	iter int         // the work factor of new credentials
	// hashing, if set, is called by check with mu released, just before
	// it hashes: tests hold a check there.
	hashing func()
	// onRemote, if set, is called after a change was saved on top of a
	// change made elsewhere (it lost a race and was applied afresh), with
	// no lock held: the server then ends the sessions the other change
	// no longer admits.
	onRemote func()

	// writeMu serialises changes (held across the store's write, which
	// in a cluster is a network round trip) and the records the store's
	// watch reports; mu is taken under it, never the other way. So no
	// Hello's check waits for a save.
	writeMu sync.Mutex

	mu       sync.Mutex
	file     accessFile
	rev      uint64                               // the store's revision of file
	verified map[[sha256.Size]byte]verifiedSecret // SHA-256 of a verified secret → what it matched
	graces   map[time.Time]bool                   // grace ends graceEnds has reported
}

// verifiedSecret is what a verified secret matched: a credential and the
// generation of its secret (a rotation makes the entry stale).
type verifiedSecret struct {
	id  string
	gen int
}

type accessFile struct {
	Credentials []credential `json:"credentials"`
	// Clients maps a client id to the user that first used it.
	Clients map[string]string `json:"clients"`
	// Revoked are credential ids (a secret's, or a token's jti) whose
	// sessions were ended; a Hello that presents one is refused.
	Revoked []string `json:"revoked,omitempty"`
	// RevokedUsers are users cut off from the database: whatever
	// credential they present, they are refused.
	RevokedUsers []string `json:"revoked_users,omitempty"`
}

// clone returns a deep copy of f, for a change that becomes f only once
// saved.
func (f *accessFile) clone() accessFile {
	c := accessFile{
		Credentials:  slices.Clone(f.Credentials),
		Clients:      make(map[string]string, len(f.Clients)+1),
		Revoked:      slices.Clone(f.Revoked),
		RevokedUsers: slices.Clone(f.RevokedUsers),
	}
	for k, v := range f.Clients {
		c.Clients[k] = v
	}
	return c
}

// findID returns the index of the credential with id, or -1.
func (f *accessFile) findID(id string) int {
	return slices.IndexFunc(f.Credentials, func(c credential) bool { return c.ID == id })
}

// find returns the index of the credential ref names (its id or its name),
// or -1.
func (f *accessFile) find(ref string) int {
	return slices.IndexFunc(f.Credentials, func(c credential) bool { return c.ID == ref || (c.Name != "" && c.Name == ref) })
}

// Refusals of the access file. Callers branch on them; all but
// errAccessInternal reach clients as "unauthorized" or admin callers as a
// 4xx.
var (
	errWrongCredential = errors.New("wrong credential")
	errClientBound     = errors.New("client id belongs to another user")
	// ErrNoCredential is an admin call naming a secret the database does
	// not have.
	ErrNoCredential = errors.New("server: no such credential")
	// ErrCredentialExists is a named secret added under a name (or a
	// secret) the database already has for another user.
	ErrCredentialExists = errors.New("server: credential exists")
)

// loadAccess reads an access file (none: no credentials yet). New
// credentials get iter rounds of PBKDF2 (0: hashIterations).
func loadAccess(path string, iter int) (*access, error) {
	a, err := openAccess(context.Background(), fileRecord(path), iter)
	if err != nil {
		return nil, fmt.Errorf("%w (%s)", err, path)
	}
	return a, nil
}

// openAccess reads a database's access record from its store.
func openAccess(ctx context.Context, rec recordStore, iter int) (*access, error) {
	if iter <= 0 {
		iter = hashIterations
	}
	r, err := rec.load(ctx)
	if err != nil {
		return nil, err
	}
	f, err := decodeAccess(r.Value)
	if err != nil {
		return nil, fmt.Errorf("access: %w", err)
	}
	return &access{rec: rec, iter: iter, file: f, rev: r.Revision, verified: map[[sha256.Size]byte]verifiedSecret{}}, nil
}

// validUserID says whether name may name a secret's user.
func validUserID(name string) error {
	if name == "" || len(name) > maxUserID || !utf8.ValidString(name) {
		return fmt.Errorf("user name must be 1 to %d bytes of UTF-8", maxUserID)
	}
	return nil
}

// newCredential hashes secret into a credential (with no lock held: it
// costs the work factor).
func (a *access) newCredential(id, name, secret string) (credential, error) {
	if secret == "" {
		return credential{}, errors.New("access: empty secret")
	}
	salt := make([]byte, 16)
	rand.Read(salt)
	if id == "" {
		b := make([]byte, 8)
		rand.Read(b)
		id = hex.EncodeToString(b)
	}
	h, err := pbkdf2.Key(sha256.New, secret, salt, a.iter, 32)
	if err != nil {
		return credential{}, err
	}
	c := credential{ID: id, Name: name, Salt: salt, Hash: h}
	if a.iter != hashIterations {
		c.Iter = a.iter
	}
	return c, nil
}

// add stores a credential for secret, named name (empty: unnamed), unless
// one already matches the secret: then it returns that one if it has the
// same name or name is empty (so that `serve --db NAME:SECRET` at every
// start stays a no-op, however the secret was named since), and
// ErrCredentialExists if not. A name may not be another credential's name
// or id (that would speak for its clients).
func (a *access) add(name, secret string) (credential, error) {
	if name != "" {
		if err := validUserID(name); err != nil {
			return credential{}, fmt.Errorf("access: %w", err)
		}
	}
	a.mu.Lock()
	checked := make(map[string]bool, len(a.file.Credentials))
	for _, x := range a.file.Credentials {
		checked[x.ID] = true
	}
	a.mu.Unlock()
	same := func(c credential) (credential, error) {
		if c.Name == name || name == "" {
			return c, nil
		}
		return credential{}, fmt.Errorf("%w: that secret is already credential %s", ErrCredentialExists, c.ID)
	}
	switch c, err := a.check(secret); {
	case err == nil:
		return same(c)
	case !errors.Is(err, errWrongCredential):
		return credential{}, err
	}
	c, err := a.newCredential("", name, secret)
	if err != nil {
		return credential{}, err
	}
	var found *credential
	err = a.change(func(f *accessFile) error {
		found = nil
		// A credential added since the check (here, or on another node
		// racing this add: `serve --db NAME:SECRET` on every node at
		// once) may be this very secret; only those are hashed again.
		for _, x := range f.Credentials {
			if !checked[x.ID] && x.hashes(secret) {
				found = &x
				return errUnchanged
			}
		}
		if name != "" && f.find(name) >= 0 {
			return fmt.Errorf("%w: %q", ErrCredentialExists, name)
		}
		f.Credentials = append(f.Credentials, c)
		f.Revoked = slices.DeleteFunc(f.Revoked, func(r string) bool { return r == c.ID })
		return nil
	})
	switch {
	case err != nil:
		return credential{}, err
	case found != nil:
		return same(*found)
	}
	return c, nil
}

// hashes says whether secret is c's current secret (costs the work
// factor).
func (c *credential) hashes(secret string) bool {
	h, err := pbkdf2.Key(sha256.New, secret, c.Salt, c.iterations(), len(c.Hash))
	return err == nil && len(c.Hash) > 0 && subtle.ConstantTimeCompare(h, c.Hash) == 1
}

// cached returns the credential a secret verified earlier matched (its
// Gen that of the secret), if it still accepts that secret.
func (a *access) cached(secret string) (credential, bool) {
	key := sha256.Sum256([]byte(secret))
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.verified[key]
	if !ok {
		return credential{}, false
	}
	if i := a.file.findID(v.id); i >= 0 && a.file.Credentials[i].accepts(v.gen, time.Now()) {
		c := a.file.Credentials[i]
		c.Gen = v.gen
		return c, true
	}
	return credential{}, false
}

// check returns the credential secret matches (its Gen that of the
// secret: a previous one matches during its grace): from the verified
// cache, or by hashing it against each credential with mu released. A
// credential rotated or revoked while it hashed does not count.
func (a *access) check(secret string) (credential, error) {
	if c, ok := a.cached(secret); ok {
		return c, nil
	}
	a.mu.Lock()
	creds := slices.Clone(a.file.Credentials)
	a.mu.Unlock()
	if a.hashing != nil {
		a.hashing()
	}
	now := time.Now()
	for _, c := range creds {
		type stored struct {
			salt, hash []byte
			iter, gen  int
		}
		try := []stored{{c.Salt, c.Hash, c.iterations(), c.Gen}}
		if p := c.Prev; p != nil && now.Before(p.Until) {
			iter := p.Iter
			if iter <= 0 {
				iter = hashIterations
			}
			try = append(try, stored{p.Salt, p.Hash, iter, p.Gen})
		}
		for _, st := range try {
			h, err := pbkdf2.Key(sha256.New, secret, st.salt, st.iter, len(st.hash))
			if err != nil {
				return credential{}, err
			}
			if subtle.ConstantTimeCompare(h, st.hash) != 1 {
				continue
			}
			a.mu.Lock()
			defer a.mu.Unlock()
			i := a.file.findID(c.ID)
			if i < 0 || !a.file.Credentials[i].accepts(st.gen, time.Now()) {
				return credential{}, errWrongCredential // rotated or revoked meanwhile
			}
			a.verified[sha256.Sum256([]byte(secret))] = verifiedSecret{id: c.ID, gen: st.gen}
			m := a.file.Credentials[i]
			m.Gen = st.gen
			return m, nil
		}
	}
	return credential{}, errWrongCredential
}

// bind binds clientID to user on first use: afterwards only that user may
// speak for that client id.
func (a *access) bind(clientID, user string) error {
	bound := func(f *accessFile) error {
		switch u, ok := f.Clients[clientID]; {
		case !ok:
			return nil
		case u != user:
			return errClientBound
		}
		return errUnchanged
	}
	a.mu.Lock()
	err := bound(&a.file)
	a.mu.Unlock()
	if err != nil { // bound already (the usual Hello): no save
		return noChange(err)
	}
	return a.change(func(f *accessFile) error {
		if err := bound(f); err != nil {
			return err
		}
		f.Clients[clientID] = user
		return nil
	})
}

// revokedReason says why id may not open the database ("" if it may):
// its user or its credential was revoked.
func (a *access) revokedReason(id Identity) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if slices.Contains(a.file.RevokedUsers, id.UserID) {
		return fmt.Sprintf("user %q was revoked", id.UserID)
	}
	if id.Credential != "" && slices.Contains(a.file.Revoked, id.Credential) {
		return fmt.Sprintf("credential %s was revoked", id.Credential)
	}
	if id.secret {
		if i := a.file.findID(id.Credential); i >= 0 && !a.file.Credentials[i].accepts(id.secretGen, time.Now()) {
			return fmt.Sprintf("secret %s was rotated", id.Credential)
		}
	}
	return ""
}

// graceEnd returns when the rotated-out secret id presented stops being
// accepted (zero: id's secret is current, or id is not a stored secret's).
func (a *access) graceEnd(id Identity) time.Time {
	if !id.secret {
		return time.Time{}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if i := a.file.findID(id.Credential); i >= 0 {
		if c := a.file.Credentials[i]; c.Gen != id.secretGen && c.Prev != nil && c.Prev.Gen == id.secretGen {
			return c.Prev.Until
		}
	}
	return time.Time{}
}

// forgetLocked drops the verified cache's entries for credential id.
// Called with mu held.
func (a *access) forgetLocked(id string) {
	for k, v := range a.verified {
		if v.id == id {
			delete(a.verified, k)
		}
	}
}

// rotate gives the credential ref names a new secret: same id, same user,
// so its clients stay bound, and the next generation. The old secret stays
// accepted for grace (0: it stops working at once); a secret an earlier
// rotation left in its grace stops at once. The caller ends the sessions
// of the generations before the returned one's when the grace is over.
func (a *access) rotate(ref, secret string, grace time.Duration) (credential, error) {
	a.mu.Lock()
	i := a.file.find(ref)
	var old credential
	if i >= 0 {
		old = a.file.Credentials[i]
	}
	a.mu.Unlock()
	if i < 0 {
		return credential{}, fmt.Errorf("%w: %q", ErrNoCredential, ref)
	}
	c, err := a.newCredential(old.ID, old.Name, secret)
	if err != nil {
		return credential{}, err
	}
	err = a.change(func(f *accessFile) error {
		i := f.findID(old.ID)
		if i < 0 {
			return fmt.Errorf("%w: %q (revoked meanwhile)", ErrNoCredential, ref)
		}
		cur := f.Credentials[i] // as it is now: another rotation may have won
		c.Gen, c.Prev = cur.Gen+1, nil
		if grace > 0 {
			c.Prev = &prevSecret{Salt: cur.Salt, Hash: cur.Hash, Iter: cur.iterations(), Gen: cur.Gen, Until: time.Now().Add(grace)}
		}
		f.Credentials[i] = c
		return nil
	})
	if err != nil {
		return credential{}, err
	}
	a.mu.Lock()
	a.forgetLocked(c.ID)
	a.mu.Unlock()
	return c, nil
}

// revoke deletes the credential ref names and records its id as revoked,
// so that the sessions holding it can be found and ended.
func (a *access) revoke(ref string) (credential, error) {
	var c credential
	err := a.change(func(f *accessFile) error {
		i := f.find(ref)
		if i < 0 {
			return fmt.Errorf("%w: %q", ErrNoCredential, ref)
		}
		c = f.Credentials[i]
		f.Credentials = slices.Delete(f.Credentials, i, i+1)
		if !slices.Contains(f.Revoked, c.ID) {
			f.Revoked = append(f.Revoked, c.ID)
		}
		return nil
	})
	if err != nil {
		return credential{}, err
	}
	a.mu.Lock()
	a.forgetLocked(c.ID)
	a.mu.Unlock()
	return c, nil
}

// revokeUser cuts user off: every Hello as that user is refused from now
// on, whatever its credential.
func (a *access) revokeUser(user string) error {
	return a.change(func(f *accessFile) error {
		if slices.Contains(f.RevokedUsers, user) {
			return errUnchanged
		}
		f.RevokedUsers = append(f.RevokedUsers, user)
		return nil
	})
}

// restoreUser lifts user's revocation (RevokeUser), saved before it
// takes effect. It reports whether the user was revoked: restoring a user
// who was not changes nothing.
func (a *access) restoreUser(user string) (bool, error) {
	var was bool
	err := a.change(func(f *accessFile) error {
		if was = slices.Contains(f.RevokedUsers, user); !was {
			return errUnchanged
		}
		f.RevokedUsers = slices.DeleteFunc(f.RevokedUsers, func(u string) bool { return u == user })
		return nil
	})
	return was && err == nil, err
}

// view returns a copy of the file, for listings.
func (a *access) view() accessFile {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.file.clone()
}

// errUnchanged is a change's way to say that the record already says what
// it would make it say: change saves nothing and returns nil.
var errUnchanged = errors.New("access: unchanged")

// noChange is err, or nil for errUnchanged.
func noChange(err error) error {
	if errors.Is(err, errUnchanged) {
		return nil
	}
	return err
}

// change applies fn to a copy of the record, saves the copy and only then
// makes it the record: a failed save changes nothing. fn checks what it
// needs on the copy it is given (an error, or errUnchanged, saves
// nothing). A save that lost a race to a change made on another node
// (AccessConflictError) is tried again on the record as that change left
// it, fn applied afresh, so that neither change is lost.
func (a *access) change(fn func(f *accessFile) error) error {
	remote, err := a.saveChange(fn)
	if remote && a.onRemote != nil {
		a.onRemote() // with no lock held: it walks the sessions
	}
	return err
}

// saveChange is change's work under writeMu; it reports whether the record
// saved holds a change made elsewhere.
func (a *access) saveChange(fn func(f *accessFile) error) (remote bool, _ error) {
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	base, rev := a.file.clone(), a.rev
	a.mu.Unlock()
	for attempt := 1; ; attempt++ {
		f := base.clone()
		if err := fn(&f); err != nil {
			return false, noChange(err)
		}
		b, err := encodeAccess(&f)
		if err != nil {
			return false, fmt.Errorf("access: %w", err)
		}
		next, err := a.rec.save(ctx, b, rev)
		var conflict *AccessConflictError
		if errors.As(err, &conflict) && attempt < maxAccessRetries {
			if base, err = decodeAccess(conflict.Current.Value); err != nil {
				return false, fmt.Errorf("access: the record another change saved: %w", err)
			}
			rev, remote = conflict.Current.Revision, true
			continue
		}
		if err != nil {
			return false, err
		}
		a.mu.Lock()
		if next > a.rev {
			a.file, a.rev = f, next
		}
		a.mu.Unlock()
		return remote, nil
	}
}

// apply makes rec the record if it is later than the one held, and
// reports whether it did. A corrupt record is an error and changes
// nothing.
func (a *access) apply(rec AccessRecord) (bool, error) {
	f, err := decodeAccess(rec.Value)
	if err != nil {
		return false, err
	}
	a.writeMu.Lock() // a change under way saves first; then rec is no news
	defer a.writeMu.Unlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	if rec.Revision <= a.rev {
		return false, nil
	}
	a.file, a.rev = f, rec.Revision
	return true, nil
}

// graceEnds returns the ends of the rotated-out secrets' graces still to
// come that it has not returned before, so that the sessions of a
// rotation made elsewhere end on time here (one timer per grace end).
func (a *access) graceEnds() []time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := time.Now()
	var ends []time.Time
	for _, c := range a.file.Credentials {
		if p := c.Prev; p != nil && now.Before(p.Until) && !a.graces[p.Until] {
			if a.graces == nil {
				a.graces = map[time.Time]bool{}
			}
			a.graces[p.Until] = true
			ends = append(ends, p.Until)
		}
	}
	return ends
}
