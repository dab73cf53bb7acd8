package wal

import "encoding/binary"

// DefaultPageSize is the page size of a database created by sqlrebase.
const DefaultPageSize = 4096

// EmptyDatabase returns the one-page image of an empty SQLite database in WAL
// mode: the state of every database at version 0. The server creates its file
// from this image and a new replica starts from it, so both agree byte for byte
// (and by checksum) before the first version, and a replica is a valid WAL-mode
// database from its first open: no write to its main file is ever needed to set
// the journal mode. The bytes match what SQLite writes for
// "PRAGMA journal_mode=WAL" on a new file, except the informational
// SQLITE_VERSION_NUMBER at offset 96, which is left zero.
func EmptyDatabase(pageSize uint32) []byte {
	page := make([]byte, pageSize)
	copy(page, "SQLite format 3\x00")
	stored := uint16(pageSize)
	if pageSize == 65536 {
		stored = 1
	}
	binary.BigEndian.PutUint16(page[16:], stored)
	page[18], page[19] = 2, 2 // WAL read and write versions
	page[21], page[22], page[23] = 64, 32, 32
	binary.BigEndian.PutUint32(page[24:], 1) // file change counter
	binary.BigEndian.PutUint32(page[28:], 1) // database size in pages
	binary.BigEndian.PutUint32(page[92:], 1) // version-valid-for
	// Page 1's b-tree header: an empty table leaf (sqlite_schema).
	page[100] = 0x0d
	binary.BigEndian.PutUint16(page[105:], uint16(pageSize)) // cell content start; 65536 wraps to 0 as SQLite expects
	return page
}
