package chaos

import (
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// fileFaultsHooked says whether withFileFaults puts the hook under the
// replica's own file I/O. The replica package has no exported way to yet;
// until it does, the suite plans disk faults but cannot make them.
const fileFaultsHooked = false

// withFileFaults returns opts with f under the replica's files.
func withFileFaults(opts replica.Options, f *vfs.Faults) replica.Options {
	_ = f
	return opts
}
