// Package cluster runs sqlrebase databases on NATS JetStream: an embedded
// NATS server (Node), each database's versions as one subject of a shared
// stream with a fenced writer (Log, Appender), the one-owner-per-database
// lease on a KV bucket with a per-key TTL (Leases, Lease), and snapshots in
// the object store (Snapshots). docs/CLUSTER.md is the design; this package
// holds no consensus of its own: every decision that needs agreement is a
// JetStream write that a Raft group orders.
//
// Imports point downhill: cluster may import server, protocol and wal;
// server never imports cluster.
package cluster

import (
	"errors"
	"strings"
	"time"
)

// Sentinel errors. Callers branch on them with errors.Is.
var (
	// ErrFenced is the error of an append refused because another writer
	// appended to the database's subject since this Appender last did: this
	// node is no longer the database's owner, whatever its lease says. The
	// Appender refuses every later append; the node must stop serving the
	// database and discard any version it committed locally and did not
	// get into the stream.
	ErrFenced = errors.New("cluster: fenced: another writer appended to this database's log")
	// ErrAppendFailed is the error of an append whose version is not known
	// to be in the stream (a timeout, no quorum, a lost connection). The
	// Appender refuses every later append: the owner must not acknowledge
	// the version, and reopens the database from the stream.
	ErrAppendFailed = errors.New("cluster: append failed: the version is not known to be in the stream")
	// ErrVersionOrder is the error of an append whose version does not
	// follow the subject's last one. Nothing is written.
	ErrVersionOrder = errors.New("cluster: version out of order")
	// ErrTooLarge is the error of an append of a version larger than the
	// NATS connection's maximum payload. Nothing is written.
	ErrTooLarge = errors.New("cluster: version larger than the maximum message payload")
	// ErrBadEntry is the error of reading a message on a database's subject
	// that lacks a valid version header: something other than an Appender
	// wrote there.
	ErrBadEntry = errors.New("cluster: log message without a valid version header")
	// ErrLeaseHeld is the error of acquiring a lease another holder has.
	ErrLeaseHeld = errors.New("cluster: the lease is held by another node")
	// ErrLeaseLost is the error of renewing (or using) a lease that another
	// holder took, that expired, or that was not renewed within its TTL by
	// the holder's own clock.
	ErrLeaseLost = errors.New("cluster: the lease was lost")
	// ErrNoSnapshot is the error of reading the snapshot of a database
	// that has none.
	ErrNoSnapshot = errors.New("cluster: no snapshot of this database")
	// ErrSnapshotChecksum is the error of a snapshot image whose pages do
	// not give the checksum it claims.
	ErrSnapshotChecksum = errors.New("cluster: snapshot checksum mismatch")
	// ErrSnapshotReplaced is the error of reading a snapshot that a newer
	// one replaced meanwhile: the object store purges the old one's
	// chunks once the new one is stored, and a read of them would wait
	// for chunks that never come. Restore starts again from the new one.
	ErrSnapshotReplaced = errors.New("cluster: the snapshot was replaced while it was read")
	// ErrBrokenChain is the error of a restore whose versions do not link:
	// a version that does not follow the one before, whose checksum before
	// is not the image's, or whose pages do not give its checksum after.
	// Our checksums are the split-brain detector, as LiteFS's are.
	ErrBrokenChain = errors.New("cluster: the version chain does not link")
	// ErrNotReady is the error of a node that did not become ready (client
	// port, routes, JetStream) before its context ended.
	ErrNotReady = errors.New("cluster: NATS server not ready")
)

// Names and limits.
const (
	// DefaultStream is the shared stream every database's versions go to,
	// one subject each: JetStream runs a Raft group per stream, and a node
	// bounds them (max_ha_assets), so a stream per database would not
	// scale to many databases.
	DefaultStream = "SQLREBASE_VERSIONS"
	// SubjectPrefix starts every database's version subject.
	SubjectPrefix = "sqlrebase.v."
	// DefaultLeaseBucket is the KV bucket of the databases' leases.
	DefaultLeaseBucket = "sqlrebase-leases"
	// DefaultSnapshotBucket is the object store of the databases' snapshots.
	DefaultSnapshotBucket = "sqlrebase-snapshots"
	// DefaultLeaseTTL is a lease's life without a renewal. RESEARCH.md
	// measured a 3 s per-key TTL releasing a dead holder in 3.0 s, and an
	// R3 stream electing a new leader after a SIGKILL in a median 4.7 s;
	// the two run at once, so fail-over stays near the 5 s.
	DefaultLeaseTTL = 3 * time.Second
	// MinLeaseTTL is the shortest TTL JetStream accepts on a message.
	MinLeaseTTL = time.Second
	// DefaultMaxPayload is the embedded server's maximum message size:
	// one version is one message. NATS defaults to 1 MiB and warns above
	// 8 MiB; a larger version is refused with ErrTooLarge (see
	// docs/CLUSTER.md: atomic batches are the planned way past it).
	DefaultMaxPayload = 8 << 20

	// Message headers of a version.
	headerVersion = "Sqlrebase-Version"
	headerOwner   = "Sqlrebase-Owner"
	// appendAttempt is how long an append waits for its acknowledgement
	// before it sends the version again (Appender.publish): an R3 stream
	// with sync_interval always acknowledges in milliseconds on loopback
	// and under 100 ms loaded; a publish that has no answer in a second
	// was lost with a leader, and the next attempt finds the new one as
	// soon as it is elected.
	appendAttempt = time.Second
	// apiRetry is the pause between attempts at a JetStream API call that
	// a cluster answers only once its meta leader is elected.
	apiRetry = 100 * time.Millisecond
	// codeClusterNotAvailable is JetStream's error code for "JetStream
	// system temporarily unavailable" (no meta leader yet); nats.go names
	// no constant for it.
	codeClusterNotAvailable = 10008
	// codeNoPeers is JetStream's "no suitable peers for placement", which
	// a just-started cluster answers until its nodes have all reported to
	// the meta leader; nats.go names no constant for it either.
	codeNoPeers = 10005
	// codeDuplicateInProcess is JetStream's "duplicate message id is in
	// process": a message with the same Nats-Msg-Id is being proposed.
	codeDuplicateInProcess = 10158
)

// token turns a database name (server's [A-Za-z0-9][A-Za-z0-9_.-]{0,63})
// into one subject token and KV key: "." separates subject tokens, so it
// is written "=", which names never hold (one to one).
func token(db string) string { return strings.ReplaceAll(db, ".", "=") }

// Subject is the subject of database db's versions in the stream.
func Subject(db string) string { return SubjectPrefix + token(db) }
