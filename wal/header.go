package wal

import (
	"encoding/binary"
	"fmt"
)

// Sizes and constants of the WAL file format.
const (
	// HeaderSize is the size of the WAL file header.
	HeaderSize = 32
	// FrameHeaderSize is the size of the header preceding each page in the WAL.
	FrameHeaderSize = 24
	// MagicLE is the WAL magic when frame checksums read words little-endian.
	MagicLE = 0x377f0682
	// MagicBE is the WAL magic when frame checksums read words big-endian.
	MagicBE = 0x377f0683
	// FormatVersion is the only WAL format version SQLite has defined.
	FormatVersion = 3007000
)

// Header is the 32-byte WAL file header. All fields are big-endian on disk,
// whatever the checksum byte order.
//
// Unlike the database file header, the WAL header stores a 65536-byte page
// size as 65536 (wal.c writes szPage with sqlite3Put4byte and rejects values
// outside 512..65536 on recovery), so PageSize holds the real size.
type Header struct {
	Magic         uint32 // MagicLE or MagicBE
	Version       uint32 // FormatVersion
	PageSize      uint32 // database page size in bytes
	CheckpointSeq uint32 // incremented by each checkpoint that restarts the WAL
	Salt1         uint32 // incremented on each restart; frames must repeat it
	Salt2         uint32 // random on each restart; frames must repeat it
	Checksum1     uint32 // checksum of the first 24 bytes
	Checksum2     uint32
}

// BigEndianChecksum reports whether checksums in this WAL read words
// big-endian, which the low bit of the magic selects.
func (h Header) BigEndianChecksum() bool { return h.Magic&1 == 1 }

// DecodeHeader decodes and validates a WAL header from the first HeaderSize
// bytes of b. It checks what SQLite's recovery checks — magic, format
// version, page size and the header checksum — because SQLite ignores a WAL
// whose header fails any of them, and so must we.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("wal header: %d of %d bytes: %w", len(b), HeaderSize, ErrTruncated)
	}
	be := binary.BigEndian
	h := Header{
		Magic:         be.Uint32(b[0:]),
		Version:       be.Uint32(b[4:]),
		PageSize:      be.Uint32(b[8:]),
		CheckpointSeq: be.Uint32(b[12:]),
		Salt1:         be.Uint32(b[16:]),
		Salt2:         be.Uint32(b[20:]),
		Checksum1:     be.Uint32(b[24:]),
		Checksum2:     be.Uint32(b[28:]),
	}
	if h.Magic != MagicLE && h.Magic != MagicBE {
		return Header{}, fmt.Errorf("wal header: bad magic %#x: %w", h.Magic, ErrCorrupt)
	}
	if h.Version != FormatVersion {
		return Header{}, fmt.Errorf("wal header: unknown format version %d: %w", h.Version, ErrCorrupt)
	}
	if !ValidPageSize(h.PageSize) {
		return Header{}, fmt.Errorf("wal header: invalid page size %d: %w", h.PageSize, ErrCorrupt)
	}
	s0, s1 := Checksum(h.BigEndianChecksum(), b[:24], 0, 0)
	if s0 != h.Checksum1 || s1 != h.Checksum2 {
		return Header{}, fmt.Errorf("wal header: checksum mismatch: %w", ErrCorrupt)
	}
	return h, nil
}

// Encode returns the on-disk header. It computes Checksum1/2 from the other
// fields (ignoring h.Checksum*) so callers cannot write an inconsistent
// header; it does not validate the other fields, so tests can build bad ones.
func (h Header) Encode() [HeaderSize]byte {
	var b [HeaderSize]byte
	be := binary.BigEndian
	be.PutUint32(b[0:], h.Magic)
	be.PutUint32(b[4:], h.Version)
	be.PutUint32(b[8:], h.PageSize)
	be.PutUint32(b[12:], h.CheckpointSeq)
	be.PutUint32(b[16:], h.Salt1)
	be.PutUint32(b[20:], h.Salt2)
	s0, s1 := Checksum(h.BigEndianChecksum(), b[:24], 0, 0)
	be.PutUint32(b[24:], s0)
	be.PutUint32(b[28:], s1)
	return b
}

// FrameHeader is the 24-byte header before each page in the WAL. All fields
// are big-endian on disk.
type FrameHeader struct {
	Pgno      uint32 // page number, never 0
	Commit    uint32 // database size in pages after a commit frame, 0 otherwise
	Salt1     uint32 // copy of the WAL header's salts
	Salt2     uint32
	Checksum1 uint32 // cumulative checksum through this frame's page
	Checksum2 uint32
}

// Chain validates frames one after another: each frame's salts must match
// the WAL header's, and its checksum must continue the running checksum of
// all previous frames. It is a value type so that a caller can keep the
// state after the last commit frame and roll back to it cheaply.
type Chain struct {
	PageSize     int
	BigEndian    bool
	Salt1, Salt2 uint32
	S0, S1       uint32 // running checksum after the last accepted frame (initially the header's checksum)
}

// NewChain returns the chain state for the first frame after header h.
func NewChain(h Header) Chain {
	return Chain{
		PageSize:  int(h.PageSize),
		BigEndian: h.BigEndianChecksum(),
		Salt1:     h.Salt1,
		Salt2:     h.Salt2,
		S0:        h.Checksum1,
		S1:        h.Checksum2,
	}
}

// FrameSize returns the size of one whole frame: header plus page.
func (c Chain) FrameSize() int { return FrameHeaderSize + c.PageSize }

// Next validates one whole frame, exactly FrameHeaderSize+PageSize bytes, as
// SQLite's walDecodeFrame does: non-zero page number, salts equal to the
// header's, and a checksum equal to Checksum over the first 8 bytes of the
// frame header and then the page data, continuing from c.S0, c.S1. It returns
// the decoded header, the page data (a sub-slice of frame, not copied) and
// the advanced chain; c itself is unchanged, so an invalid frame leaves the
// caller at the last valid one. Short input yields ErrTruncated, anything
// else invalid ErrCorrupt.
func (c Chain) Next(frame []byte) (FrameHeader, []byte, Chain, error) {
	if c.PageSize < 512 || c.PageSize > 65536 || !ValidPageSize(uint32(c.PageSize)) {
		return FrameHeader{}, nil, c, fmt.Errorf("wal frame: chain has invalid page size %d: %w", c.PageSize, ErrCorrupt)
	}
	size := c.FrameSize()
	if len(frame) < size {
		return FrameHeader{}, nil, c, fmt.Errorf("wal frame: %d of %d bytes: %w", len(frame), size, ErrTruncated)
	}
	if len(frame) > size {
		// A longer slice is almost certainly a caller slicing error; reading
		// only a prefix would hide it.
		return FrameHeader{}, nil, c, fmt.Errorf("wal frame: %d bytes, want exactly %d: %w", len(frame), size, ErrCorrupt)
	}
	be := binary.BigEndian
	fh := FrameHeader{
		Pgno:      be.Uint32(frame[0:]),
		Commit:    be.Uint32(frame[4:]),
		Salt1:     be.Uint32(frame[8:]),
		Salt2:     be.Uint32(frame[12:]),
		Checksum1: be.Uint32(frame[16:]),
		Checksum2: be.Uint32(frame[20:]),
	}
	if fh.Salt1 != c.Salt1 || fh.Salt2 != c.Salt2 {
		// Salt mismatch is how SQLite marks frames left over from before a
		// WAL restart; they are not part of the current log.
		return FrameHeader{}, nil, c, fmt.Errorf("wal frame: salt mismatch: %w", ErrCorrupt)
	}
	if fh.Pgno == 0 {
		return FrameHeader{}, nil, c, fmt.Errorf("wal frame: page number 0: %w", ErrCorrupt)
	}
	page := frame[FrameHeaderSize:size:size]
	s0, s1 := Checksum(c.BigEndian, frame[:8], c.S0, c.S1)
	s0, s1 = Checksum(c.BigEndian, page, s0, s1)
	if s0 != fh.Checksum1 || s1 != fh.Checksum2 {
		return FrameHeader{}, nil, c, fmt.Errorf("wal frame: page %d: checksum mismatch: %w", fh.Pgno, ErrCorrupt)
	}
	next := c
	next.S0, next.S1 = s0, s1
	return fh, page, next, nil
}

// EncodeFrame builds a valid frame continuing chain c and returns it with the
// advanced chain. page is copied; if it is shorter than c.PageSize the rest
// is zero-filled, if longer it is cut, so the frame always has the chain's
// size. pgno must be non-zero for the frame to be valid; EncodeFrame does not
// check, so tests can build invalid frames.
func (c Chain) EncodeFrame(pgno, commit uint32, page []byte) ([]byte, Chain) {
	ps := max(c.PageSize, 0)
	frame := make([]byte, FrameHeaderSize+ps)
	be := binary.BigEndian
	be.PutUint32(frame[0:], pgno)
	be.PutUint32(frame[4:], commit)
	be.PutUint32(frame[8:], c.Salt1)
	be.PutUint32(frame[12:], c.Salt2)
	copy(frame[FrameHeaderSize:], page)
	s0, s1 := Checksum(c.BigEndian, frame[:8], c.S0, c.S1)
	s0, s1 = Checksum(c.BigEndian, frame[FrameHeaderSize:], s0, s1)
	be.PutUint32(frame[16:], s0)
	be.PutUint32(frame[20:], s1)
	c.S0, c.S1 = s0, s1
	return frame, c
}
