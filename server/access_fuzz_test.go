package server

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzLoadAccess: whatever bytes access.json holds, loading it fails with
// an error or gives an access whose checks, bindings and listings do not
// panic.
func FuzzLoadAccess(f *testing.F) {
	f.Add([]byte(`{"credentials":[{"id":"ab","salt":"AAAA","hash":"AAAA","iter":1}],"clients":{"c":"ab"}}`))
	f.Add([]byte(`{"credentials":[{"id":"ab","name":"alice","salt":"","hash":"","iter":-5}],"revoked":["x"],"revoked_users":["m"]}`))
	f.Add([]byte(`{"credentials":[{"id":"ab","salt":"AAAA","hash":"AAAA","gen":2,"prev":{"salt":"AAAA","hash":"AAAA","gen":1,"until":"2999-01-01T00:00:00Z"}}]}`))
	f.Add([]byte(`{"credentials":[{"id":"ab","salt":"AAAA","hash":"AAAA","prev":{"salt":"","hash":"","iter":-1,"gen":-3,"until":"x"}}]}`))
	f.Add([]byte(`{"clients":null}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, b []byte) {
		path := filepath.Join(t.TempDir(), "access.json")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		a, err := loadAccess(path, 1)
		if err != nil {
			return
		}
		for i := range a.file.Credentials { // bound the work a fuzzed file asks for
			a.file.Credentials[i].Iter = 1
			if p := a.file.Credentials[i].Prev; p != nil {
				p.Iter = 1
			}
		}
		if c, err := a.check("secret"); err == nil {
			a.bind("c", c.userID())
		}
		a.revokedReason(Identity{UserID: "m", Credential: "x"})
		a.revokedReason(Identity{UserID: "m", Credential: "ab", secret: true, secretGen: 1})
		a.graceEnd(Identity{UserID: "m", Credential: "ab", secret: true, secretGen: 1})
		a.rotate("ab", "s2", time.Minute)
		a.view()
		a.revoke("ab")
	})
}

// FuzzAdminHandler: no request, however formed, makes the admin API panic
// or answer 5xx; without the token nothing is done.
func FuzzAdminHandler(f *testing.F) {
	f.Add("POST", "/v1/databases", []byte(`{"name":"acme"}`), true)
	f.Add("POST", "/v1/databases/demo/secrets", []byte(`{"user":"alice","secret":"s"}`), true)
	f.Add("PUT", "/v1/databases/demo/secrets/alice", []byte(`{"secret":"t"}`), true)
	f.Add("PUT", "/v1/databases/demo/secrets/alice", []byte(`{"secret":"u","grace":"30s"}`), true)
	f.Add("POST", "/v1/databases/demo/users/alice/restore", []byte(nil), true)
	f.Add("DELETE", "/v1/databases/demo/secrets/alice", []byte(nil), true)
	f.Add("POST", "/v1/databases/demo/users/%2F/revoke", []byte(nil), true)
	f.Add("GET", "/v1/databases/demo/users", []byte(nil), false)
	srv, _ := testServer(f, f.TempDir(), func(c *Config) { c.CredentialHashIterations = 1 })
	h := srv.AdminHandler("tok")
	f.Fuzz(func(t *testing.T, method, path string, body []byte, auth bool) {
		if len(path) == 0 || path[0] != '/' {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(context.Background(), method, "http://admin"+path, bytes.NewReader(body))
		if err != nil {
			return
		}
		if auth {
			req.Header.Set("Authorization", "Bearer tok")
		}
		before := len(srv.Databases())
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%s %s %q: %d %s", method, path, body, rec.Code, rec.Body.String())
		}
		if !auth && (rec.Code != http.StatusUnauthorized || len(srv.Databases()) != before) {
			t.Fatalf("without the token: %d", rec.Code)
		}
	})
}
