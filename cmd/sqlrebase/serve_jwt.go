package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"

	"github.com/sqlrebase/sqlrebase/server"
)

// jwtFlags are serve's --jwt-* flags: with any of them, Hellos present
// JWTs (server.NewJWTAuthenticator) instead of the databases' secrets.
type jwtFlags struct {
	jwks, secretFile, issuer, audience, dbsClaim *string
}

// register adds the flags to fs.
func (j *jwtFlags) register(fs *flag.FlagSet) {
	j.jwks = fs.String("jwt-jwks", "", "accept JWTs signed by the keys of this JWKS file (RS256, ES256, EdDSA; re-read when it changes)")
	j.secretFile = fs.String("jwt-hs256-secret-file", "", "accept HS256 JWTs signed with the secret in this file (at least 32 bytes; a trailing newline is dropped)")
	j.issuer = fs.String("jwt-issuer", "", "with --jwt-*: the tokens' required iss")
	j.audience = fs.String("jwt-audience", "", "with --jwt-*: a value the tokens' aud must include")
	j.dbsClaim = fs.String("jwt-dbs-claim", server.DefaultDatabasesClaim, `with --jwt-*: the claim listing the databases a token may open (a JSON array of names, or "*")`)
}

// enabled reports whether JWT mode was asked for.
func (j *jwtFlags) enabled() bool {
	return *j.jwks != "" || *j.secretFile != "" || *j.issuer != "" || *j.audience != "" ||
		*j.dbsClaim != server.DefaultDatabasesClaim // else a lone --jwt-dbs-claim would be ignored silently
}

// authenticator builds the JWT authenticator the flags describe.
func (j *jwtFlags) authenticator(log *slog.Logger) (*server.JWTAuthenticator, error) {
	if *j.jwks == "" && *j.secretFile == "" {
		return nil, errors.New("JWT mode needs --jwt-jwks FILE or --jwt-hs256-secret-file FILE")
	}
	if *j.issuer == "" || *j.audience == "" {
		return nil, errors.New("JWT mode needs --jwt-issuer and --jwt-audience")
	}
	cfg := server.JWTConfig{JWKSFile: *j.jwks, Issuer: *j.issuer, Audience: *j.audience, DatabasesClaim: *j.dbsClaim, Logger: log}
	if *j.secretFile != "" {
		b, err := os.ReadFile(*j.secretFile)
		if err != nil {
			return nil, fmt.Errorf("--jwt-hs256-secret-file: %w", err)
		}
		// Editors and `echo` end files with a newline; it is not part of
		// the secret the issuer signs with.
		cfg.HS256Secret = bytes.TrimSuffix(bytes.TrimSuffix(b, []byte("\n")), []byte("\r"))
	}
	return server.NewJWTAuthenticator(cfg)
}
