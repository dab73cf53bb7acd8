package server

import (
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
)

// hashIterations is the PBKDF2-SHA256 work factor of a stored credential.
// Operators choose the secrets, so they may be weak; the work factor makes a
// stolen access file expensive to guess from. A verified secret is cached in
// memory (by its SHA-256), so reconnects do not pay it again.
const hashIterations = 100_000

// credential is a database credential as stored: never the secret itself.
type credential struct {
	ID   string `json:"id"`
	Salt []byte `json:"salt"`
	Hash []byte `json:"hash"`
	// Iter is the credential's PBKDF2 work factor (0: hashIterations, as
	// files written before it was stored say nothing).
	Iter int `json:"iter,omitempty"`
}

// iterations is c's work factor.
func (c *credential) iterations() int {
	if c.Iter > 0 {
		return c.Iter
	}
	return hashIterations
}

// access is a database's credentials and the binding of client ids to them,
// kept in access.json next to the database (not inside it: the database is
// replicated to every client, the credentials must not be).
type access struct {
	path string
	iter int // the work factor of new credentials

	mu       sync.Mutex
	file     accessFile
	verified map[[sha256.Size]byte]string // SHA-256 of a verified secret → credential id
}

type accessFile struct {
	Credentials []credential      `json:"credentials"`
	Clients     map[string]string `json:"clients"` // client id → credential id that first used it
}

// Refusals of authorize. Both are "unauthorized" to the client.
var (
	errWrongCredential = errors.New("wrong credential")
	errClientBound     = errors.New("client id belongs to another credential")
)

// loadAccess reads an access file (none: no credentials yet). New
// credentials get iter rounds of PBKDF2 (0: hashIterations).
func loadAccess(path string, iter int) (*access, error) {
	if iter <= 0 {
		iter = hashIterations
	}
	a := &access{path: path, iter: iter, verified: map[[sha256.Size]byte]string{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		a.file.Clients = map[string]string{}
		return a, nil
	}
	if err != nil {
		return nil, fmt.Errorf("access: %w", err)
	}
	if err := json.Unmarshal(b, &a.file); err != nil {
		return nil, fmt.Errorf("access: %s: %w", path, err)
	}
	if a.file.Clients == nil {
		a.file.Clients = map[string]string{}
	}
	return a, nil
}

// add stores a credential for secret, unless one already matches it.
func (a *access) add(secret string) error {
	if secret == "" {
		return errors.New("access: empty secret")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.match(secret); err == nil {
		return nil
	}
	salt := make([]byte, 16)
	rand.Read(salt)
	id := make([]byte, 8)
	rand.Read(id)
	h, err := pbkdf2.Key(sha256.New, secret, salt, a.iter, 32)
	if err != nil {
		return err
	}
	c := credential{ID: hex.EncodeToString(id), Salt: salt, Hash: h}
	if a.iter != hashIterations {
		c.Iter = a.iter
	}
	a.file.Credentials = append(a.file.Credentials, c)
	return a.save()
}

// match returns the id of the credential secret matches. Called with mu held.
func (a *access) match(secret string) (string, error) {
	key := sha256.Sum256([]byte(secret))
	if id, ok := a.verified[key]; ok {
		return id, nil
	}
	for _, c := range a.file.Credentials {
		h, err := pbkdf2.Key(sha256.New, secret, c.Salt, c.iterations(), len(c.Hash))
		if err != nil {
			return "", err
		}
		if subtle.ConstantTimeCompare(h, c.Hash) == 1 {
			a.verified[key] = c.ID
			return c.ID, nil
		}
	}
	return "", errWrongCredential
}

// authorize checks secret and binds clientID to its credential on first
// use: afterwards only that credential may speak for that client id.
func (a *access) authorize(clientID, secret string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	id, err := a.match(secret)
	if err != nil {
		return err
	}
	switch bound, ok := a.file.Clients[clientID]; {
	case !ok:
		a.file.Clients[clientID] = id
		return a.save()
	case bound != id:
		return errClientBound
	}
	return nil
}

// save writes the file atomically (temporary file, fsync, rename).
func (a *access) save() error {
	b, err := json.MarshalIndent(&a.file, "", "  ")
	if err != nil {
		return err
	}
	tmp := a.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("access: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, a.path)
	}
	if err != nil {
		return fmt.Errorf("access: save %s: %w", a.path, err)
	}
	return nil
}
