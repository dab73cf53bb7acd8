package server

import "context"

// VersionLog is where a database's writer puts each version before anything
// acknowledges it or sends it to a replica: in a cluster, the replicated
// stream that is the durable truth (docs/CLUSTER.md), with the local files a
// cache of it. Today's on-disk change log is the single-node log and needs
// no VersionLog.
//
// Append is called on the database's writer, under its authority's lock,
// once per version in version order, with the version's record exactly as
// the change log stores it: the checksum before the version (u64 LE), then
// the encoded version as replicas receive it (a protocol.EncodedVersion's
// binary form). The checksum is what lets a restore check the chain. It must return nil only once the
// version is durable where it counts; any error stops the database (the
// version stays committed in the local file, which in a cluster is thrown
// away and restored from the stream). ctx bounds the call.
type VersionLog interface {
	Append(ctx context.Context, db string, version uint64, rec []byte) error
}
