package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

// testNow is the fixed clock of the JWT tests.
var testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const (
	testIssuer   = "https://issuer.example"
	testAudience = "sqlrebase"
)

// testKeys are an issuer's signing keys, plus one unrelated RSA key an
// attacker holds.
type testKeys struct {
	rsa, rsaOther *rsa.PrivateKey
	ec            *ecdsa.PrivateKey
	ed            ed25519.PrivateKey
	secret        []byte
}

// newTestKeys returns the test keys, made once per test binary: 2048-bit
// RSA keys take 0.1-0.5 s each to make on a loaded machine, and every test
// would pay it.
func newTestKeys(t testing.TB) *testKeys {
	t.Helper()
	k, err := testKeysOnce()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var testKeysOnce = sync.OnceValues(func() (*testKeys, error) {
	k := &testKeys{secret: bytes.Repeat([]byte("s"), 32)}
	var err error
	if k.rsa, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		return nil, err
	}
	if k.rsaOther, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		return nil, err
	}
	if k.ec, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		return nil, err
	}
	if _, k.ed, err = ed25519.GenerateKey(rand.Reader); err != nil {
		return nil, err
	}
	return k, nil
})

// jwks is the issuer's public key set: kids "rsa", "ec", "ed".
func (k *testKeys) jwks(t testing.TB) []byte {
	t.Helper()
	return jwksOf(t, map[string]crypto.PublicKey{"rsa": k.rsa.Public(), "ec": k.ec.Public(), "ed": k.ed.Public()})
}

func jwksOf(t testing.TB, keys map[string]crypto.PublicKey) []byte {
	t.Helper()
	var set jose.JSONWebKeySet
	for kid, pub := range keys {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: pub, KeyID: kid, Use: "sig"})
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mint signs claims with key under alg; kid "" leaves the header without
// one.
func mint(t testing.TB, alg jose.SignatureAlgorithm, key any, kid string, claims map[string]any) string {
	t.Helper()
	sk := jose.SigningKey{Algorithm: alg, Key: key}
	if kid != "" {
		sk.Key = jose.JSONWebKey{Key: key, KeyID: kid}
	}
	signer, err := jose.NewSigner(sk, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// handmade builds a compact token from a header and payload, signed by
// sign (nil: an empty signature).
func handmade(header, payload string, sign func(input []byte) []byte) string {
	enc := base64.RawURLEncoding
	input := enc.EncodeToString([]byte(header)) + "." + enc.EncodeToString([]byte(payload))
	var sig []byte
	if sign != nil {
		sig = sign([]byte(input))
	}
	return input + "." + enc.EncodeToString(sig)
}

func hs256(key []byte) func([]byte) []byte {
	return func(input []byte) []byte {
		m := hmac.New(sha256.New, key)
		m.Write(input)
		return m.Sum(nil)
	}
}

// goodClaims are valid claims for database "acme"; edit returns a copy
// changed by f.
func goodClaims(edit ...func(map[string]any)) map[string]any {
	c := map[string]any{
		"iss": testIssuer, "aud": testAudience, "sub": "alice", "jti": "tok-1",
		"exp": testNow.Add(time.Hour).Unix(), "nbf": testNow.Add(-time.Minute).Unix(),
		"iat": testNow.Add(-time.Minute).Unix(), "dbs": []string{"acme", "beta"},
	}
	for _, f := range edit {
		f(c)
	}
	return c
}

func writeFile(t testing.TB, dir, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// replaceFile replaces path atomically (write aside, rename), as a key
// rotation script does.
func replaceFile(t testing.TB, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func newTestJWT(t testing.TB, cfg JWTConfig) *JWTAuthenticator {
	t.Helper()
	if cfg.Issuer == "" {
		cfg.Issuer = testIssuer
	}
	if cfg.Audience == "" {
		cfg.Audience = testAudience
	}
	if cfg.Now == nil {
		cfg.Now = func() time.Time { return testNow }
	}
	a, err := NewJWTAuthenticator(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func authReq(db, token string) AuthRequest {
	return AuthRequest{Database: db, ClientID: "c1", Credential: token}
}

// TestJWTRefusals is every way a token can be wrong, against an
// authenticator with only a JWKS and one with a JWKS and an HS256 secret,
// with the valid tokens beside them to show the refusals are for the stated
// reason and not for everything.
func TestJWTRefusals(t *testing.T) {
	k := newTestKeys(t)
	dir := t.TempDir()
	jwksPath := writeFile(t, dir, "jwks.json", k.jwks(t))
	onlyJWKS := newTestJWT(t, JWTConfig{JWKSFile: jwksPath})
	both := newTestJWT(t, JWTConfig{JWKSFile: jwksPath, HS256Secret: k.secret})

	rsaPKIX, err := x509.MarshalPKIXPublicKey(k.rsa.Public())
	if err != nil {
		t.Fatal(err)
	}
	rsaPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: rsaPKIX})
	rsaJWK, err := json.Marshal(jose.JSONWebKey{Key: k.rsa.Public(), KeyID: "rsa"})
	if err != nil {
		t.Fatal(err)
	}
	claimsJSON, _ := json.Marshal(goodClaims())
	rsaHeader := `{"alg":"HS256","kid":"rsa","typ":"JWT"}`

	type authn struct {
		name string
		a    *JWTAuthenticator
	}
	onlyJ := []authn{{"jwks", onlyJWKS}}
	bothA := []authn{{"jwks+hs256", both}}
	all := []authn{{"jwks", onlyJWKS}, {"jwks+hs256", both}}
	rs := func(c map[string]any) string { return mint(t, jose.RS256, k.rsa, "rsa", c) }

	cases := []struct {
		name    string
		token   string
		db      string // "" is "acme"
		on      []authn
		reason  string // "" is accepted
		expired bool
	}{
		{name: "valid RS256", token: rs(goodClaims()), on: all},
		{name: "valid RS256 without kid", token: mint(t, jose.RS256, k.rsa, "", goodClaims()), on: all},
		{name: "valid ES256", token: mint(t, jose.ES256, k.ec, "ec", goodClaims()), on: all},
		{name: "valid EdDSA", token: mint(t, jose.EdDSA, k.ed, "ed", goodClaims()), on: all},
		{name: "valid HS256", token: mint(t, jose.HS256, k.secret, "", goodClaims()), on: bothA},
		{name: "aud as a list", token: rs(goodClaims(func(c map[string]any) { c["aud"] = []string{"other", testAudience} })), on: all},
		{name: "dbs star", token: rs(goodClaims(func(c map[string]any) { c["dbs"] = "*" })), on: all},
		{name: "expired within leeway", token: rs(goodClaims(func(c map[string]any) { c["exp"] = testNow.Add(-10 * time.Second).Unix() })), on: all},
		{name: "nbf within leeway", token: rs(goodClaims(func(c map[string]any) { c["nbf"] = testNow.Add(10 * time.Second).Unix() })), on: all},

		{name: "expired", token: rs(goodClaims(func(c map[string]any) { c["exp"] = testNow.Add(-time.Minute).Unix() })), on: all,
			reason: "token expired at 2026-03-01T11:59:00Z", expired: true},
		{name: "not yet valid", token: rs(goodClaims(func(c map[string]any) { c["nbf"] = testNow.Add(time.Minute).Unix() })), on: all,
			reason: "token not valid before 2026-03-01T12:01:00Z"},
		{name: "wrong issuer", token: rs(goodClaims(func(c map[string]any) { c["iss"] = "https://evil.example" })), on: all,
			reason: `issuer "https://evil.example" is not "https://issuer.example"`},
		{name: "no issuer", token: rs(goodClaims(func(c map[string]any) { delete(c, "iss") })), on: all, reason: `issuer "" is not`},
		{name: "wrong audience", token: rs(goodClaims(func(c map[string]any) { c["aud"] = "billing" })), on: all,
			reason: `audience ["billing"] does not include "sqlrebase"`},
		{name: "no audience", token: rs(goodClaims(func(c map[string]any) { delete(c, "aud") })), on: all, reason: "audience [] does not include"},
		{name: "wrong issuer and expired says issuer", token: rs(goodClaims(func(c map[string]any) {
			c["iss"] = "x"
			c["exp"] = testNow.Add(-time.Hour).Unix()
		})), on: all, reason: `issuer "x"`},
		{name: "unknown kid", token: mint(t, jose.RS256, k.rsa, "rsa-2025", goodClaims()), on: all, reason: `unknown key id "rsa-2025"`},
		{name: "unrelated key with a known kid", token: mint(t, jose.RS256, k.rsaOther, "rsa", goodClaims()), on: all,
			reason: `signature does not verify with key "rsa" (RS256)`},
		{name: "unrelated key without kid", token: mint(t, jose.RS256, k.rsaOther, "", goodClaims()), on: all,
			reason: "signature does not verify with any RS256 key"},
		{name: "kid of a key of another type", token: mint(t, jose.RS256, k.rsa, "ec", goodClaims()), on: all, reason: `key "ec" is not an RS256 key`},
		{name: "alg none", token: handmade(`{"alg":"none","typ":"JWT"}`, string(claimsJSON), nil), on: all,
			reason: `algorithm "none" not accepted (accepted: RS256, ES256, EdDSA`},
		{name: "alg none with a signature", token: handmade(`{"alg":"none"}`, string(claimsJSON), hs256(k.secret)), on: all,
			reason: `algorithm "none" not accepted`},
		{name: "alg RS512", token: mint(t, jose.RS512, k.rsa, "rsa", goodClaims()), on: all, reason: `algorithm "RS512" not accepted`},
		{name: "confusion: HS256 with the RSA key's PEM, no secret", token: handmade(rsaHeader, string(claimsJSON), hs256(rsaPEM)), on: onlyJ,
			reason: "algorithm HS256 not accepted: this server has no HS256 secret"},
		{name: "confusion: HS256 with the RSA key's PEM, with a secret", token: handmade(rsaHeader, string(claimsJSON), hs256(rsaPEM)), on: bothA,
			reason: "signature does not verify (HS256)"},
		{name: "confusion: HS256 with the RSA key's DER", token: handmade(rsaHeader, string(claimsJSON), hs256(rsaPKIX)), on: bothA,
			reason: "signature does not verify (HS256)"},
		{name: "confusion: HS256 with the RSA JWK", token: handmade(rsaHeader, string(claimsJSON), hs256(rsaJWK)), on: bothA,
			reason: "signature does not verify (HS256)"},
		{name: "HS256 with a wrong secret", token: mint(t, jose.HS256, bytes.Repeat([]byte("x"), 32), "", goodClaims()), on: bothA,
			reason: "signature does not verify (HS256)"},
		{name: "valid token for another database", token: rs(goodClaims()), db: "other", on: all, reason: `no access to database "other"`},
		{name: "no dbs claim", token: rs(goodClaims(func(c map[string]any) { delete(c, "dbs") })), on: all,
			reason: `no access to database "acme": the token has no "dbs" claim`},
		{name: "dbs not a list", token: rs(goodClaims(func(c map[string]any) { c["dbs"] = "acme" })), on: all,
			reason: `claim "dbs" is not a list of names or "*"`},
		{name: "dbs with a number", token: rs(goodClaims(func(c map[string]any) { c["dbs"] = []any{1, "acme"} })), on: all,
			reason: `claim "dbs" is not a list of names or "*"`},
		{name: "missing sub", token: rs(goodClaims(func(c map[string]any) { delete(c, "sub") })), on: all, reason: "token has no sub"},
		{name: "empty sub", token: rs(goodClaims(func(c map[string]any) { c["sub"] = "" })), on: all, reason: "token has no sub"},
		{name: "sub not a string", token: rs(goodClaims(func(c map[string]any) { c["sub"] = 7 })), on: all, reason: "malformed claims"},
		{name: "missing exp", token: rs(goodClaims(func(c map[string]any) { delete(c, "exp") })), on: all, reason: "token has no exp"},
		{name: "exp not a number", token: rs(goodClaims(func(c map[string]any) { c["exp"] = "tomorrow" })), on: all, reason: "malformed claims"},
		{name: "garbage", token: "not a token at all", on: all, reason: "malformed token: 1 dot-separated parts, want 3"},
		{name: "empty", token: "", on: all, reason: "malformed token: 1 dot-separated parts"},
		{name: "two segments", token: strings.Join(strings.Split(rs(goodClaims()), ".")[:2], "."), on: all,
			reason: "malformed token: 2 dot-separated parts, want 3"},
		{name: "four segments", token: rs(goodClaims()) + ".x", on: all, reason: "malformed token: 4 dot-separated parts, want 3"},
		{name: "bad base64 header", token: "e!!." + strings.SplitN(rs(goodClaims()), ".", 2)[1], on: all,
			reason: "malformed token: the header is not base64url"},
		{name: "bad base64 signature", token: rs(goodClaims()) + "*", on: all, reason: "malformed token: the signature is not base64url"},
		{name: "bad JSON header", token: handmade(`{"alg":`, string(claimsJSON), nil), on: all,
			reason: "malformed token: the header is not a JSON object"},
		{name: "bad JSON claims, signed", token: handmade(`{"alg":"HS256"}`, `{"sub":`, hs256(k.secret)), on: bothA,
			reason: "malformed claims"},
		{name: "claims an array, signed", token: handmade(`{"alg":"HS256"}`, `["sub"]`, hs256(k.secret)), on: bothA,
			reason: "malformed claims"},
		{name: "too long", token: strings.Repeat("a", maxTokenBytes+1), on: all, reason: "more than 16384"},
	}
	for _, tc := range cases {
		for _, au := range tc.on {
			t.Run(tc.name+"/"+au.name, func(t *testing.T) {
				db := tc.db
				if db == "" {
					db = "acme"
				}
				id, err := au.a.Authenticate(context.Background(), authReq(db, tc.token))
				if tc.reason == "" {
					if err != nil {
						t.Fatalf("refused: %v", err)
					}
					if id.UserID != "alice" || id.Credential != "tok-1" || !id.Expires.Equal(time.Unix(testNow.Add(time.Hour).Unix(), 0)) && tc.name != "expired within leeway" {
						t.Fatalf("identity %+v", id)
					}
					if id.Claims["iss"] != testIssuer {
						t.Fatalf("claims %v", id.Claims)
					}
					return
				}
				var ae *AuthError
				if !errors.As(err, &ae) {
					t.Fatalf("err %v (%T), want *AuthError", err, err)
				}
				if !strings.Contains(ae.Reason, tc.reason) {
					t.Fatalf("reason %q, want it to contain %q", ae.Reason, tc.reason)
				}
				if ae.Expired != tc.expired {
					t.Fatalf("Expired %v, want %v (%q)", ae.Expired, tc.expired, ae.Reason)
				}
				if id.UserID != "" {
					t.Fatalf("refused with an identity %+v", id)
				}
			})
		}
	}
}

// TestJWTIdentity: sub, all claims, exp and jti make the Identity.
func TestJWTIdentity(t *testing.T) {
	k := newTestKeys(t)
	a := newTestJWT(t, JWTConfig{HS256Secret: k.secret})
	id, err := a.Authenticate(context.Background(), authReq("beta", mint(t, jose.HS256, k.secret, "", goodClaims(func(c map[string]any) {
		c["role"] = "admin"
		delete(c, "jti")
	}))))
	if err != nil {
		t.Fatal(err)
	}
	if id.UserID != "alice" || id.Credential != "" || !id.Expires.Equal(testNow.Add(time.Hour)) {
		t.Fatalf("identity %+v", id)
	}
	if id.Claims["role"] != "admin" || id.Claims["sub"] != "alice" {
		t.Fatalf("claims %v", id.Claims)
	}
	if dbs, ok := id.Claims["dbs"].([]any); !ok || len(dbs) != 2 {
		t.Fatalf("dbs claim %#v", id.Claims["dbs"])
	}
}

// TestJWTDatabasesClaimAndCallback: the claim's name is configurable, and
// a callback overrides it.
func TestJWTDatabasesClaimAndCallback(t *testing.T) {
	k := newTestKeys(t)
	tok := mint(t, jose.HS256, k.secret, "", goodClaims(func(c map[string]any) {
		delete(c, "dbs")
		c["tenants"] = []string{"acme"}
		c["org"] = "beta"
	}))
	named := newTestJWT(t, JWTConfig{HS256Secret: k.secret, DatabasesClaim: "tenants"})
	if _, err := named.Authenticate(context.Background(), authReq("acme", tok)); err != nil {
		t.Fatalf("tenants claim: %v", err)
	}
	if _, err := named.Authenticate(context.Background(), authReq("beta", tok)); err == nil || !strings.Contains(err.Error(), `no access to database "beta"`) {
		t.Fatalf("tenants claim, beta: %v", err)
	}
	var asked []string
	cb := newTestJWT(t, JWTConfig{HS256Secret: k.secret, AllowDatabase: func(claims map[string]any, db string) bool {
		asked = append(asked, db)
		return claims["org"] == db
	}})
	if _, err := cb.Authenticate(context.Background(), authReq("beta", tok)); err != nil {
		t.Fatalf("callback, beta: %v", err)
	}
	if _, err := cb.Authenticate(context.Background(), authReq("acme", tok)); err == nil || !strings.Contains(err.Error(), `no access to database "acme"`) {
		t.Fatalf("callback overrides the claim, acme: %v", err)
	}
	if strings.Join(asked, ",") != "beta,acme" {
		t.Fatalf("callback asked %v", asked)
	}
}

// TestJWTLeewayConfig: a negative leeway is none; the default is 30 s.
func TestJWTLeewayConfig(t *testing.T) {
	k := newTestKeys(t)
	tok := mint(t, jose.HS256, k.secret, "", goodClaims(func(c map[string]any) { c["exp"] = testNow.Add(-20 * time.Second).Unix() }))
	if _, err := newTestJWT(t, JWTConfig{HS256Secret: k.secret}).Authenticate(context.Background(), authReq("acme", tok)); err != nil {
		t.Fatalf("default leeway: %v", err)
	}
	_, err := newTestJWT(t, JWTConfig{HS256Secret: k.secret, Leeway: -1}).Authenticate(context.Background(), authReq("acme", tok))
	var ae *AuthError
	if !errors.As(err, &ae) || !ae.Expired {
		t.Fatalf("no leeway: %v", err)
	}
}

func TestJWTConfigErrors(t *testing.T) {
	dir := t.TempDir()
	k := newTestKeys(t)
	good := writeFile(t, dir, "good.json", k.jwks(t))
	sym := writeFile(t, dir, "sym.json", []byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0","kid":"h"}]}`))
	enc := writeFile(t, dir, "enc.json", jwksOfUse(t, k.rsa.Public(), "enc"))
	for _, tc := range []struct {
		name string
		cfg  JWTConfig
		want string
	}{
		{"no keys", JWTConfig{Issuer: "i", Audience: "a"}, "give a JWKS file or an HS256 secret"},
		{"short secret", JWTConfig{HS256Secret: []byte("short"), Issuer: "i", Audience: "a"}, "the HS256 secret has 5 bytes; at least 32"},
		{"no issuer", JWTConfig{JWKSFile: good, Audience: "a"}, "an issuer is required"},
		{"no audience", JWTConfig{JWKSFile: good, Issuer: "i"}, "an audience is required"},
		{"missing file", JWTConfig{JWKSFile: filepath.Join(dir, "nope.json"), Issuer: "i", Audience: "a"}, "no such file"},
		{"not JSON", JWTConfig{JWKSFile: writeFile(t, dir, "bad.json", []byte("{")), Issuer: "i", Audience: "a"}, "bad.json"},
		{"empty set", JWTConfig{JWKSFile: writeFile(t, dir, "empty.json", []byte(`{"keys":[]}`)), Issuer: "i", Audience: "a"}, "no keys"},
		{"symmetric key", JWTConfig{JWKSFile: sym, Issuer: "i", Audience: "a"}, "symmetric keys belong in the HS256 secret"},
		{"only an encryption key", JWTConfig{JWKSFile: enc, Issuer: "i", Audience: "a"}, "no signing keys"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewJWTAuthenticator(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
}

func jwksOfUse(t testing.TB, pub crypto.PublicKey, use string) []byte {
	b, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: pub, KeyID: "k", Use: use}}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestJWKSSkipsEncryptionKeys: a provider's set with an encryption key
// beside the signing key loads; the signing key verifies, and a token
// naming the encryption key's kid finds no key to verify with.
func TestJWKSSkipsEncryptionKeys(t *testing.T) {
	k := newTestKeys(t)
	set, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{
		{Key: k.rsaOther.Public(), KeyID: "enc-1", Use: "enc", Algorithm: "RSA-OAEP"},
		{Key: k.rsa.Public(), KeyID: "sig-1", Use: "sig", Algorithm: "RS256"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	a := newTestJWT(t, JWTConfig{JWKSFile: writeFile(t, t.TempDir(), "jwks.json", set)})
	if _, err := a.Authenticate(context.Background(), authReq("acme", mint(t, jose.RS256, k.rsa, "sig-1", goodClaims()))); err != nil {
		t.Fatalf("signing key: %v", err)
	}
	_, err = a.Authenticate(context.Background(), authReq("acme", mint(t, jose.RS256, k.rsaOther, "enc-1", goodClaims())))
	if err == nil || !strings.Contains(err.Error(), `unknown key id "enc-1"`) {
		t.Fatalf("token naming the encryption key: %v", err)
	}
}

// TestJWTContext: a cancelled context is the context's error, not a
// refusal.
func TestJWTContext(t *testing.T) {
	k := newTestKeys(t)
	a := newTestJWT(t, JWTConfig{HS256Secret: k.secret})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := a.Authenticate(ctx, authReq("acme", mint(t, jose.HS256, k.secret, "", goodClaims()))); !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v", err)
	}
}

// lockedBuffer is a log sink safe for the authenticator's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestJWKSRotation: after the key set is replaced atomically, a token of
// the new key works and one of the removed key is refused; a replacement
// that does not parse keeps the keys and is logged.
func TestJWKSRotation(t *testing.T) {
	k := newTestKeys(t)
	dir := t.TempDir()
	path := writeFile(t, dir, "jwks.json", jwksOf(t, map[string]crypto.PublicKey{"k1": k.rsa.Public()}))
	var logs lockedBuffer
	a := newTestJWT(t, JWTConfig{JWKSFile: path, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	a.jwks.pollEvery = 0 // look on every use; TestJWKSPollDefault uses the real interval
	old := mint(t, jose.RS256, k.rsa, "k1", goodClaims())
	next := mint(t, jose.ES256, k.ec, "k2", goodClaims())
	try := func(tok string) error {
		_, err := a.Authenticate(context.Background(), authReq("acme", tok))
		return err
	}
	if err := try(old); err != nil {
		t.Fatalf("before rotation, k1: %v", err)
	}
	if err := try(next); err == nil || !strings.Contains(err.Error(), `unknown key id "k2"`) {
		t.Fatalf("before rotation, k2: %v", err)
	}

	replaceFile(t, path, jwksOf(t, map[string]crypto.PublicKey{"k2": k.ec.Public()}))
	if err := try(next); err != nil {
		t.Fatalf("after rotation, k2: %v", err)
	}
	if err := try(old); err == nil || !strings.Contains(err.Error(), `unknown key id "k1"`) {
		t.Fatalf("after rotation, removed k1: %v", err)
	}
	if !strings.Contains(logs.String(), "jwks: reloaded") {
		t.Fatalf("no reload logged: %s", logs.String())
	}

	replaceFile(t, path, []byte(`{"keys": [`))
	if err := try(next); err != nil {
		t.Fatalf("after a broken replacement, k2: %v", err)
	}
	if err := try(next); err != nil {
		t.Fatalf("after a broken replacement, k2 again: %v", err)
	}
	if n := strings.Count(logs.String(), "reload failed, keeping the old keys"); n != 1 {
		t.Fatalf("broken file logged %d times, want once:\n%s", n, logs.String())
	}

	// Fixed in place (same inode, new size): picked up.
	if err := os.WriteFile(path, jwksOf(t, map[string]crypto.PublicKey{"k1": k.rsa.Public(), "k2": k.ec.Public()}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := try(old); err != nil {
		t.Fatalf("after the fix, k1: %v", err)
	}
}

// TestJWKSPollThrottled: within the poll interval the file is not looked
// at, so a busy server stats it once a second, not once a Hello.
func TestJWKSPollThrottled(t *testing.T) {
	k := newTestKeys(t)
	path := writeFile(t, t.TempDir(), "jwks.json", jwksOf(t, map[string]crypto.PublicKey{"k1": k.rsa.Public()}))
	a := newTestJWT(t, JWTConfig{JWKSFile: path})
	a.jwks.pollEvery = time.Hour
	replaceFile(t, path, jwksOf(t, map[string]crypto.PublicKey{"k2": k.ec.Public()}))
	if _, err := a.Authenticate(context.Background(), authReq("acme", mint(t, jose.RS256, k.rsa, "k1", goodClaims()))); err != nil {
		t.Fatalf("within the interval the old key still works: %v", err)
	}
}

// TestJWKSPollDefault: with the default interval a rotated key is picked
// up (waited for boundedly).
func TestJWKSPollDefault(t *testing.T) {
	k := newTestKeys(t)
	path := writeFile(t, t.TempDir(), "jwks.json", jwksOf(t, map[string]crypto.PublicKey{"k1": k.rsa.Public()}))
	a := newTestJWT(t, JWTConfig{JWKSFile: path})
	next := mint(t, jose.EdDSA, k.ed, "k2", goodClaims())
	replaceFile(t, path, jwksOf(t, map[string]crypto.PublicKey{"k2": k.ed.Public()}))
	deadline := time.Now().Add(10 * jwksPollEvery)
	for {
		_, err := a.Authenticate(context.Background(), authReq("acme", next))
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotated key not picked up within %v: %v", 10*jwksPollEvery, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestJWKSConcurrentRotation: Hellos authenticate while the key set is
// rotated (run it with -race); each token of a key in both sets is
// accepted throughout.
func TestJWKSConcurrentRotation(t *testing.T) {
	k := newTestKeys(t)
	path := writeFile(t, t.TempDir(), "jwks.json", jwksOf(t, map[string]crypto.PublicKey{"k1": k.rsa.Public(), "e": k.ed.Public()}))
	a := newTestJWT(t, JWTConfig{JWKSFile: path, Logger: slog.New(slog.DiscardHandler)})
	a.jwks.pollEvery = 0
	tok := mint(t, jose.EdDSA, k.ed, "e", goodClaims())
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			for range 200 {
				if _, err := a.Authenticate(context.Background(), authReq("acme", tok)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for i := range 20 {
		set := map[string]crypto.PublicKey{"e": k.ed.Public()}
		if i%2 == 0 {
			set["k2"] = k.ec.Public()
		}
		replaceFile(t, path, jwksOf(t, set))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// FuzzJWTAuthenticate: arbitrary credentials never panic, every refusal is
// an *AuthError, and anything accepted carries the claims the issuer
// signed (the fuzzer cannot forge a signature).
func FuzzJWTAuthenticate(f *testing.F) {
	k := newTestKeys(f)
	path := writeFile(f, f.TempDir(), "jwks.json", k.jwks(f))
	a := newTestJWT(f, JWTConfig{JWKSFile: path, HS256Secret: k.secret, Logger: slog.New(slog.DiscardHandler)})
	a.jwks.pollEvery = time.Hour
	claimsJSON, _ := json.Marshal(goodClaims())
	for _, s := range []string{
		mint(f, jose.RS256, k.rsa, "rsa", goodClaims()),
		mint(f, jose.ES256, k.ec, "ec", goodClaims()),
		mint(f, jose.EdDSA, k.ed, "", goodClaims()),
		mint(f, jose.HS256, k.secret, "", goodClaims()),
		mint(f, jose.HS256, k.secret, "", goodClaims(func(c map[string]any) { c["exp"] = testNow.Add(-time.Hour).Unix() })),
		handmade(`{"alg":"none"}`, string(claimsJSON), nil),
		handmade(`{"alg":"HS256","crit":["b64"],"b64":false}`, string(claimsJSON), hs256(k.secret)),
		"", ".", "..", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..", "\x00\xff",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, tok string) {
		id, err := a.Authenticate(context.Background(), authReq("acme", tok))
		if err != nil {
			var ae *AuthError
			if !errors.As(err, &ae) || ae.Reason == "" {
				t.Fatalf("err %v (%T), want *AuthError with a reason", err, err)
			}
			return
		}
		if id.UserID != "alice" || id.Credential != "tok-1" || !id.Expires.Equal(testNow.Add(time.Hour)) {
			t.Fatalf("accepted %q as %+v", tok, id)
		}
	})
}

// startJWTServer serves database "acme" (the demo schema) with auth on
// 127.0.0.1, and returns its address. Failed checks are not rate limited:
// the tests make many from one address on purpose.
func startJWTServer(t *testing.T, auth Authenticator) (*Server, string) {
	t.Helper()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	srv, err := Open(ctx, Config{Dir: t.TempDir(), Mutators: reg, Authenticator: auth,
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		},
		Logger: slog.New(slog.DiscardHandler), AuthFailureBurst: 1 << 20, AuthFailureEvery: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.CreateDatabase(ctx, "acme"); err != nil {
		t.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return srv, addr
}

// openJWTReplica opens a replica of "acme" on srv that presents token, and
// makes one mutation (optimistic, pending until the server takes it).
func openJWTReplica(t *testing.T, srv *Server, addr, token string) *replica.Replica {
	t.Helper()
	ctx := context.Background()
	r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "r.db"), replica.Options{Mutators: srv.cfg.Mutators, User: "alice",
		Logger: slog.New(slog.DiscardHandler),
		Remote: &replica.Remote{Addr: addr, Database: "acme", Credential: token, Fingerprint: srv.Fingerprint()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("work", 1)); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestJWTRefusedEndToEnd: every way a token can be wrong, presented by a
// real replica to a real server: the replica stops with a fatal error that
// says why (an expired token instead keeps it retrying, for a fresh token
// cures it), its mutation stays pending, and the server's database does not
// change. A good token, last, shows the same setup does admit and apply.
func TestJWTRefusedEndToEnd(t *testing.T) {
	k := newTestKeys(t)
	jwksPath := writeFile(t, t.TempDir(), "jwks.json", k.jwks(t))
	a, err := NewJWTAuthenticator(JWTConfig{JWKSFile: jwksPath, HS256Secret: k.secret, Issuer: testIssuer, Audience: testAudience})
	if err != nil {
		t.Fatal(err)
	}
	srv, addr := startJWTServer(t, a)
	auth := srv.Authority("acme")
	before := auth.Version()

	now := time.Now()
	claims := func(edit ...func(map[string]any)) map[string]any {
		c := goodClaims(edit...)
		for _, f := range []string{"exp", "nbf", "iat"} { // goodClaims is on testNow; this server runs on the real clock
			if v, ok := c[f].(int64); ok {
				c[f] = now.Add(time.Duration(v-testNow.Unix()) * time.Second).Unix()
			}
		}
		return c
	}
	rs := func(c map[string]any) string { return mint(t, jose.RS256, k.rsa, "rsa", c) }
	rsaPKIX, err := x509.MarshalPKIXPublicKey(k.rsa.Public())
	if err != nil {
		t.Fatal(err)
	}
	rsaPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: rsaPKIX})
	claimsJSON, _ := json.Marshal(claims())
	valid := rs(claims())

	for _, tc := range []struct {
		name, token, reason string
		expired             bool
	}{
		{"expired", rs(claims(func(c map[string]any) { c["exp"] = testNow.Add(-time.Hour).Unix() })), "token expired at", true},
		{"not yet valid", rs(claims(func(c map[string]any) { c["nbf"] = testNow.Add(time.Hour).Unix() })), "token not valid before", false},
		{"wrong issuer", rs(claims(func(c map[string]any) { c["iss"] = "https://evil.example" })), `issuer "https://evil.example" is not`, false},
		{"wrong audience", rs(claims(func(c map[string]any) { c["aud"] = "billing" })), `audience ["billing"] does not include "sqlrebase"`, false},
		{"unknown kid", mint(t, jose.RS256, k.rsa, "rsa-2025", claims()), `unknown key id "rsa-2025"`, false},
		{"unrelated key", mint(t, jose.RS256, k.rsaOther, "rsa", claims()), `signature does not verify with key "rsa"`, false},
		{"alg none", handmade(`{"alg":"none"}`, string(claimsJSON), nil), `algorithm "none" not accepted`, false},
		{"HS256 with the RSA public key", handmade(`{"alg":"HS256","kid":"rsa"}`, string(claimsJSON), hs256(rsaPEM)), "signature does not verify (HS256)", false},
		{"another database", rs(claims(func(c map[string]any) { c["dbs"] = []string{"beta"} })), `no access to database "acme"`, false},
		{"garbage", "garbage", "malformed token: 1 dot-separated parts", false},
		{"two segments", strings.Join(strings.Split(valid, ".")[:2], "."), "malformed token: 2 dot-separated parts", false},
		{"bad base64", valid + "*", "malformed token: the signature is not base64url", false},
		{"bad JSON", handmade(`{"alg":"HS256"}`, `{"sub":`, hs256(k.secret)), "malformed claims", false},
		{"missing sub", rs(claims(func(c map[string]any) { delete(c, "sub") })), "token has no sub", false},
		{"missing exp", rs(claims(func(c map[string]any) { delete(c, "exp") })), "token has no exp", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := openJWTReplica(t, srv, addr, tc.token)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if tc.expired {
				// Not fatal: the replica keeps trying (its token source would
				// give it a fresh token). Wait, boundedly, for the refusal.
				for r.Status().LastError == nil {
					if ctx.Err() != nil {
						t.Fatal("no connection attempt within 20 s")
					}
					time.Sleep(20 * time.Millisecond)
				}
				if err := r.Status().LastError; !strings.Contains(err.Error(), tc.reason) {
					t.Fatalf("last error %v, want %q", err, tc.reason)
				}
				short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
				defer cancel()
				if err := r.WaitConnected(short); !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("WaitConnected: %v, want it still retrying", err)
				}
			} else {
				err := r.WaitConnected(ctx)
				if err == nil || errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), tc.reason) {
					t.Fatalf("WaitConnected: %v, want a fatal refusal saying %q", err, tc.reason)
				}
			}
			if p := r.Status().Pending; p != 1 {
				t.Fatalf("pending %d, want the mutation still pending", p)
			}
			if v := auth.Version(); v != before {
				t.Fatalf("server version %d, was %d: a refused token changed the database", v, before)
			}
		})
	}

	r := openJWTReplica(t, srv, addr, valid)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.Sync(ctx); err != nil {
		t.Fatalf("valid token: %v", err)
	}
	if v := auth.Version(); v != before+1 {
		t.Fatalf("server version %d after a valid token's mutation, want %d", v, before+1)
	}
}

// TestJWTExpiryMidSession: tokens that live two seconds, from a token
// source, while the app keeps mutating: each session ends at its token's
// exp with "credential expired", the replica fetches a fresh token and
// reconnects, and every mutation is applied exactly once, with no error
// reaching the app.
func TestJWTExpiryMidSession(t *testing.T) {
	if testing.Short() {
		t.Skip("several token lifetimes of real time")
	}
	k := newTestKeys(t)
	a, err := NewJWTAuthenticator(JWTConfig{HS256Secret: k.secret, Issuer: testIssuer, Audience: testAudience})
	if err != nil {
		t.Fatal(err)
	}
	srv, addr := startJWTServer(t, a)
	var mu sync.Mutex
	minted := 0
	token := func(ctx context.Context) (string, error) {
		mu.Lock()
		minted++
		mu.Unlock()
		return mint(t, jose.HS256, k.secret, "", map[string]any{"iss": testIssuer, "aud": testAudience, "sub": "alice",
			"exp": time.Now().Add(2 * time.Second).Unix(), "dbs": "*"}), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "r.db"), replica.Options{Mutators: srv.cfg.Mutators, User: "alice",
		Logger: slog.New(slog.DiscardHandler), Remote: &replica.Remote{Addr: addr, Database: "acme", Token: token, Fingerprint: srv.Fingerprint()}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const n = 60
	var handles []*replica.Handle
	for range n { // about 6 s: three token lifetimes at least
		h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("work", 1))
		if err != nil {
			t.Fatal(err)
		}
		handles = append(handles, h)
		time.Sleep(100 * time.Millisecond)
	}
	for i, h := range handles {
		if err := h.Wait(ctx); err != nil {
			t.Fatalf("mutation %d: %v", i, err)
		}
	}
	var count int
	rows, err := srv.Authority("acme").Query(ctx, `SELECT count FROM Categories WHERE name = 'work'`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		rows.Scan(&count)
	}
	rows.Close()
	if count != n {
		t.Fatalf("server count %d, want %d: a mutation was lost or applied twice", count, n)
	}
	if err := r.WaitConnected(ctx); err != nil {
		t.Fatalf("after the expiries: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d tokens minted", minted)
	if minted < 3 {
		t.Fatalf("%d tokens minted over %d token lifetimes: the sessions did not end at exp", minted, 3)
	}
}

// BenchmarkJWTAuthenticate is one token check per algorithm, against the
// baseline of one uncached shared-secret check (PBKDF2 at hashIterations),
// run in the same process: what a Hello costs the server in each mode.
func BenchmarkJWTAuthenticate(b *testing.B) {
	k := newTestKeys(b)
	path := writeFile(b, b.TempDir(), "jwks.json", k.jwks(b))
	a := newTestJWT(b, JWTConfig{JWKSFile: path, HS256Secret: k.secret})
	for _, tc := range []struct {
		name  string
		token string
	}{
		{"HS256", mint(b, jose.HS256, k.secret, "", goodClaims())},
		{"EdDSA", mint(b, jose.EdDSA, k.ed, "ed", goodClaims())},
		{"ES256", mint(b, jose.ES256, k.ec, "ec", goodClaims())},
		{"RS256", mint(b, jose.RS256, k.rsa, "rsa", goodClaims())},
	} {
		b.Run(tc.name, func(b *testing.B) {
			req := authReq("acme", tc.token)
			for b.Loop() {
				if _, err := a.Authenticate(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("baseline-secret-PBKDF2", func(b *testing.B) {
		salt := make([]byte, 16)
		for b.Loop() {
			if _, err := pbkdf2.Key(sha256.New, "a shared secret", salt, hashIterations, 32); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// FuzzParseJWKS: a key set file, as read from disk, never panics the
// parser, and what it accepts is only public signing keys, at least one.
func FuzzParseJWKS(f *testing.F) {
	k := newTestKeys(f)
	f.Add(k.jwks(f))
	f.Add(jwksOfUse(f, k.rsa.Public(), "enc"))
	f.Add([]byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}`))
	f.Add([]byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}`))
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"keys":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		keys, err := parseJWKS(b)
		if err != nil {
			return
		}
		if len(keys) == 0 {
			t.Fatal("accepted a set with no keys")
		}
		for _, key := range keys {
			if !key.IsPublic() || !key.Valid() {
				t.Fatalf("accepted key %+v: not a valid public key", key)
			}
		}
	})
}
