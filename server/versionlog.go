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

// LocalCache is a VersionLog whose log is the durable truth and the local
// files only a cache of it (a cluster: docs/CLUSTER.md). Each time a
// database opens, before its first version and before it serves anything,
// the server asks Fresh whether the local file, at its version and
// checksum (0 for a new file), is exactly the log's tail. If it is not (a
// local commit whose append failed, or a file left behind by a fail-over),
// the server closes the file, sets it aside (db.sqlite.stale, with its
// WAL) and calls Restore to rebuild path from the log, then opens that and
// asks Fresh again: a file Fresh still refuses is an error, never served.
//
// Fresh may take what the database's writer needs (the cluster takes the
// lease there, so that the tail it compares with cannot move under it); an
// error from it or from Restore fails the open. Restore leaves no file at
// path if the log holds no version yet: the server then makes version 1
// as for a new database. If the open fails after Fresh was asked (a failed
// restore, a file still refused, a local error), the server calls Drop, so
// that what Fresh took (the lease) is let go rather than held by a node
// that does not serve the database.
type LocalCache interface {
	VersionLog
	Fresh(ctx context.Context, db string, version, checksum uint64) (bool, error)
	Restore(ctx context.Context, db, path string) error
	Drop(db string, why error)
}
