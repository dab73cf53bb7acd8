package replica

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/internal/policytest"
)

// TestReplicaEnforcesMutatorContract runs the table the server's test runs
// too (server.TestServerEnforcesMutatorContract): one contract, enforced
// the same way on both sides.
func TestReplicaEnforcesMutatorContract(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	for _, c := range policytest.Forbidden {
		h := mustMutate(t, r, "exec", execArgs(c.SQL))
		if err := h.LocalErr(); !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), c.Why) {
			t.Errorf("%s: local error %v, want ErrForbidden with %q", c.SQL, err, c.Why)
		}
	}
}
