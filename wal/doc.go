// Package wal owns the byte formats sqlrebase reads and writes: the SQLite
// WAL file header and frame headers (with SQLite's cumulative checksum), the
// wal-index (-shm) header, and the sqlrebase "page set" record, which carries
// one server version of a database.
//
// Everything here is a pure function on []byte: no files, no SQLite
// connections, no network. That keeps the formats testable in isolation and
// lets the VFS, replica and server packages share one implementation.
// Decoders never panic; truncated input yields ErrTruncated, inconsistent or
// checksum-failing input ErrCorrupt, and input beyond the caller's limits
// ErrTooLarge, so callers can branch with errors.Is.
//
// References: https://sqlite.org/walformat.html and
// https://sqlite.org/fileformat2.html#walformat, plus the behaviour of
// SQLite's wal.c where the documents are silent.
package wal

import "errors"

// Sentinel errors. Decoders wrap one of these with context, so callers test
// with errors.Is rather than comparing messages.
var (
	// ErrTruncated means the input ended before the structure did. A caller
	// reading a growing file may retry once more bytes are available.
	ErrTruncated = errors.New("wal: truncated input")
	// ErrCorrupt means the input is complete but wrong: bad magic, unknown
	// version, checksum mismatch or inconsistent fields. Retrying won't help.
	ErrCorrupt = errors.New("wal: corrupt input")
	// ErrTooLarge means the input declares (or is) more than the caller's
	// Limits allow; it is rejected before any large allocation happens.
	ErrTooLarge = errors.New("wal: input exceeds limit")
	// ErrInvalid means a PageSet violates its invariants (see
	// PageSet.Validate). Decoders report it together with ErrCorrupt, so
	// errors.Is matches either.
	ErrInvalid = errors.New("wal: invalid page set")
)
