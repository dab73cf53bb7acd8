package protocol

import (
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"math/bits"
	"slices"

	"github.com/klauspost/compress/zstd"

	"github.com/sqlrebase/sqlrebase/wal"
)

// Codec says how a version's or a snapshot chunk's pages are encoded.
// Values are part of the wire format.
type Codec byte

// Codecs.
const (
	// CodecRaw is the pages concatenated, in page number order.
	CodecRaw Codec = 0
	// CodecZstd is CodecRaw compressed with zstd.
	CodecZstd Codec = 1
	// CodecZstdDict is CodecRaw compressed with zstd whose dictionary is the
	// concatenation, in the same order, of the images the pages had before
	// this version (pages at or below BaseDBSize; new pages have none). A
	// changed page then costs what changed in it, and a row that moved
	// between pages on a split costs a reference. Only a replica exactly one
	// version behind holds that dictionary.
	CodecZstdDict Codec = 2
	// CodecXorZstd is zstd of the pages each XORed with the image it had
	// before this version (pages at or below BaseDBSize; new pages as they
	// are). A change that keeps a page's layout (a field updated in place)
	// leaves almost only zeros, which compress to nothing, and costs a
	// tenth of CodecZstdDict's encoding time; a change that shifts bytes
	// (an insert moves the cell pointers) does not, and takes CodecZstdDict.
	// Like CodecZstdDict it decodes only at a replica one version behind.
	CodecXorZstd Codec = 3
	// CodecPatch (since protocol 4) is, for each page, the runs of bytes
	// that differ from the image it had before this version (a page beyond
	// BaseDBSize: from a page of zeros), as offset, length and the new
	// bytes, with no compressor: a field updated in place costs 4 bytes a
	// page where a zstd frame's header alone costs 9. It is self-delimiting,
	// so its record carries no payload length. Like CodecZstdDict it decodes
	// only at a replica one version behind.
	CodecPatch Codec = 4
)

// NeedsBase reports whether the version decodes only against the images
// its pages had at the version before, in a database of BaseDBSize pages.
func (v *EncodedVersion) NeedsBase() bool {
	return v.Codec == CodecZstdDict || v.Codec == CodecXorZstd || v.Codec == CodecPatch
}

// dictID names the raw dictionary inside zstd frames; both ends use the same.
const dictID = 1

// The head of a version record (protocol 4) is one uvarint that packs what
// was four fields, so that a one-row update's header costs one byte: the
// codec in bits 0-2, log2(page size)-9 in bits 3-5 (page sizes are powers
// of two from 512 to 65536), bit 6 set when a base database size other
// than the database size follows (a delta codec's base is otherwise the
// same size), and the page set's flags from bit 7 up.
const (
	headCodecMask = 7
	headPageShift = 3
	headBase      = 1 << 6
	headFlagShift = 7
	minPageShift  = 9 // log2 of the smallest page size
)

// EncodedVersion is one version as it travels: the page set's header, the
// page numbers, and the pages in one of the codecs. It carries no pre
// checksum (since protocol 4): a version applies only to the version
// before it, whose checksum the replica already proved (the post checksum
// of that version, or the server's at the Hello), so the version number
// pins it; the post checksum still proves the result.
type EncodedVersion struct {
	Version      uint64
	Flags        uint32
	PageSize     uint32
	DBSize       uint32
	PostChecksum uint64
	Codec        Codec
	BaseDBSize   uint32   // the delta codecs (NeedsBase): the database size, in pages, of the version before; else 0
	Pgnos        []uint32 // ascending, unique, in 1..DBSize
	Payload      []byte
}

func (v *EncodedVersion) head() uint64 {
	h := uint64(v.Codec)&headCodecMask | uint64(bits.TrailingZeros32(v.PageSize)-minPageShift)<<headPageShift | uint64(v.Flags)<<headFlagShift
	if v.NeedsBase() && v.BaseDBSize != v.DBSize {
		h |= headBase
	}
	return h
}

func (v *EncodedVersion) append(b []byte) []byte {
	b = binary.AppendUvarint(b, v.Version)
	h := v.head()
	b = binary.AppendUvarint(b, h)
	b = binary.AppendUvarint(b, uint64(v.DBSize))
	if h&headBase != 0 {
		b = binary.AppendUvarint(b, uint64(v.BaseDBSize))
	}
	b = binary.LittleEndian.AppendUint64(b, v.PostChecksum)
	b = binary.AppendUvarint(b, uint64(len(v.Pgnos)))
	var prev uint32
	for _, p := range v.Pgnos {
		b = binary.AppendUvarint(b, uint64(p-prev)) // ascending: small deltas
		prev = p
	}
	if v.Codec == CodecPatch {
		return append(b, v.Payload...) // self-delimiting
	}
	return appendBytes(b, v.Payload)
}

// decodeHead unpacks a record's head into v.
func (v *EncodedVersion) decodeHead(d *decoder, h uint64) {
	if d.err != nil {
		return
	}
	v.Codec = Codec(h & headCodecMask)
	v.PageSize = 1 << (minPageShift + (h>>headPageShift)&7)
	if f := h >> headFlagShift; f > 1<<32-1 {
		d.fail("version flags %#x overflow 32 bits", f)
	} else {
		v.Flags = uint32(f)
	}
	if v.Codec > CodecPatch {
		d.fail("codec %d", v.Codec)
	}
	if h&headBase != 0 && !v.NeedsBase() {
		d.fail("base database size for codec %d", v.Codec)
	}
}

func (v *EncodedVersion) decode(d *decoder, l Limits) {
	v.Version = d.uvarint()
	h := d.uvarint()
	v.decodeHead(d, h)
	v.DBSize = d.uint32()
	switch {
	case h&headBase != 0:
		v.BaseDBSize = d.uint32()
	case v.NeedsBase():
		v.BaseDBSize = v.DBSize
	}
	v.PostChecksum = d.fixed64()
	n := d.count(l.MaxPages, "pages in a version")
	if d.err != nil {
		return
	}
	if uint64(n)*uint64(v.PageSize) > uint64(l.MaxPageBytes) {
		d.tooLarge("version of %d pages", n)
		return
	}
	v.Pgnos = make([]uint32, n)
	var prev uint64
	for i := range v.Pgnos {
		delta := d.uvarint()
		if d.err != nil {
			return
		}
		p := prev + delta
		if delta == 0 || p > uint64(v.DBSize) {
			d.fail("page number %d (after %d, db size %d)", p, prev, v.DBSize)
			return
		}
		v.Pgnos[i], prev = uint32(p), p
	}
	if v.Codec != CodecPatch {
		v.Payload = d.bytes(l.MaxMessage)
		return
	}
	size, err := walkPatch(d.b, n, int(v.PageSize), nil)
	if err != nil {
		d.fail("%v", err)
		return
	}
	v.Payload, d.b = d.b[:size:size], d.b[size:]
}

// walkPatch reads a CodecPatch payload of n pages from the start of b,
// calling run (if not nil) with each run's page index, offset and new
// bytes, in order, and returns the bytes it took. Per page: uv run count,
// then per run uv h, where h>>2 is the run's distance from the end of the
// run before (the first: from the page's start) and h&3 its length less
// one, 3 meaning "4 plus a uv that follows"; then the run's bytes. Runs
// end within the page.
func walkPatch(b []byte, n, pageSize int, run func(i, off int, data []byte)) (int, error) {
	d := &decoder{b: b}
	for i := 0; i < n && d.err == nil; i++ {
		// A run takes at least two bytes, and a page holds at most
		// pageSize of them.
		runs := d.count(min(len(d.b)/2, pageSize), "runs in a patched page")
		pos := uint64(0)
		for r := 0; r < runs && d.err == nil; r++ {
			h := d.uvarint()
			length := h&3 + 1
			if h&3 == 3 {
				length = 4 + d.uvarint()
			}
			pos += h >> 2
			if d.err != nil {
				break
			}
			if h>>2 > uint64(pageSize) || length > uint64(pageSize) || pos+length > uint64(pageSize) || length > uint64(len(d.b)) {
				d.fail("patch run of %d bytes at %d of page %d (%d bytes left)", length, pos, i, len(d.b))
				break
			}
			if run != nil {
				run(i, int(pos), d.b[:length])
			}
			d.b = d.b[length:]
			pos += length
		}
	}
	if d.err != nil {
		return 0, d.err
	}
	return len(b) - len(d.b), nil
}

// patchGood is the size, per page, under which a CodecPatch version is
// kept without trying the zstd codecs: a field changed in place costs a
// few bytes a page, where zstd costs a frame header and tens of
// microseconds (BenchmarkEncodeVersion).
const patchGood = 32

// appendPatch appends page's CodecPatch runs against old (nil: a page of
// zeros). Two runs one equal byte apart are one run: the byte costs what
// a run header would.
func appendPatch(b, page, old []byte) []byte {
	at := len(b)
	b = append(b, 0) // the run count, fixed up below
	runs, prev := 0, 0
	for s := firstDiff(page, old, 0); s < len(page); s = firstDiff(page, old, prev) {
		e := s
		for e < len(page) && (page[e] != byteAt(old, e) || e+1 < len(page) && page[e+1] != byteAt(old, e+1)) {
			e++
		}
		skip, length := uint64(s-prev), uint64(e-s)
		if length <= 3 {
			b = binary.AppendUvarint(b, skip<<2|(length-1))
		} else {
			b = binary.AppendUvarint(b, skip<<2|3)
			b = binary.AppendUvarint(b, length-4)
		}
		b = append(b, page[s:e]...)
		runs, prev = runs+1, e
	}
	if runs < 0x80 {
		b[at] = byte(runs)
		return b
	}
	var cnt [binary.MaxVarintLen64]byte
	c := binary.PutUvarint(cnt[:], uint64(runs))
	b[at] = cnt[0]
	return slices.Insert(b, at+1, cnt[1:c]...)
}

func byteAt(old []byte, i int) byte {
	if old == nil {
		return 0
	}
	return old[i]
}

// firstDiff is the first offset from from on where page differs from old
// (nil: zeros), or len(page). It compares eight bytes at a time: most of
// a page is unchanged.
func firstDiff(page, old []byte, from int) int {
	i := from
	if old == nil {
		for ; i+8 <= len(page) && binary.LittleEndian.Uint64(page[i:]) == 0; i += 8 {
		}
		for ; i < len(page) && page[i] == 0; i++ {
		}
		return i
	}
	for ; i+8 <= len(page) && binary.LittleEndian.Uint64(page[i:]) == binary.LittleEndian.Uint64(old[i:]); i += 8 {
	}
	for ; i < len(page) && page[i] == old[i]; i++ {
	}
	return i
}

// Encoder encodes versions and snapshot chunks. It keeps one zstd
// compressor and reuses its tables from call to call: building them anew
// cost more than compressing a small version (1.5 ms against 0.1 ms for a
// three-page version). It is not safe for concurrent use; a server keeps
// one per database writer.
type Encoder struct {
	z *zstd.Encoder
}

// encoderWindow is the compressor's window: the dictionary (old pages) and
// the new pages must both fit for the new pages to refer to the old.
const encoderWindow = 8 << 20

// NewEncoder returns an Encoder.
func NewEncoder() *Encoder {
	z, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false),
		zstd.WithWindowSize(encoderWindow), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err) // fixed, valid options
	}
	return &Encoder{z: z}
}

// Close releases the compressor.
func (e *Encoder) Close() error { return e.z.Close() }

// compress compresses raw in one zstd frame, with dict (may be nil) as
// the history it may refer to.
func (e *Encoder) compress(raw, dict []byte) ([]byte, error) {
	opt := zstd.WithEncoderDictDelete()
	if len(dict) > 0 {
		opt = zstd.WithEncoderDictRaw(dictID, dict)
	}
	if err := e.z.ResetWithOptions(nil, opt); err != nil {
		return nil, err
	}
	return e.z.EncodeAll(raw, make([]byte, 0, len(raw)/4+64)), nil
}

// xorGood is the size, per page, under which an XOR-coded version is kept
// without trying the dictionary codec (which costs ten times as much).
const xorGood = 48

// EncodeVersion encodes a page set with a one-off Encoder.
func EncodeVersion(ps *wal.PageSet, baseDBSize uint32, before func(pgno uint32) []byte) (EncodedVersion, error) {
	e := NewEncoder()
	defer e.Close()
	return e.Version(ps, baseDBSize, before)
}

// Version encodes a page set. before returns the image a page had in the
// version before ps (nil for a page that did not exist then); with it the
// version travels as CodecPatch when that is small (a change made in place),
// else as the smallest of CodecPatch, CodecXorZstd and CodecZstdDict. With
// before nil it is CodecZstd. Either falls back to CodecRaw when the
// encoding does not pay.
func (e *Encoder) Version(ps *wal.PageSet, baseDBSize uint32, before func(pgno uint32) []byte) (EncodedVersion, error) {
	if err := ps.Validate(); err != nil {
		return EncodedVersion{}, fmt.Errorf("encode version %d: %w", ps.Version, err)
	}
	ev := EncodedVersion{
		Version: ps.Version, Flags: ps.Flags, PageSize: ps.PageSize, DBSize: ps.DBSize,
		PostChecksum: ps.PostChecksum,
		Pgnos:        make([]uint32, len(ps.Pages)),
	}
	rawSize := len(ps.Pages) * int(ps.PageSize)
	raw := func() []byte {
		r := make([]byte, 0, rawSize)
		for _, p := range ps.Pages {
			r = append(r, p.Data...)
		}
		return r
	}
	for i, p := range ps.Pages {
		ev.Pgnos[i] = p.Pgno
	}
	var olds [][]byte // per page, its image before (nil: a new page)
	hasBase := false
	if before != nil && ps.Flags&wal.FlagSnapshot == 0 {
		olds = make([][]byte, len(ps.Pages))
		for i, p := range ps.Pages {
			if p.Pgno <= baseDBSize {
				old := before(p.Pgno)
				if len(old) != int(ps.PageSize) {
					return EncodedVersion{}, fmt.Errorf("encode version %d: base image of page %d has %d bytes", ps.Version, p.Pgno, len(old))
				}
				olds[i], hasBase = old, true
			}
		}
	}
	if hasBase {
		// The patch first: a scan, no compressor, and enough for a
		// change made in place. Only if it takes more than patchGood
		// bytes a page, XOR then zstd; only if that leaves more than
		// xorGood, the dictionary codec too (ten times XOR's cost), and
		// the smaller of those two wins. A patch past its budget is
		// dropped as soon as it is: on a version whose bytes moved,
		// scanning the rest would only add to the zstd codecs' cost.
		budget := patchGood * len(ps.Pages)
		var patch []byte
		for i, p := range ps.Pages {
			if patch = appendPatch(patch, p.Data, olds[i]); len(patch) > budget {
				break
			}
		}
		ev.Codec, ev.BaseDBSize, ev.Payload = CodecPatch, baseDBSize, patch
		if len(patch) > budget {
			r := raw()
			xored := make([]byte, len(r))
			copy(xored, r)
			var dict []byte
			for i, old := range olds {
				if old != nil {
					page := xored[i*int(ps.PageSize) : (i+1)*int(ps.PageSize)]
					subtle.XORBytes(page, page, old)
					dict = append(dict, old...)
				}
			}
			zx, err := e.compress(xored, nil)
			if err != nil {
				return EncodedVersion{}, fmt.Errorf("encode version %d: %w", ps.Version, err)
			}
			ev.Codec, ev.Payload = CodecXorZstd, zx
			if len(zx) > xorGood*len(ps.Pages) {
				zd, err := e.compress(r, dict)
				if err != nil {
					return EncodedVersion{}, fmt.Errorf("encode version %d: %w", ps.Version, err)
				}
				if len(zd) < len(ev.Payload) {
					ev.Codec, ev.Payload = CodecZstdDict, zd
				}
			}
		}
		if len(ev.Payload) >= rawSize {
			ev.Codec, ev.BaseDBSize, ev.Payload = CodecRaw, 0, raw()
		}
		return ev, nil
	}
	r := raw()
	ev.Codec = CodecZstd
	z, err := e.compress(r, nil)
	if err != nil {
		return EncodedVersion{}, fmt.Errorf("encode version %d: %w", ps.Version, err)
	}
	if len(z) >= len(r) {
		ev.Codec, z = CodecRaw, r
	}
	ev.Payload = z
	return ev, nil
}

// DecodeVersion turns an encoded version back into a page set. For the
// delta codecs (NeedsBase), before must return the replica's image of a
// page at the version before (the caller checks that its database has
// BaseDBSize pages then); a wrong base does not decode, or decodes to pages
// whose checksum the apply refuses. The page set's PreChecksum is 0: the
// record does not carry it, and the caller, which applies the set to the
// version before, sets it to that version's checksum. Errors wrap
// ErrMalformed or ErrTooLarge.
func DecodeVersion(ev *EncodedVersion, l Limits, before func(pgno uint32) ([]byte, error)) (*wal.PageSet, error) {
	d := NewDecoder(l)
	defer d.Close()
	return d.Version(ev, before)
}

// Decoder decodes versions and snapshot chunks. It keeps one zstd
// decompressor and reuses it: making one per version cost more than the
// decoding (60 µs against 10 µs for a three-page version). It is not safe
// for concurrent use; a replica keeps one for its sync loop.
type Decoder struct {
	z *zstd.Decoder
	l Limits
}

// NewDecoder returns a Decoder that refuses what exceeds l.
func NewDecoder(l Limits) *Decoder {
	z, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(uint64(max(l.MaxPageBytes, 1))+1),
		zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		panic(err) // fixed, valid options
	}
	return &Decoder{z: z, l: l}
}

// Close releases the decompressor.
func (d *Decoder) Close() { d.z.Close() }

// basePage is page p as the replica holds it before ev, checked to be one
// whole page: the delta codecs (patch, dictionary, XOR) decode against it.
func basePage(ev *EncodedVersion, before func(pgno uint32) ([]byte, error), p uint32) ([]byte, error) {
	old, err := before(p)
	if err != nil {
		return nil, fmt.Errorf("decode version %d: base of page %d: %w", ev.Version, p, err)
	}
	if len(old) != int(ev.PageSize) {
		return nil, fmt.Errorf("decode version %d: base of page %d has %d bytes", ev.Version, p, len(old))
	}
	return old, nil
}

// Version is DecodeVersion with this decoder's limits.
func (d *Decoder) Version(ev *EncodedVersion, before func(pgno uint32) ([]byte, error)) (*wal.PageSet, error) {
	l := d.l
	n := len(ev.Pgnos)
	want := n * int(ev.PageSize)
	if !wal.ValidPageSize(ev.PageSize) || want > l.MaxPageBytes {
		return nil, fmt.Errorf("decode version %d: %w: %d pages of %d bytes", ev.Version, ErrTooLarge, n, ev.PageSize)
	}
	var raw []byte
	switch ev.Codec {
	case CodecPatch:
		if before == nil {
			return nil, fmt.Errorf("decode version %d: %w: delta against a base the caller cannot provide", ev.Version, ErrMalformed)
		}
		raw = make([]byte, want)
		for i, p := range ev.Pgnos {
			if p <= ev.BaseDBSize {
				old, err := basePage(ev, before, p)
				if err != nil {
					return nil, err
				}
				copy(raw[i*int(ev.PageSize):], old)
			}
		}
		size, err := walkPatch(ev.Payload, n, int(ev.PageSize), func(i, off int, data []byte) {
			copy(raw[i*int(ev.PageSize)+off:], data)
		})
		if err == nil && size != len(ev.Payload) {
			err = fmt.Errorf("%w: %d bytes after the patch", ErrMalformed, len(ev.Payload)-size)
		}
		if err != nil {
			return nil, fmt.Errorf("decode version %d: %w", ev.Version, err)
		}
	case CodecRaw:
		raw = ev.Payload
	case CodecZstd:
		var err error
		if raw, err = d.decompress(ev.Payload, want, nil); err != nil {
			return nil, fmt.Errorf("decode version %d: %w", ev.Version, err)
		}
	case CodecZstdDict, CodecXorZstd:
		if before == nil {
			return nil, fmt.Errorf("decode version %d: %w: delta against a base the caller cannot provide", ev.Version, ErrMalformed)
		}
		var bases [][]byte
		var dict []byte
		for _, p := range ev.Pgnos {
			if p <= ev.BaseDBSize {
				old, err := basePage(ev, before, p)
				if err != nil {
					return nil, err
				}
				bases = append(bases, old)
			} else {
				bases = append(bases, nil)
			}
		}
		if ev.Codec == CodecZstdDict {
			for _, b := range bases {
				dict = append(dict, b...)
			}
		}
		var err error
		if raw, err = d.decompress(ev.Payload, want, dict); err != nil {
			return nil, fmt.Errorf("decode version %d: %w", ev.Version, err)
		}
		if ev.Codec == CodecXorZstd && len(raw) == want {
			for i, b := range bases {
				if b != nil {
					page := raw[i*int(ev.PageSize) : (i+1)*int(ev.PageSize)]
					subtle.XORBytes(page, page, b)
				}
			}
		}
	default:
		return nil, fmt.Errorf("decode version %d: %w: codec %d", ev.Version, ErrMalformed, ev.Codec)
	}
	if len(raw) != want {
		return nil, fmt.Errorf("decode version %d: %w: %d bytes of pages, want %d", ev.Version, ErrMalformed, len(raw), want)
	}
	ps := &wal.PageSet{
		Version: ev.Version, Flags: ev.Flags, PageSize: ev.PageSize, DBSize: ev.DBSize,
		PostChecksum: ev.PostChecksum,
		Pages:        make([]wal.Page, n),
	}
	for i, p := range ev.Pgnos {
		ps.Pages[i] = wal.Page{Pgno: p, Data: raw[i*int(ev.PageSize) : (i+1)*int(ev.PageSize) : (i+1)*int(ev.PageSize)]}
	}
	if err := ps.Validate(); err != nil {
		return nil, fmt.Errorf("decode version %d: %w: %v", ev.Version, ErrMalformed, err)
	}
	return ps, nil
}

// EncodeSnapshotChunk encodes a snapshot chunk with a one-off Encoder.
func EncodeSnapshotChunk(version uint64, pageSize, dbSize uint32, checksum uint64, first uint32, raw []byte) (*SnapshotChunk, error) {
	e := NewEncoder()
	defer e.Close()
	return e.SnapshotChunk(version, pageSize, dbSize, checksum, first, raw)
}

// SnapshotChunk encodes count whole pages starting at first, raw holding
// them concatenated.
func (e *Encoder) SnapshotChunk(version uint64, pageSize, dbSize uint32, checksum uint64, first uint32, raw []byte) (*SnapshotChunk, error) {
	if !wal.ValidPageSize(pageSize) || len(raw) == 0 || len(raw)%int(pageSize) != 0 {
		return nil, fmt.Errorf("snapshot chunk: %d bytes is not whole pages of %d", len(raw), pageSize)
	}
	c := &SnapshotChunk{Version: version, PageSize: pageSize, DBSize: dbSize, Checksum: checksum, First: first, Count: uint32(len(raw) / int(pageSize)), Codec: CodecZstd}
	z, err := e.compress(raw, nil)
	if err != nil {
		return nil, fmt.Errorf("snapshot chunk: %w", err)
	}
	if len(z) >= len(raw) {
		c.Codec, z = CodecRaw, raw
	}
	c.Payload = z
	return c, nil
}

// Pages decodes the chunk's pages, concatenated.
func (c *SnapshotChunk) Pages(l Limits) ([]byte, error) {
	d := NewDecoder(l)
	defer d.Close()
	return d.SnapshotPages(c)
}

// SnapshotPages decodes a chunk's pages, concatenated.
func (d *Decoder) SnapshotPages(c *SnapshotChunk) ([]byte, error) {
	l := d.l
	want := int(c.Count) * int(c.PageSize)
	if want > l.MaxPageBytes {
		return nil, fmt.Errorf("snapshot chunk: %w: %d bytes of pages", ErrTooLarge, want)
	}
	raw := c.Payload
	if c.Codec == CodecZstd {
		var err error
		if raw, err = d.decompress(c.Payload, want, nil); err != nil {
			return nil, fmt.Errorf("snapshot chunk at page %d: %w", c.First, err)
		}
	} else if c.Codec != CodecRaw {
		return nil, fmt.Errorf("snapshot chunk: %w: codec %d", ErrMalformed, c.Codec)
	}
	if len(raw) != want {
		return nil, fmt.Errorf("snapshot chunk at page %d: %w: %d bytes, want %d", c.First, ErrMalformed, len(raw), want)
	}
	return raw, nil
}

// decompress inflates exactly want bytes at most: a stream that claims or
// yields more is malformed, so a small message cannot expand into a large
// allocation. dict, if not nil, is the raw dictionary the stream refers to.
func (d *Decoder) decompress(z []byte, want int, dict []byte) ([]byte, error) {
	opt := zstd.WithDecoderDictDelete()
	if dict != nil {
		opt = zstd.WithDecoderDictRaw(dictID, dict)
	}
	if err := d.z.ResetWithOptions(nil, opt); err != nil {
		return nil, err
	}
	out, err := d.z.DecodeAll(z, make([]byte, 0, want))
	if err != nil {
		return nil, fmt.Errorf("%w: zstd: %v", ErrMalformed, err)
	}
	return out, nil
}

// AppendBinary appends the version's wire encoding (its part of a Versions
// message). A server encodes each version once and sends the same bytes to
// every subscriber with AppendVersionsFrame.
func (v *EncodedVersion) AppendBinary(b []byte) []byte { return v.append(b) }

// DecodeEncodedVersion decodes what AppendBinary wrote.
func DecodeEncodedVersion(b []byte, l Limits) (EncodedVersion, error) {
	d := &decoder{b: b}
	var v EncodedVersion
	v.decode(d, l)
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return EncodedVersion{}, fmt.Errorf("decode version: %w", d.err)
	}
	return v, nil
}

// AppendVersionsFrame appends one length-prefixed Versions message made of
// versions already encoded with AppendBinary, consecutive and oldest first.
func AppendVersionsFrame(b []byte, versions ...[]byte) []byte {
	n := 1 + uvarintLen(uint64(len(versions))) // the size is known up front: no move
	for _, v := range versions {
		n += uint64(len(v))
	}
	b = binary.AppendUvarint(b, n)
	b = append(b, byte(TypeVersions))
	b = binary.AppendUvarint(b, uint64(len(versions)))
	for _, v := range versions {
		b = append(b, v...)
	}
	return b
}
