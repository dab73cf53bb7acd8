package chaos

import (
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// fileFaultsHooked says whether withFileFaults puts the hook under the
// replica's own file I/O, so that planned I/O errors are made.
const fileFaultsHooked = true

// withFileFaults returns opts with f under the replica's files.
func withFileFaults(opts replica.Options, f *vfs.Faults) replica.Options {
	return replica.WithFileFaults(opts, f)
}
