package wal

import "encoding/binary"

// Checksum is SQLite's WAL checksum: b is read as a sequence of 32-bit words
// x(0), x(1), ... (big-endian if bigEndian, else little-endian) and for each
// pair
//
//	s0 += x(i) + s1
//	s1 += x(i+1) + s0
//
// starting from the given s0, s1. It is cumulative so that frames can chain
// their checksums: the result of one call is the seed of the next.
//
// SQLite only ever checksums multiples of 8 bytes. Rather than panic on a
// misuse, Checksum processes floor(len(b)/8) pairs and ignores the tail.
func Checksum(bigEndian bool, b []byte, s0, s1 uint32) (uint32, uint32) {
	n := len(b) &^ 7
	b = b[:n]
	if bigEndian {
		for len(b) >= 8 {
			s0 += binary.BigEndian.Uint32(b) + s1
			s1 += binary.BigEndian.Uint32(b[4:]) + s0
			b = b[8:]
		}
	} else {
		for len(b) >= 8 {
			s0 += binary.LittleEndian.Uint32(b) + s1
			s1 += binary.LittleEndian.Uint32(b[4:]) + s0
			b = b[8:]
		}
	}
	return s0, s1
}

// ValidPageSize reports whether p is a page size SQLite accepts: a power of
// two from 512 to 65536.
func ValidPageSize(p uint32) bool {
	return p >= 512 && p <= 65536 && p&(p-1) == 0
}
