package server

// The JWT authenticator uses github.com/go-jose/go-jose/v4. One module
// parses JWKS files (jose.JSONWebKeySet) and verifies JSON Web Signatures
// with an explicit algorithm allow-list at parse time, which closes
// "alg": "none" and HS256/RSA confusion by construction (a token whose alg
// is not on the list never reaches a key, and an HMAC verifier is only ever
// given the configured secret). It has no transitive dependencies, and is
// kept by the go-jose organisation (Kubernetes verifies its service-account
// tokens with it). golang-jwt/jwt/v5 would need a second library or
// hand-written JWKS parsing; lestrrat-go/jwx/v3 brings a large dependency
// tree.

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Defaults and limits of the JWT authenticator.
const (
	// DefaultJWTLeeway is the clock skew allowed on exp and nbf: enough for
	// ordinary NTP drift between the token issuer and this server, short
	// next to a token lifetime of minutes.
	DefaultJWTLeeway = 30 * time.Second
	// DefaultDatabasesClaim is the claim that lists the databases a token
	// may open: a JSON array of names, or "*" for all.
	DefaultDatabasesClaim = "dbs"
	// MinHS256SecretBytes is the shortest HS256 secret accepted: RFC 7518
	// §3.2 asks for a key at least as long as the hash output (32 bytes),
	// and go-jose refuses shorter ones when verifying.
	MinHS256SecretBytes = 32
	// maxTokenBytes bounds a token before it is decoded: real tokens are
	// well under 4 KiB; this keeps a hostile Hello from making the server
	// base64-decode and parse megabytes.
	maxTokenBytes = 16 << 10
)

// The algorithms the authenticator accepts. Keys from a JWKS verify the
// asymmetric ones; only the configured secret verifies HS256.
var (
	jwksAlgorithms = []jose.SignatureAlgorithm{jose.RS256, jose.ES256, jose.EdDSA}
	hmacAlgorithms = []jose.SignatureAlgorithm{jose.HS256}
)

// JWTConfig configures [NewJWTAuthenticator]. At least one of JWKSFile and
// HS256Secret is required, and so are Issuer and Audience.
type JWTConfig struct {
	// JWKSFile is a JSON Web Key Set file with the issuer's public keys
	// (RS256, ES256 on P-256, EdDSA on Ed25519). It is re-read when it
	// changes (checked at most once a second, on use), so keys rotate
	// without a restart; a file that no longer parses keeps the old keys.
	JWKSFile string
	// HS256Secret verifies HS256 tokens (at least MinHS256SecretBytes).
	// Without it, HS256 tokens are refused.
	HS256Secret []byte
	// Issuer must equal the token's "iss".
	Issuer string
	// Audience must be one of the token's "aud". It is required: without
	// it a token the same issuer minted for another service would open
	// this one's databases.
	Audience string
	// Leeway is the clock skew allowed on nbf and exp when a token is
	// checked (0: DefaultJWTLeeway; negative: none). Identity.Expires is
	// exp itself, so a server ends the session at exp by its own clock,
	// and refuses a Hello whose token's exp has passed as expired (which a
	// replica's token source cures): on exp the leeway matters only to
	// callers of Authenticate that do not enforce Expires.
	Leeway time.Duration
	// DatabasesClaim names the claim listing the databases a token may
	// open (empty: DefaultDatabasesClaim).
	DatabasesClaim string
	// AllowDatabase, if set, decides instead of the claim whether a
	// token's claims (all of them, verified) may open db.
	AllowDatabase func(claims map[string]any, db string) bool
	// Now is the clock exp and nbf are checked against (nil: time.Now),
	// for tests.
	Now func() time.Time
	// Logger receives JWKS reload failures (nil: slog.Default()).
	Logger *slog.Logger
}

// JWTAuthenticator is an [Authenticator] for JSON Web Tokens: the Hello's
// credential is a compact JWS whose "sub" becomes Identity.UserID. It is
// safe for concurrent use and holds no lock while it verifies.
type JWTAuthenticator struct {
	cfg    JWTConfig
	algs   []jose.SignatureAlgorithm // the allow-list handed to the parser
	jwks   *jwksSource               // nil: no JWKS file
	secret []byte                    // nil: no HS256
}

var _ Authenticator = (*JWTAuthenticator)(nil)

// NewJWTAuthenticator checks cfg, loads its JWKS file (an error if it does
// not parse), and returns the authenticator.
func NewJWTAuthenticator(cfg JWTConfig) (*JWTAuthenticator, error) {
	if cfg.JWKSFile == "" && len(cfg.HS256Secret) == 0 {
		return nil, errors.New("jwt: give a JWKS file or an HS256 secret")
	}
	if len(cfg.HS256Secret) > 0 && len(cfg.HS256Secret) < MinHS256SecretBytes {
		return nil, fmt.Errorf("jwt: the HS256 secret has %d bytes; at least %d are required", len(cfg.HS256Secret), MinHS256SecretBytes)
	}
	if cfg.Issuer == "" {
		return nil, errors.New("jwt: an issuer is required")
	}
	if cfg.Audience == "" {
		return nil, errors.New("jwt: an audience is required (else tokens the issuer minted for other services are accepted)")
	}
	if cfg.Leeway == 0 {
		cfg.Leeway = DefaultJWTLeeway
	} else if cfg.Leeway < 0 {
		cfg.Leeway = 0
	}
	if cfg.DatabasesClaim == "" {
		cfg.DatabasesClaim = DefaultDatabasesClaim
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &JWTAuthenticator{cfg: cfg}
	if cfg.JWKSFile != "" {
		src, err := openJWKS(cfg.JWKSFile, cfg.Logger)
		if err != nil {
			return nil, fmt.Errorf("jwt: %w", err)
		}
		a.jwks = src
		a.algs = append(a.algs, jwksAlgorithms...)
	}
	if len(cfg.HS256Secret) > 0 {
		a.secret = slices.Clone(cfg.HS256Secret)
		a.algs = append(a.algs, hmacAlgorithms...)
	}
	return a, nil
}

// refuse is a permanent refusal.
func refuse(format string, args ...any) *AuthError {
	return &AuthError{Reason: fmt.Sprintf(format, args...)}
}

// Authenticate verifies req.Credential as a JWT: its signature (by the
// configured keys and algorithms only), then iss, aud, sub, the databases
// it grants, nbf and exp, in that order, so that a token refused as expired
// (the one refusal a fresh token cures) has nothing else wrong with it.
func (a *JWTAuthenticator) Authenticate(ctx context.Context, req AuthRequest) (Identity, error) {
	if err := ctx.Err(); err != nil {
		return Identity{}, err
	}
	token := req.Credential
	if len(token) > maxTokenBytes {
		return Identity{}, refuse("malformed token: %d bytes, more than %d", len(token), maxTokenBytes)
	}
	jws, err := jose.ParseSignedCompact(token, a.algs)
	if err != nil {
		return Identity{}, a.describeParseError(token, err)
	}
	if len(jws.Signatures) != 1 { // compact serialisation has one; be sure
		return Identity{}, refuse("malformed token: %d signatures", len(jws.Signatures))
	}
	h := jws.Signatures[0].Header
	alg := jose.SignatureAlgorithm(h.Algorithm)
	payload, err := a.verify(jws, alg, h.KeyID)
	if err != nil {
		return Identity{}, err
	}
	var std jwt.Claims
	var claims map[string]any
	if err := json.Unmarshal(payload, &std); err != nil {
		return Identity{}, refuse("malformed claims: %v", err)
	}
	if err := json.Unmarshal(payload, &claims); err != nil || claims == nil {
		return Identity{}, refuse("malformed claims: not a JSON object")
	}
	return a.check(std, claims, req.Database)
}

// verify returns the token's payload if a configured key of alg verifies
// its signature.
func (a *JWTAuthenticator) verify(jws *jose.JSONWebSignature, alg jose.SignatureAlgorithm, kid string) ([]byte, error) {
	if alg == jose.HS256 {
		// The parser's allow-list has HS256 only when a secret is set;
		// the secret is the only key an HMAC is ever checked with.
		payload, err := jws.Verify(a.secret)
		if err != nil {
			return nil, refuse("signature does not verify (HS256)")
		}
		return payload, nil
	}
	keys := a.jwks.current()
	var candidates []jose.JSONWebKey
	for _, k := range keys {
		if kid != "" && k.KeyID != kid {
			continue
		}
		if keyFits(k, alg) {
			candidates = append(candidates, k)
		}
	}
	if len(candidates) == 0 {
		if kid != "" {
			if slices.ContainsFunc(keys, func(k jose.JSONWebKey) bool { return k.KeyID == kid }) {
				return nil, refuse("key %q is not an %s key", kid, alg)
			}
			return nil, refuse("unknown key id %q", kid)
		}
		return nil, refuse("no %s key in the key set", alg)
	}
	for _, k := range candidates {
		if payload, err := jws.Verify(k.Key); err == nil {
			return payload, nil
		}
	}
	if kid != "" {
		return nil, refuse("signature does not verify with key %q (%s)", kid, alg)
	}
	return nil, refuse("signature does not verify with any %s key", alg)
}

// keyFits reports whether k may verify alg: its type (and curve) match, and
// its own "alg", where it states one, is alg.
func keyFits(k jose.JSONWebKey, alg jose.SignatureAlgorithm) bool {
	if k.Algorithm != "" && k.Algorithm != string(alg) {
		return false
	}
	switch key := k.Key.(type) {
	case *rsa.PublicKey:
		return alg == jose.RS256
	case *ecdsa.PublicKey:
		return alg == jose.ES256 && key.Curve == elliptic.P256()
	case ed25519.PublicKey:
		return alg == jose.EdDSA
	}
	return false
}

// check decides on verified claims.
func (a *JWTAuthenticator) check(std jwt.Claims, claims map[string]any, db string) (Identity, error) {
	if std.Issuer != a.cfg.Issuer {
		return Identity{}, refuse("issuer %q is not %q", std.Issuer, a.cfg.Issuer)
	}
	if !std.Audience.Contains(a.cfg.Audience) {
		return Identity{}, refuse("audience %q does not include %q", []string(std.Audience), a.cfg.Audience)
	}
	if std.Subject == "" {
		return Identity{}, refuse("token has no sub")
	}
	if std.Expiry == nil {
		return Identity{}, refuse("token has no exp")
	}
	if err := a.allowed(claims, db); err != nil {
		return Identity{}, err
	}
	now := a.cfg.Now()
	if std.NotBefore != nil && now.Add(a.cfg.Leeway).Before(std.NotBefore.Time()) {
		return Identity{}, refuse("token not valid before %s", std.NotBefore.Time().UTC().Format(time.RFC3339))
	}
	exp := std.Expiry.Time()
	if now.Add(-a.cfg.Leeway).After(exp) {
		return Identity{}, &AuthError{Reason: "token expired at " + exp.UTC().Format(time.RFC3339), Expired: true}
	}
	return Identity{UserID: std.Subject, Claims: claims, Expires: exp, Credential: std.ID}, nil
}

// allowed decides whether claims grant db: the callback if configured,
// else the databases claim.
func (a *JWTAuthenticator) allowed(claims map[string]any, db string) error {
	if a.cfg.AllowDatabase != nil {
		if a.cfg.AllowDatabase(claims, db) {
			return nil
		}
		return refuse("no access to database %q", db)
	}
	name := a.cfg.DatabasesClaim
	v, ok := claims[name]
	if !ok {
		return refuse("no access to database %q: the token has no %q claim", db, name)
	}
	switch v := v.(type) {
	case string:
		if v == "*" {
			return nil
		}
	case []any:
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return refuse("claim %q is not a list of names or \"*\"", name)
			}
			if s == db {
				return nil
			}
		}
		return refuse("no access to database %q", db)
	}
	return refuse("claim %q is not a list of names or \"*\"", name)
}

// describeParseError turns the parser's refusal into a reason a person can
// act on, looking at the token's header where it decodes.
func (a *JWTAuthenticator) describeParseError(token string, err error) *AuthError {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return refuse("malformed token: %d dot-separated parts, want 3", len(parts))
	}
	for i, what := range []string{"header", "claims", "signature"} {
		if _, derr := base64.RawURLEncoding.DecodeString(parts[i]); derr != nil {
			return refuse("malformed token: the %s is not base64url", what)
		}
	}
	raw, _ := base64.RawURLEncoding.DecodeString(parts[0])
	var hdr struct {
		Alg string `json:"alg"`
	}
	if json.Unmarshal(raw, &hdr) != nil {
		return refuse("malformed token: the header is not a JSON object")
	}
	alg := jose.SignatureAlgorithm(hdr.Alg)
	if hdr.Alg != "" && !slices.Contains(a.algs, alg) {
		if alg == jose.HS256 {
			return refuse("algorithm HS256 not accepted: this server has no HS256 secret")
		}
		return refuse("algorithm %q not accepted (accepted: %s)", hdr.Alg, joinAlgs(a.algs))
	}
	return refuse("malformed token: %v", err)
}

func joinAlgs(algs []jose.SignatureAlgorithm) string {
	s := make([]string, len(algs))
	for i, a := range algs {
		s[i] = string(a)
	}
	return strings.Join(s, ", ")
}
