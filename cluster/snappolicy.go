package cluster

// SnapshotPolicy says when an owner writes a database's snapshot. A
// snapshot bounds what a restore reads (the image, then the versions
// after it, one direct get each) and lets the stream be trimmed behind it.
// Zero fields take the defaults named.
type SnapshotPolicy struct {
	// MinVersions is the fewest versions between two snapshots
	// (DefaultSnapshotMinVersions): a snapshot costs an object-store put
	// of the whole image and a purge, so a small, busy database whose
	// versions soon outweigh it would otherwise be snapshotted every few
	// versions.
	MinVersions uint64
	// MaxVersions is the most versions between two snapshots
	// (DefaultSnapshotMaxVersions), however little they weigh: a restore
	// reads the versions after the snapshot one round trip each, so a large
	// database with small versions would otherwise make restores replay
	// millions of them.
	MaxVersions uint64
}

// Snapshot policy defaults.
//
// MaxVersions = 10,000: a restore reads each version after the snapshot
// with one JetStream direct get (Log.Read), measured at 0.09 ms each over
// the in-process connection to a single embedded node on the loaded
// 2-vCPU machine (BenchmarkRestoreRead, snappolicy_test.go: 88,524 ns/op);
// 10,000 of them are about 0.9 s, a fifth of the 5 s fail-over,
// on top of the image. Across machines a get is a network round trip
// (0.1-1 ms in one region), 1-10 s for 10,000: the bound is what keeps a
// restore in seconds. A larger N makes fewer snapshots of a large database
// with small versions (the bytes rule does not trigger there), at the cost
// of slower restores; a smaller one the reverse.
//
// MinVersions = 100: with small versions on a small database the bytes
// rule would snapshot every few versions; a put of a small image costs a
// few round trips (meta, chunks, purge of the old object), so one
// snapshot per 100 versions keeps the snapshot's work below 10% of the
// versions' appends even for a one-page database.
const (
	DefaultSnapshotMinVersions = 100
	DefaultSnapshotMaxVersions = 10_000
)

func (p SnapshotPolicy) withDefaults() SnapshotPolicy {
	if p.MinVersions == 0 {
		p.MinVersions = DefaultSnapshotMinVersions
	}
	if p.MaxVersions == 0 {
		p.MaxVersions = DefaultSnapshotMaxVersions
	}
	if p.MaxVersions < p.MinVersions {
		p.MaxVersions = p.MinVersions
	}
	return p
}

// due is the policy's decision: after versions versions of bytes bytes
// since the last snapshot, on a database of dbBytes bytes, is a snapshot
// due? When the versions since outweigh the database, a restore reads more
// log than image, and the stream holds more than the database's size of
// this subject: the same rule the change log uses to prefer a snapshot for
// a catch-up. p must have its defaults.
func (p SnapshotPolicy) due(versions, bytes, dbBytes uint64) bool {
	return versions >= p.MinVersions && (bytes > dbBytes || versions >= p.MaxVersions)
}

// snapState is the snapshot state machine of one owned database: it
// counts the versions appended since the last snapshot and decides, at
// each append, whether to start one, with at most one in flight. Its
// caller serialises calls (owned.smu). Counts are of versions appended by
// this owner (and, at the start, the versions since the stored snapshot),
// so a snapshot that pins a later version than the one that triggered it
// only makes the next one come a little early.
type snapState struct {
	policy SnapshotPolicy // with defaults

	versions, bytes uint64 // since the last snapshot began (or the stored one)
	inFlight        bool
	pendV, pendB    uint64 // what the snapshot in flight covers, given back if it fails
	holdUntil       uint64 // after a failure: no new attempt before versions reaches it
}

func newSnapState(p SnapshotPolicy, since uint64) snapState {
	return snapState{policy: p.withDefaults(), versions: since}
}

// appended records one appended version of recBytes bytes, on a database
// that is now dbBytes bytes, and reports whether a snapshot should start
// now; if so, the caller must call finished once it ends.
func (s *snapState) appended(recBytes, dbBytes uint64) bool {
	s.versions++
	s.bytes += recBytes
	if s.inFlight || s.versions < s.holdUntil || !s.policy.due(s.versions, s.bytes, dbBytes) {
		return false
	}
	s.inFlight = true
	s.pendV, s.pendB = s.versions, s.bytes
	s.versions, s.bytes, s.holdUntil = 0, 0, 0
	return true
}

// finished ends the snapshot in flight. A failed one gives its counts
// back, and the next attempt waits MinVersions more versions, so that a
// snapshot store that is down is not retried at every version.
func (s *snapState) finished(ok bool) {
	if !s.inFlight {
		return
	}
	s.inFlight = false
	if !ok {
		s.versions += s.pendV
		s.bytes += s.pendB
		s.holdUntil = s.versions + s.policy.MinVersions
	}
	s.pendV, s.pendB = 0, 0
}
