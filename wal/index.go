package wal

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Wal-index (-shm) layout. SQLite maps the -shm file into memory and uses its
// structs directly, so every integer is in the host's NATIVE byte order
// (binary.NativeEndian), except aSalt, which holds the salt bytes copied
// verbatim from the (big-endian) WAL header: wal.c compares them with memcmp
// against frame headers. See walformat.html, "The WAL-Index Format".
//
//	offset size  WalIndexHdr (two identical copies, at 0 and at 48)
//	 0      4    iVersion (3007000)
//	 4      4    unused
//	 8      4    iChange: incremented by every transaction
//	12      1    isInit: 1 once initialised
//	13      1    bigEndCksum: WAL frame checksums read big-endian
//	14      2    szPage: page size, 65536 stored as 1
//	16      4    mxFrame: last valid frame in the WAL
//	20      4    nPage: database size in pages
//	24      8    aFrameCksum: running checksum after frame mxFrame
//	32      8    aSalt: WAL header salts, raw big-endian bytes
//	40      8    aCksum: native checksum of bytes 0..39, seeded 0,0
//
//	96      4    nBackfill          WalCkptInfo
//	100    20    aReadMark[5]
//	120     8    aLock: bytes used as lock targets; contents unused
//	128     4    nBackfillAttempted
//	132     4    notUsed0
const (
	// IndexHeaderSize is the size of the two WalIndexHdr copies plus WalCkptInfo.
	IndexHeaderSize = 136
	// ReadMarkNotUsed marks a read-mark slot no reader is using.
	ReadMarkNotUsed = 0xffffffff

	indexHdrSize   = 48
	indexCksumOff  = 40
	ckptInfoOffset = 96
)

// nativeBigEndian is true on big-endian hosts. The wal-index checksum is
// computed over native words (walChecksumBytes with nativeCksum=1), so its
// byte order follows the host.
var nativeBigEndian = binary.NativeEndian.Uint16([]byte{0, 1}) == 1

// IndexHeader is the decoded WalIndexHdr. Salt holds the salt values as the
// WAL header decodes them (Header.Salt1/Salt2), whatever the host order.
type IndexHeader struct {
	Change      uint32
	IsInit      bool
	BigEndCksum bool
	PageSize    uint32 // real page size (65536, not 1); 0 if the WAL was empty when recovered
	MxFrame     uint32
	NPage       uint32
	FrameCksum  [2]uint32
	Salt        [2]uint32
}

// CheckpointInfo is the decoded WalCkptInfo, minus the lock bytes, whose
// contents mean nothing (SQLite locks them with fcntl, never reads them).
type CheckpointInfo struct {
	NBackfill          uint32
	ReadMark           [5]uint32
	NBackfillAttempted uint32
}

// DecodeIndex decodes the first IndexHeaderSize bytes of a -shm file. Like
// SQLite's walIndexTryHdr it requires both header copies to be
// byte-identical (a writer updates them in turn, so a difference means a
// torn write), isInit set and a valid checksum; it additionally requires
// iVersion 3007000 and a consistent page size. Violations yield ErrCorrupt,
// short input ErrTruncated. Bytes after IndexHeaderSize are ignored: the
// rest of the -shm file is the hash tables.
func DecodeIndex(b []byte) (IndexHeader, CheckpointInfo, error) {
	if len(b) < IndexHeaderSize {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: %d of %d bytes: %w", len(b), IndexHeaderSize, ErrTruncated)
	}
	h1, h2 := b[:indexHdrSize], b[indexHdrSize:2*indexHdrSize]
	if !bytes.Equal(h1, h2) {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: header copies differ: %w", ErrCorrupt)
	}
	ne := binary.NativeEndian
	if v := ne.Uint32(h1[0:]); v != FormatVersion {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: unknown version %d: %w", v, ErrCorrupt)
	}
	if h1[12] != 1 {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: not initialised (isInit %d): %w", h1[12], ErrCorrupt)
	}
	if h1[13] > 1 {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: bigEndCksum %d: %w", h1[13], ErrCorrupt)
	}
	s0, s1 := Checksum(nativeBigEndian, h1[:indexCksumOff], 0, 0)
	if s0 != ne.Uint32(h1[40:]) || s1 != ne.Uint32(h1[44:]) {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: checksum mismatch: %w", ErrCorrupt)
	}
	sz := uint32(ne.Uint16(h1[14:]))
	// wal.c decodes szPage as (v&0xfe00) + ((v&1)<<16); anything that does
	// not re-encode to itself was not written by SQLite.
	pageSize := (sz & 0xfe00) + (sz&1)<<16
	if encodeIndexPageSize(pageSize) != uint16(sz) || (pageSize != 0 && !ValidPageSize(pageSize)) {
		return IndexHeader{}, CheckpointInfo{}, fmt.Errorf("wal-index: invalid page size field %#x: %w", sz, ErrCorrupt)
	}
	h := IndexHeader{
		Change:      ne.Uint32(h1[8:]),
		IsInit:      true,
		BigEndCksum: h1[13] == 1,
		PageSize:    pageSize,
		MxFrame:     ne.Uint32(h1[16:]),
		NPage:       ne.Uint32(h1[20:]),
		FrameCksum:  [2]uint32{ne.Uint32(h1[24:]), ne.Uint32(h1[28:])},
		Salt:        [2]uint32{binary.BigEndian.Uint32(h1[32:]), binary.BigEndian.Uint32(h1[36:])},
	}
	c := b[ckptInfoOffset:IndexHeaderSize]
	ci := CheckpointInfo{
		NBackfill:          ne.Uint32(c[0:]),
		NBackfillAttempted: ne.Uint32(c[32:]),
	}
	for i := range ci.ReadMark {
		ci.ReadMark[i] = ne.Uint32(c[4+4*i:])
	}
	return h, ci, nil
}

// encodeIndexPageSize stores a page size in the 16-bit szPage field the way
// wal.c does: (p&0xff00)|(p>>16), which maps 65536 to 1.
func encodeIndexPageSize(p uint32) uint16 {
	return uint16((p & 0xff00) | (p >> 16))
}

// EncodeIndex returns the IndexHeaderSize bytes of a wal-index header: both
// copies (with iVersion 3007000, isInit 1 and the computed aCksum, whatever
// h.IsInit says, because SQLite never writes an uninitialised header) and
// the checkpoint info. The lock bytes and unused fields are zero.
// h.PageSize must be 0 or a valid page size; anything else is written as
// wal.c would write it and DecodeIndex will reject it.
func EncodeIndex(h IndexHeader, ci CheckpointInfo) []byte {
	b := make([]byte, IndexHeaderSize)
	ne := binary.NativeEndian
	h1 := b[:indexHdrSize]
	ne.PutUint32(h1[0:], FormatVersion)
	ne.PutUint32(h1[8:], h.Change)
	h1[12] = 1
	if h.BigEndCksum {
		h1[13] = 1
	}
	ne.PutUint16(h1[14:], encodeIndexPageSize(h.PageSize))
	ne.PutUint32(h1[16:], h.MxFrame)
	ne.PutUint32(h1[20:], h.NPage)
	ne.PutUint32(h1[24:], h.FrameCksum[0])
	ne.PutUint32(h1[28:], h.FrameCksum[1])
	binary.BigEndian.PutUint32(h1[32:], h.Salt[0])
	binary.BigEndian.PutUint32(h1[36:], h.Salt[1])
	s0, s1 := Checksum(nativeBigEndian, h1[:indexCksumOff], 0, 0)
	ne.PutUint32(h1[40:], s0)
	ne.PutUint32(h1[44:], s1)
	copy(b[indexHdrSize:], h1)
	c := b[ckptInfoOffset:]
	ne.PutUint32(c[0:], ci.NBackfill)
	for i, m := range ci.ReadMark {
		ne.PutUint32(c[4+4*i:], m)
	}
	ne.PutUint32(c[32:], ci.NBackfillAttempted)
	return b
}

// EmptyIndex returns the wal-index state of an empty WAL that follows the
// header prev, mirroring what SQLite's walRestartHdr leaves when a writer
// restarts the WAL: MxFrame 0, zero frame checksum, nBackfill 0, read mark
// 0 at slots 0 and 1 and unused elsewhere. Change is prev.Change+1 so that
// readers comparing headers notice the database changed underneath them.
// Read mark 1 at 0 (walIndexRecover would leave it unused) is what spares
// the first writer after a drop two of its lock calls: a write transaction
// must read through a mark other than 0, and finding none equal to MxFrame
// it takes an exclusive lock on a mark to set it, then a shared one; with
// mark 1 at 0 it takes the shared lock only (strace of a rebase with one
// mutation pending). BigEndCksum is false, as after recovery; SQLite sets
// it again when it writes the next WAL header.
func EmptyIndex(prev IndexHeader, pageSize, nPage, salt1, salt2 uint32) (IndexHeader, CheckpointInfo) {
	h := IndexHeader{
		Change:   prev.Change + 1,
		IsInit:   true,
		PageSize: pageSize,
		NPage:    nPage,
		Salt:     [2]uint32{salt1, salt2},
	}
	ci := CheckpointInfo{ReadMark: [5]uint32{0, 0, ReadMarkNotUsed, ReadMarkNotUsed, ReadMarkNotUsed}}
	return h, ci
}

// The wal-index's page array: after the header, SQLite records the page
// number of every WAL frame, native-endian, in regions of 32 KiB; each
// region's array (HASHTABLE_NPAGE entries, HASHTABLE_NPAGE_ONE in the first,
// which the header shortens) is followed by its hash table. See wal.c's
// walFramePage and walHashGet.
const (
	// IndexRegionSize is the size of one wal-index region (WALINDEX_PGSZ).
	IndexRegionSize = 32 << 10
	// indexPagesOne is HASHTABLE_NPAGE_ONE: frames recorded in region 0.
	indexPagesOne = 4096 - IndexHeaderSize/4
	// indexPages is HASHTABLE_NPAGE: frames recorded in each later region.
	indexPages = 4096
)

// IndexPgnoOffset is where in the wal-index the page number of WAL frame
// frame (1-based) is recorded, and the first frame recorded in the same
// region: the frames first..frame lie at consecutive 4-byte words ending
// at the returned offset, so one read fetches them.
func IndexPgnoOffset(frame uint32) (off int64, first uint32) {
	if frame <= indexPagesOne {
		return IndexHeaderSize + 4*int64(frame-1), 1
	}
	k := (frame - indexPagesOne - 1) / indexPages // region k+1
	first = indexPagesOne + k*indexPages + 1
	return int64(k+1)*IndexRegionSize + 4*int64(frame-first), first
}

// FrameOffset is the offset in the WAL file of frame's page data (frame is
// 1-based): after the WAL header, the frames before it and its own frame
// header.
func FrameOffset(pageSize, frame uint32) int64 {
	return HeaderSize + int64(frame-1)*(FrameHeaderSize+int64(pageSize)) + FrameHeaderSize
}
