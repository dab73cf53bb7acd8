package wal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
)

// FlagSnapshot marks a page set that holds every page 1..DBSize and replaces
// the database whatever its previous state; PreChecksum is then ignored.
// Snapshots let a replica that is too far behind (or corrupt) catch up
// without replaying history.
const FlagSnapshot uint32 = 1

// knownFlags are the flag bits this version understands. Unknown bits are
// rejected rather than ignored because a flag may change how a set must be
// applied, and applying it wrongly would silently corrupt a replica.
const knownFlags = FlagSnapshot

// Page is one database page.
type Page struct {
	Pgno uint32
	Data []byte
}

// PageSet is one server version of a database: the pages that changed since
// the previous version (or all pages, for a snapshot) plus the whole-database
// checksums before and after, so a replica can verify it applies the set to
// the state the server diffed against and ends up where the server did.
type PageSet struct {
	Version      uint64
	Flags        uint32
	PageSize     uint32
	DBSize       uint32 // database size in pages after apply
	PreChecksum  uint64 // whole-db checksum before apply (version-1)
	PostChecksum uint64 // whole-db checksum after apply
	Pages        []Page // sorted by Pgno ascending, unique, each 1..DBSize, each len(Data)==PageSize
}

// Validate checks the invariants of a page set: Version >= 1, no unknown
// flags, page size a power of two in 512..65536, pages sorted by Pgno,
// unique, within 1..DBSize and exactly PageSize bytes, and for a snapshot
// exactly the pages 1..DBSize. Errors wrap ErrInvalid.
func (ps *PageSet) Validate() error {
	if ps.Version < 1 {
		return fmt.Errorf("page set: version 0: %w", ErrInvalid)
	}
	if ps.Flags&^knownFlags != 0 {
		return fmt.Errorf("page set: unknown flags %#x: %w", ps.Flags&^knownFlags, ErrInvalid)
	}
	if !ValidPageSize(ps.PageSize) {
		return fmt.Errorf("page set: invalid page size %d: %w", ps.PageSize, ErrInvalid)
	}
	var prev uint32
	for i, p := range ps.Pages {
		if p.Pgno == 0 || p.Pgno > ps.DBSize {
			return fmt.Errorf("page set: page %d outside 1..%d: %w", p.Pgno, ps.DBSize, ErrInvalid)
		}
		if i > 0 && p.Pgno <= prev {
			return fmt.Errorf("page set: page %d after page %d (must be ascending and unique): %w", p.Pgno, prev, ErrInvalid)
		}
		if len(p.Data) != int(ps.PageSize) {
			return fmt.Errorf("page set: page %d has %d bytes, want %d: %w", p.Pgno, len(p.Data), ps.PageSize, ErrInvalid)
		}
		prev = p.Pgno
	}
	if ps.Flags&FlagSnapshot != 0 && uint64(len(ps.Pages)) != uint64(ps.DBSize) {
		// Sorted, unique and in 1..DBSize, so the count alone proves the
		// snapshot holds exactly pages 1..DBSize.
		return fmt.Errorf("page set: snapshot holds %d pages, want %d: %w", len(ps.Pages), ps.DBSize, ErrInvalid)
	}
	return nil
}

// Page set encoding, format version 2. All integers little-endian.
//
//	offset        size      field
//	0             4         magic "SRPS"
//	4             2         format version (2; 1 is still read)
//	6             4         flags
//	10            8         version
//	18            4         page size
//	22            4         db size in pages
//	26            8         pre checksum
//	34            8         post checksum
//	42            4         nPages
//	46            nPages ×  pgno u32 | page bytes[page size]
//	end-8         8         the record CRC
//
// The record CRC is CRC64-ISO over the 46 header bytes and then, for each
// page, its pgno (u32) and its PageChecksum (u64): every page byte counts
// through its page's checksum. Format 1 took the CRC over every byte
// before it; but the replica has just computed every page's checksum to
// check a version, and hashing the pages a second time for the journal
// was a quarter of a small rebase's CPU (pure-Go CRC-64, about 1.3 GB/s
// here). A torn or damaged page changes its checksum, and so the CRC.
//
// The record CRC protects the record in transit and at rest; the pre/post
// checksums protect the database state the record is applied to. The fixed
// header lets a decoder check sizes against limits before allocating.
const (
	pageSetMagic      = "SRPS"
	pageSetFormat     = 2
	pageSetFormatV1   = 1
	pageSetHeaderSize = 46
	pageSetTrailer    = 8
)

// recordCRC is the format-2 record CRC of a header and its pages' pgnos
// and checksums.
func recordCRC(header []byte, pages []Page, sums []uint64) uint64 {
	crc := crc64.Update(0, crcTable, header)
	var b [12]byte
	for i, p := range pages {
		binary.LittleEndian.PutUint32(b[:], p.Pgno)
		binary.LittleEndian.PutUint64(b[4:], sums[i])
		crc = crc64.Update(crc, crcTable, b[:])
	}
	return crc
}

// Default limits used when a Limits field is zero.
const (
	DefaultMaxPages = 1 << 20
	DefaultMaxBytes = 1 << 30
)

var crcTable = crc64.MakeTable(crc64.ISO)

// Limits bounds what DecodePageSet accepts, so a hostile or corrupt record
// cannot make the decoder (or the caller applying the set) allocate without
// bound. The zero value means the defaults.
type Limits struct {
	// MaxPages bounds both the number of pages in the record and DBSize,
	// since applying a set allocates per page of DBSize. Default 1<<20.
	MaxPages uint32
	// MaxBytes bounds the record length. Default 1<<30.
	MaxBytes int
}

func (l Limits) withDefaults() Limits {
	if l.MaxPages == 0 {
		l.MaxPages = DefaultMaxPages
	}
	if l.MaxBytes == 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	return l
}

// EncodedSize returns the exact size of the encoding of a set with nPages
// pages of pageSize bytes.
func EncodedSize(pageSize uint32, nPages int) int {
	return pageSetHeaderSize + nPages*(4+int(pageSize)) + pageSetTrailer
}

// encodedSize64 is EncodedSize without overflow, for untrusted inputs.
func encodedSize64(pageSize uint32, nPages uint32) uint64 {
	return pageSetHeaderSize + uint64(nPages)*(4+uint64(pageSize)) + pageSetTrailer
}

// AppendBinary validates ps and appends its encoding to dst.
func (ps *PageSet) AppendBinary(dst []byte) ([]byte, error) {
	return ps.AppendBinaryWith(dst, nil)
}

// AppendBinaryWith is AppendBinary given the PageChecksum of each page, in
// order (as PageChecksums returns them), so that the pages are not hashed
// again; nil sums are computed. The caller vouches for them: a wrong one
// makes a record that DecodePageSet refuses.
func (ps *PageSet) AppendBinaryWith(dst []byte, sums []uint64) ([]byte, error) {
	if err := ps.Validate(); err != nil {
		return dst, fmt.Errorf("encode: %w", err)
	}
	if sums == nil {
		sums = PageChecksums(ps)
	} else if len(sums) != len(ps.Pages) {
		return dst, fmt.Errorf("encode: %d page checksums for %d pages: %w", len(sums), len(ps.Pages), ErrInvalid)
	}
	start := len(dst)
	size := EncodedSize(ps.PageSize, len(ps.Pages))
	if cap(dst)-start < size {
		n := make([]byte, start, start+size)
		copy(n, dst)
		dst = n
	}
	le := binary.LittleEndian
	dst = append(dst, pageSetMagic...)
	dst = le.AppendUint16(dst, pageSetFormat)
	dst = le.AppendUint32(dst, ps.Flags)
	dst = le.AppendUint64(dst, ps.Version)
	dst = le.AppendUint32(dst, ps.PageSize)
	dst = le.AppendUint32(dst, ps.DBSize)
	dst = le.AppendUint64(dst, ps.PreChecksum)
	dst = le.AppendUint64(dst, ps.PostChecksum)
	dst = le.AppendUint32(dst, uint32(len(ps.Pages)))
	crc := recordCRC(dst[start:], ps.Pages, sums)
	for _, p := range ps.Pages {
		dst = le.AppendUint32(dst, p.Pgno)
		dst = append(dst, p.Data...)
	}
	dst = le.AppendUint64(dst, crc)
	return dst, nil
}

// MarshalBinary returns the encoding of ps after validating it.
func (ps *PageSet) MarshalBinary() ([]byte, error) {
	return ps.AppendBinary(nil)
}

// PageSetHeaderSize is the size of an encoded page set's fixed header:
// what [PeekPageSet] needs.
const PageSetHeaderSize = pageSetHeaderSize

// PeekPageSet decodes only the fixed header of an encoded page set: every
// field but Pages, which stays nil. Nothing vouches for the header (the
// record's CRC covers the whole record); a caller must check what it learns
// against something else, as vfs checks a journal record's post checksum
// against the main file. Bad magic, an unknown format version or an invalid
// page size yield ErrCorrupt, short input ErrTruncated.
func PeekPageSet(b []byte) (PageSet, error) {
	if len(b) < pageSetHeaderSize {
		return PageSet{}, fmt.Errorf("page set: header: %d of %d bytes: %w", len(b), pageSetHeaderSize, ErrTruncated)
	}
	le := binary.LittleEndian
	if f := le.Uint16(b[4:]); !bytes.Equal(b[:4], []byte(pageSetMagic)) || (f != pageSetFormat && f != pageSetFormatV1) {
		return PageSet{}, fmt.Errorf("page set: bad magic or format %q: %w", b[:6], ErrCorrupt)
	}
	ps := PageSet{
		Flags:        le.Uint32(b[6:]),
		Version:      le.Uint64(b[10:]),
		PageSize:     le.Uint32(b[18:]),
		DBSize:       le.Uint32(b[22:]),
		PreChecksum:  le.Uint64(b[26:]),
		PostChecksum: le.Uint64(b[34:]),
	}
	if !ValidPageSize(ps.PageSize) {
		return PageSet{}, fmt.Errorf("page set: invalid page size %d: %w", ps.PageSize, ErrCorrupt)
	}
	return ps, nil
}

// CheckPageSetRecord reports whether the size bytes r yields are one whole
// encoded page set, by its record CRC, reading a page at a time: what a
// caller needs to trust a record too large to hold in memory (a journaled
// snapshot). nil: whole; ErrTruncated: r ends before size bytes;
// ErrCorrupt: a bad header or CRC; else the read error. It checks the
// header's sizes against size but nothing else of what the set says.
func CheckPageSetRecord(r io.Reader, size int64) error {
	var hdr [pageSetHeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return readErr(err)
	}
	h, err := PeekPageSet(hdr[:])
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	nPages := le.Uint32(hdr[42:])
	if encodedSize64(h.PageSize, nPages) != uint64(size) {
		return fmt.Errorf("page set: %d pages of %d bytes in a record of %d: %w", nPages, h.PageSize, size, ErrCorrupt)
	}
	v1 := le.Uint16(hdr[4:]) == pageSetFormatV1
	crc := crc64.Update(0, crcTable, hdr[:])
	page := make([]byte, 4+h.PageSize)
	var b [12]byte
	for range nPages {
		if _, err := io.ReadFull(r, page); err != nil {
			return readErr(err)
		}
		if v1 {
			crc = crc64.Update(crc, crcTable, page)
			continue
		}
		pgno := le.Uint32(page)
		le.PutUint32(b[:], pgno)
		le.PutUint64(b[4:], PageChecksum(pgno, page[4:]))
		crc = crc64.Update(crc, crcTable, b[:])
	}
	var t [pageSetTrailer]byte
	if _, err := io.ReadFull(r, t[:]); err != nil {
		return readErr(err)
	}
	if want := le.Uint64(t[:]); crc != want {
		return fmt.Errorf("page set: record checksum %#016x, want %#016x: %w", crc, want, ErrCorrupt)
	}
	return nil
}

// readErr says a record that ends early is truncated.
func readErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("page set: %w", ErrTruncated)
	}
	return fmt.Errorf("page set: read: %w", err)
}

// DecodePageSet decodes and validates an encoded page set occupying all of
// b. Page data slices alias b, so b must not be modified while the set is in
// use. Input longer than lim.MaxBytes or declaring more than lim.MaxPages
// pages (or DBSize) yields ErrTooLarge before anything is allocated; input
// ending early ErrTruncated; bad magic, an unknown format version, trailing
// bytes, a record checksum mismatch or a set failing Validate ErrCorrupt.
func DecodePageSet(b []byte, lim Limits) (*PageSet, error) {
	lim = lim.withDefaults()
	if len(b) > lim.MaxBytes {
		return nil, fmt.Errorf("page set: %d bytes, limit %d: %w", len(b), lim.MaxBytes, ErrTooLarge)
	}
	if n := min(len(b), len(pageSetMagic)); !bytes.Equal(b[:n], []byte(pageSetMagic)[:n]) {
		return nil, fmt.Errorf("page set: bad magic %q: %w", b[:n], ErrCorrupt)
	}
	le := binary.LittleEndian
	if len(b) >= 6 {
		if v := le.Uint16(b[4:]); v != pageSetFormat && v != pageSetFormatV1 {
			return nil, fmt.Errorf("page set: unknown format version %d: %w", v, ErrCorrupt)
		}
	}
	if len(b) < pageSetHeaderSize {
		return nil, fmt.Errorf("page set: header: %d of %d bytes: %w", len(b), pageSetHeaderSize, ErrTruncated)
	}
	ps := &PageSet{
		Flags:        le.Uint32(b[6:]),
		Version:      le.Uint64(b[10:]),
		PageSize:     le.Uint32(b[18:]),
		DBSize:       le.Uint32(b[22:]),
		PreChecksum:  le.Uint64(b[26:]),
		PostChecksum: le.Uint64(b[34:]),
	}
	nPages := le.Uint32(b[42:])
	if !ValidPageSize(ps.PageSize) {
		// Checked before the size computation, which depends on it.
		return nil, fmt.Errorf("page set: invalid page size %d: %w", ps.PageSize, ErrCorrupt)
	}
	if nPages > lim.MaxPages {
		return nil, fmt.Errorf("page set: %d pages, limit %d: %w", nPages, lim.MaxPages, ErrTooLarge)
	}
	if ps.DBSize > lim.MaxPages {
		return nil, fmt.Errorf("page set: db size %d pages, limit %d: %w", ps.DBSize, lim.MaxPages, ErrTooLarge)
	}
	size := encodedSize64(ps.PageSize, nPages)
	if size > uint64(lim.MaxBytes) {
		return nil, fmt.Errorf("page set: declares %d bytes, limit %d: %w", size, lim.MaxBytes, ErrTooLarge)
	}
	if uint64(len(b)) < size {
		return nil, fmt.Errorf("page set: %d of %d bytes: %w", len(b), size, ErrTruncated)
	}
	if uint64(len(b)) > size {
		return nil, fmt.Errorf("page set: %d trailing bytes: %w", uint64(len(b))-size, ErrCorrupt)
	}
	ps.Pages = make([]Page, nPages)
	off := pageSetHeaderSize
	pgSize := int(ps.PageSize)
	for i := range ps.Pages {
		ps.Pages[i] = Page{Pgno: le.Uint32(b[off:]), Data: b[off+4 : off+4+pgSize : off+4+pgSize]}
		off += 4 + pgSize
	}
	want := le.Uint64(b[size-pageSetTrailer:])
	var got uint64
	if le.Uint16(b[4:]) == pageSetFormatV1 {
		got = crc64.Checksum(b[:size-pageSetTrailer], crcTable)
	} else {
		sums := make([]uint64, nPages)
		for i, p := range ps.Pages {
			sums[i] = PageChecksum(p.Pgno, p.Data)
		}
		got = recordCRC(b[:pageSetHeaderSize], ps.Pages, sums)
	}
	if got != want {
		return nil, fmt.Errorf("page set: record checksum %#016x, want %#016x: %w", got, want, ErrCorrupt)
	}
	if err := ps.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return ps, nil
}
