package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// Limits of a JWKS file.
const (
	// jwksPollEvery is how often, at most, a JWKS file is checked for a
	// change (one stat), on use: a rotated key works within a second, and
	// a busy server stats once a second, not once per Hello.
	jwksPollEvery = time.Second
	// maxJWKSBytes bounds a JWKS file: real ones hold a few keys in a few
	// KiB.
	maxJWKSBytes = 1 << 20
)

// jwksSource is a JWKS file's keys, re-read when the file changes. Readers
// never wait: they take the current keys from an atomic pointer, and at
// most one of them (the one that wins TryLock) stats the file and reloads.
type jwksSource struct {
	path      string
	log       *slog.Logger
	pollEvery time.Duration

	keys atomic.Pointer[[]jose.JSONWebKey]

	mu      sync.Mutex // held by the one reader that checks the file
	checked time.Time  // when the file was last statted (monotonic clock)
	seen    os.FileInfo
}

// openJWKS loads path; an unreadable or invalid file is an error here (at
// start), and only logged on later reloads.
func openJWKS(path string, log *slog.Logger) (*jwksSource, error) {
	s := &jwksSource{path: path, log: log, pollEvery: jwksPollEvery}
	fi, keys, err := readJWKS(path)
	if err != nil {
		return nil, err
	}
	s.keys.Store(&keys)
	s.seen, s.checked = fi, time.Now()
	return s, nil
}

// current returns the keys, first reloading the file if it is time to look
// and it changed (a new inode, as an atomic rename makes, or a new mtime or
// size). A reload that fails keeps the old keys and logs why, once per
// change of the file.
func (s *jwksSource) current() []jose.JSONWebKey {
	if s == nil {
		return nil
	}
	if s.mu.TryLock() {
		s.maybeReload()
		s.mu.Unlock()
	}
	return *s.keys.Load()
}

// maybeReload runs with s.mu held.
func (s *jwksSource) maybeReload() {
	now := time.Now()
	if now.Sub(s.checked) < s.pollEvery {
		return
	}
	s.checked = now
	fi, err := os.Stat(s.path)
	if err != nil {
		if s.seen != nil {
			s.log.Error("jwks: keeping the old keys", "file", s.path, "err", err)
		}
		s.seen = nil
		return
	}
	if s.seen != nil && os.SameFile(fi, s.seen) && fi.ModTime().Equal(s.seen.ModTime()) && fi.Size() == s.seen.Size() {
		return
	}
	s.seen = fi // a broken file is logged once, not every second
	fi2, keys, err := readJWKS(s.path)
	if err != nil {
		s.log.Error("jwks: reload failed, keeping the old keys", "file", s.path, "err", err)
		return
	}
	s.seen = fi2
	s.keys.Store(&keys)
	s.log.Info("jwks: reloaded", "file", s.path, "keys", len(keys))
}

// readJWKS reads and checks a key set: its signing keys are kept (the
// public half of a private one), keys marked for encryption ("use": "enc",
// which providers such as Keycloak publish beside their signing keys) are
// skipped, and at least one signing key must remain. A symmetric key makes
// the file invalid: HS256 is verified only with the configured secret, so
// that no key set entry can turn into an HMAC secret, and a secret in a
// file meant to be public is a mistake to stop at.
func readJWKS(path string) (os.FileInfo, []jose.JSONWebKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("jwks: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("jwks: %w", err)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxJWKSBytes+1))
	if err != nil {
		return nil, nil, fmt.Errorf("jwks: %s: %w", path, err)
	}
	keys, err := parseJWKS(b)
	if err != nil {
		return nil, nil, fmt.Errorf("jwks: %s: %w", path, err)
	}
	return fi, keys, nil
}

// parseJWKS decodes a key set (see readJWKS).
func parseJWKS(b []byte) ([]jose.JSONWebKey, error) {
	if len(b) > maxJWKSBytes {
		return nil, fmt.Errorf("more than %d bytes", maxJWKSBytes)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(b, &set); err != nil {
		return nil, err
	}
	if len(set.Keys) == 0 {
		return nil, errors.New("no keys")
	}
	keys := make([]jose.JSONWebKey, 0, len(set.Keys))
	for i, k := range set.Keys {
		pub := k.Public()
		if !pub.Valid() || !pub.IsPublic() {
			return nil, fmt.Errorf("key %d (%q): not an RSA, EC or Ed25519 key (symmetric keys belong in the HS256 secret)", i, k.KeyID)
		}
		if k.Use != "" && k.Use != "sig" {
			continue
		}
		keys = append(keys, pub)
	}
	if len(keys) == 0 {
		return nil, errors.New("no signing keys (every key is for another use)")
	}
	return keys, nil
}
