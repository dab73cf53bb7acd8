package replica

import "github.com/sqlrebase/sqlrebase/vfs"

// WithFileFaults returns opts with f as the fault hook under the replica's
// own file I/O (vfs.ReplicaOptions.Faults), in every life opened with
// them. It is for tests outside this package, such as the chaos suite,
// that fail a replica's disk; applications never set it.
func WithFileFaults(opts Options, f *vfs.Faults) Options {
	opts.fileFaults = f
	return opts
}
