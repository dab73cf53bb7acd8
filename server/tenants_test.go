package server

import (
	"testing"
)

// pinnedDB opens a database of srv and pins it open, as Authority does.
func pinnedDB(t testing.TB, srv *Server, name string) *database {
	t.Helper()
	tn, err := srv.tenant(name)
	if err != nil {
		t.Fatal(err)
	}
	d, err := srv.reg.pin(t.Context(), tn)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
