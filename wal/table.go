package wal

import (
	"encoding/binary"
	"hash/crc64"
	"sync"
)

// PageChecksum returns the checksum of one page: CRC64-ISO over the page
// number (4 bytes, big-endian) followed by the page bytes, as LiteFS's LTX
// format hashes a page, then put through a 64-bit mixing function
// (SplitMix64's finaliser). Including the page number makes moving a page
// detectable. The whole-database checksum is the XOR of PageChecksum over
// all pages, so it can be updated one page at a time.
//
// The mixing is what LTX lacks. CRC is linear: the same error at the same
// offset of two pages changes their CRCs by the same amount, and in an XOR
// of CRCs the two changes cancel. A delta-coded version whose payload is
// damaged can spoil two pages exactly so (a compressor copies one damaged
// byte to both), and the whole-database checksum would vouch for it; the
// test that flips every payload byte found one. After the mix, equal
// changes of different CRCs are unrelated.
func PageChecksum(pgno uint32, page []byte) uint64 {
	return mix(pageCRC(pgno, page))
}

func pageCRC(pgno uint32, page []byte) uint64 {
	var pn [4]byte
	binary.BigEndian.PutUint32(pn[:], pgno)
	return crc64.Update(crc64.Update(0, crcTable, pn[:]), crcTable, page)
}

// mix is SplitMix64's finaliser: a bijection on 64 bits whose
// multiplications make it non-linear over GF(2).
func mix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// zeroTable makes the checksum of a zero-filled page cheap. For messages of
// one length, CRC is affine over GF(2): crc(a^b) = crc(a)^crc(b)^crc(0). So
// the CRC of a zero page numbered pgno is base (pgno 0) XOR one delta per set
// bit of pgno, with 33 CRCs computed once per page size instead of one per
// page; PageChecksum then mixes it.
// That keeps growing a database by many pages O(pages), not O(bytes).
type zeroTable struct {
	base  uint64
	delta [32]uint64
}

var zeroTables sync.Map // page size (uint32) -> *zeroTable

func zeroTableFor(pageSize uint32) *zeroTable {
	if z, ok := zeroTables.Load(pageSize); ok {
		return z.(*zeroTable)
	}
	zero := make([]byte, pageSize)
	z := &zeroTable{base: pageCRC(0, zero)}
	for i := range z.delta {
		z.delta[i] = pageCRC(1<<i, zero) ^ z.base
	}
	actual, _ := zeroTables.LoadOrStore(pageSize, z)
	return actual.(*zeroTable)
}

func (z *zeroTable) sum(pgno uint32) uint64 {
	s := z.base
	for i := 0; pgno != 0; i, pgno = i+1, pgno>>1 {
		if pgno&1 != 0 {
			s ^= z.delta[i]
		}
	}
	return mix(s) // the CRC is affine; the mix comes after
}

// ChecksumTable keeps the checksum of every page of one database and their
// XOR, so the whole-database checksum can be maintained incrementally as page
// sets are applied, and a set's PreChecksum/PostChecksum checked without
// rereading the database. A slot that comes into existence by growing the
// database holds the checksum of a zero-filled page, because that is what
// SQLite reads past the old end of file.
//
// A ChecksumTable is not safe for concurrent use; Clone it to share.
type ChecksumTable struct {
	pageSize uint32
	zero     *zeroTable
	pages    []uint64 // index pgno-1
	sum      uint64
}

// NewChecksumTable returns an empty table (0 pages, checksum 0) for a
// database with the given page size.
func NewChecksumTable(pageSize uint32) *ChecksumTable {
	return &ChecksumTable{pageSize: pageSize, zero: zeroTableFor(pageSize)}
}

// Sum returns the whole-database checksum: the XOR of every page's checksum.
func (t *ChecksumTable) Sum() uint64 { return t.sum }

// Pages returns the database size in pages.
func (t *ChecksumTable) Pages() uint32 { return uint32(len(t.pages)) }

// PageSize returns the page size used for zero-filled slots.
func (t *ChecksumTable) PageSize() uint32 { return t.pageSize }

// Page returns the checksum of page pgno, or 0 if pgno is out of range.
func (t *ChecksumTable) Page(pgno uint32) uint64 {
	if pgno == 0 || uint64(pgno) > uint64(len(t.pages)) {
		return 0
	}
	return t.pages[pgno-1]
}

// Set records crc as the checksum of page pgno, growing the table (with
// zero-page checksums) if pgno is past the end. Page 0 does not exist and is
// ignored.
func (t *ChecksumTable) Set(pgno uint32, crc uint64) {
	if pgno == 0 {
		return
	}
	if uint64(pgno) > uint64(len(t.pages)) {
		t.Resize(pgno)
	}
	t.sum ^= t.pages[pgno-1] ^ crc
	t.pages[pgno-1] = crc
}

// Resize sets the database size: shrinking XORs the removed pages out of the
// sum, growing adds zero-filled pages.
func (t *ChecksumTable) Resize(nPages uint32) {
	n := uint32(len(t.pages))
	switch {
	case nPages < n:
		for _, c := range t.pages[nPages:] {
			t.sum ^= c
		}
		t.pages = t.pages[:nPages]
	case nPages > n:
		t.pages = append(t.pages, make([]uint64, nPages-n)...)
		// Counting with i < nPages cannot wrap at the uint32 limit.
		for i := n; i < nPages; i++ {
			c := t.zero.sum(i + 1)
			t.pages[i] = c
			t.sum ^= c
		}
	}
}

// Preview returns what Sum would be after Apply(ps), without changing t, in
// O(len(ps.Pages) + |size change|) page checksums. It lets a replica check a
// set's PostChecksum before committing to it. ps must be valid (Validate) and,
// unless it is a snapshot, have the table's page size.
func (t *ChecksumTable) Preview(ps *PageSet) uint64 {
	return t.PreviewWith(ps, PageChecksums(ps))
}

// PageChecksums returns the checksum of each page of ps, in order: what
// Preview and Apply compute, for a caller that needs both (PreviewWith,
// ApplyWith) and would otherwise hash every page twice.
func PageChecksums(ps *PageSet) []uint64 {
	crcs := make([]uint64, len(ps.Pages))
	for i, p := range ps.Pages {
		crcs[i] = PageChecksum(p.Pgno, p.Data)
	}
	return crcs
}

// PreviewWith is Preview with the pages' checksums already computed
// (PageChecksums(ps)).
func (t *ChecksumTable) PreviewWith(ps *PageSet, crcs []uint64) uint64 {
	if ps.Flags&FlagSnapshot != 0 {
		var s uint64
		for _, c := range crcs {
			s ^= c
		}
		return s
	}
	s := t.sum
	n := uint32(len(t.pages))
	if ps.DBSize < n {
		for _, c := range t.pages[ps.DBSize:] {
			s ^= c
		}
	} else {
		for i := n; i < ps.DBSize; i++ {
			s ^= t.zero.sum(i + 1)
		}
	}
	for i, p := range ps.Pages {
		var old uint64
		if p.Pgno <= n && p.Pgno <= ps.DBSize {
			old = t.pages[p.Pgno-1]
		} else {
			old = t.zero.sum(p.Pgno)
		}
		s ^= old ^ crcs[i]
	}
	return s
}

// Apply updates t with ps: Resize to ps.DBSize, then Set each page. A
// snapshot first resets the table (and adopts ps.PageSize), since it replaces
// the database whatever its previous state. ps must be valid (Validate) and,
// unless it is a snapshot, have the table's page size.
func (t *ChecksumTable) Apply(ps *PageSet) { t.ApplyWith(ps, PageChecksums(ps)) }

// ApplyWith is Apply with the pages' checksums already computed
// (PageChecksums(ps)).
func (t *ChecksumTable) ApplyWith(ps *PageSet, crcs []uint64) {
	if ps.Flags&FlagSnapshot != 0 {
		t.pages = t.pages[:0]
		t.sum = 0
		if t.pageSize != ps.PageSize {
			t.pageSize = ps.PageSize
			t.zero = zeroTableFor(ps.PageSize)
		}
	}
	t.Resize(ps.DBSize)
	for i, p := range ps.Pages {
		t.Set(p.Pgno, crcs[i])
	}
}

// Clone returns an independent copy of t.
func (t *ChecksumTable) Clone() *ChecksumTable {
	c := *t
	c.pages = append([]uint64(nil), t.pages...)
	return &c
}
