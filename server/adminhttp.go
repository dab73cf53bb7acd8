package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// maxAdminBody bounds an admin request's body (64 KiB: names and secrets).
const maxAdminBody = 64 << 10

// AdminHandler serves the admin API: databases, secrets, clients and users
// managed while the server runs. Serve it on a listener of its own,
// loopback unless the network in front of it is trusted (`serve --admin`
// does). Every request needs "Authorization: Bearer TOKEN"; the token is
// compared in constant time, and an empty token refuses every request.
//
//	POST   /v1/databases                          {"name"}            create a database
//	POST   /v1/databases/{db}/secrets             {"user","secret"}   add a secret (user optional)
//	PUT    /v1/databases/{db}/secrets/{ref}       {"secret","grace"}  rotate secret ref (id or user); grace "30s" optional
//	DELETE /v1/databases/{db}/secrets/{ref}                           revoke it: {"ended": N}
//	POST   /v1/databases/{db}/users/{user}/revoke                     revoke a user: {"ended": N}
//	POST   /v1/databases/{db}/users/{user}/restore                    lift it: {"restored": bool}
//	GET    /v1/databases/{db}/clients                                 [ClientInfo]
//	GET    /v1/databases/{db}/users                                   [UserInfo]
//
// Errors are {"error": "..."} with 400 (invalid argument), 401 (no or a
// wrong token), 404 (no such database or secret), 409 (exists) or 500.
func (s *Server) AdminHandler(token string) http.Handler {
	want := sha256.Sum256([]byte(token))
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/databases", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Name string `json:"name"`
		}
		if !decode(w, r, &req) {
			return
		}
		if err := s.CreateDatabase(r.Context(), req.Name); err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusCreated, map[string]string{"name": req.Name})
	})
	mux.HandleFunc("POST /v1/databases/{db}/secrets", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			User   string `json:"user"`
			Secret string `json:"secret"`
		}
		if !decode(w, r, &req) {
			return
		}
		c, err := s.AddSecret(r.Context(), r.PathValue("db"), req.User, req.Secret)
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusCreated, c)
	})
	mux.HandleFunc("PUT /v1/databases/{db}/secrets/{ref}", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Secret string `json:"secret"`
			// Grace is how long the old secret is still accepted, as
			// time.ParseDuration reads it ("30s"; empty: 0).
			Grace string `json:"grace,omitempty"`
		}
		if !decode(w, r, &req) {
			return
		}
		var grace time.Duration
		if req.Grace != "" {
			var err error
			if grace, err = time.ParseDuration(req.Grace); err != nil {
				adminError(w, fmt.Errorf("%w: grace: %v", ErrInvalid, err))
				return
			}
		}
		c, err := s.RotateSecret(r.Context(), r.PathValue("db"), r.PathValue("ref"), req.Secret, grace)
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusOK, c)
	})
	mux.HandleFunc("DELETE /v1/databases/{db}/secrets/{ref}", func(w http.ResponseWriter, r *http.Request) {
		n, err := s.RevokeSecret(r.Context(), r.PathValue("db"), r.PathValue("ref"))
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusOK, map[string]int{"ended": n})
	})
	mux.HandleFunc("POST /v1/databases/{db}/users/{user}/revoke", func(w http.ResponseWriter, r *http.Request) {
		n, err := s.RevokeUser(r.Context(), r.PathValue("db"), r.PathValue("user"))
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusOK, map[string]int{"ended": n})
	})
	mux.HandleFunc("POST /v1/databases/{db}/users/{user}/restore", func(w http.ResponseWriter, r *http.Request) {
		ok, err := s.RestoreUser(r.Context(), r.PathValue("db"), r.PathValue("user"))
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusOK, map[string]bool{"restored": ok})
	})
	mux.HandleFunc("GET /v1/databases/{db}/clients", func(w http.ResponseWriter, r *http.Request) {
		cs, err := s.Clients(r.Context(), r.PathValue("db"))
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusOK, cs)
	})
	mux.HandleFunc("GET /v1/databases/{db}/users", func(w http.ResponseWriter, r *http.Request) {
		us, err := s.Users(r.Context(), r.PathValue("db"))
		if err != nil {
			adminError(w, err)
			return
		}
		reply(w, http.StatusOK, us)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		// Hashes of equal length compared in constant time: neither the
		// token's bytes nor its length leak through timing.
		h := sha256.Sum256([]byte(got))
		if token == "" || !ok || subtle.ConstantTimeCompare(h[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="sqlrebase admin"`)
			reply(w, http.StatusUnauthorized, map[string]string{"error": "missing or wrong admin token"})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// decode reads a JSON request body into v, or answers 400.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		reply(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("request body: %v", err)})
		return false
	}
	return true
}

// adminError answers err with its status.
func adminError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrInvalid):
		code = http.StatusBadRequest
	case errors.Is(err, ErrUnknownDatabase), errors.Is(err, ErrNoCredential):
		code = http.StatusNotFound
	case errors.Is(err, ErrCredentialExists):
		code = http.StatusConflict
	}
	reply(w, code, map[string]string{"error": err.Error()})
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}
