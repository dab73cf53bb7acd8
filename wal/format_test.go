package wal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc64"
	"reflect"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

func TestChecksumKnownAnswer(t *testing.T) {
	le := []byte{1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0}
	be := []byte{0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4}
	// s0 = 0+1+0 = 1, s1 = 0+2+1 = 3; s0 = 1+3+3 = 7, s1 = 3+4+7 = 14.
	for _, tc := range []struct {
		big bool
		b   []byte
	}{{false, le}, {true, be}} {
		if s0, s1 := Checksum(tc.big, tc.b, 0, 0); s0 != 7 || s1 != 14 {
			t.Errorf("bigEndian=%v: got %d,%d want 7,14", tc.big, s0, s1)
		}
	}
	// Arithmetic wraps modulo 2^32: s0 = 0xffffffff+1+0 = 0, s1 = 0+2+0 = 2.
	if s0, s1 := Checksum(true, []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2}, 1, 0); s0 != 0 || s1 != 2 {
		t.Errorf("wrap: got %d,%d want 0,2", s0, s1)
	}
	// A ragged tail is ignored rather than read or panicked on.
	if s0, s1 := Checksum(false, append(le, 9, 9, 9), 0, 0); s0 != 7 || s1 != 14 {
		t.Errorf("tail: got %d,%d want 7,14", s0, s1)
	}
	// Seeds chain: checksumming in two calls equals one call.
	a0, a1 := Checksum(false, le[:8], 5, 6)
	a0, a1 = Checksum(false, le[8:], a0, a1)
	if b0, b1 := Checksum(false, le, 5, 6); a0 != b0 || a1 != b1 {
		t.Errorf("chaining: %d,%d vs %d,%d", a0, a1, b0, b1)
	}
}

func genPageSize(t *rapid.T, label string) uint32 {
	return uint32(512) << rapid.IntRange(0, 7).Draw(t, label)
}

func genHeader(t *rapid.T) Header {
	return Header{
		Magic:         rapid.SampledFrom([]uint32{MagicLE, MagicBE}).Draw(t, "magic"),
		Version:       FormatVersion,
		PageSize:      genPageSize(t, "pageSize"),
		CheckpointSeq: rapid.Uint32().Draw(t, "seq"),
		Salt1:         rapid.Uint32().Draw(t, "salt1"),
		Salt2:         rapid.Uint32().Draw(t, "salt2"),
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		h := genHeader(t)
		b := h.Encode()
		got, err := DecodeHeader(b[:])
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		h.Checksum1, h.Checksum2 = got.Checksum1, got.Checksum2
		if got != h {
			t.Fatalf("got %+v want %+v", got, h)
		}
		if again := got.Encode(); again != b {
			t.Fatalf("re-encode differs")
		}
	})
}

func TestFrameRoundTrip(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		h := genHeader(t)
		h.PageSize = uint32(512) << rapid.IntRange(0, 2).Draw(t, "smallPageSize")
		enc := NewChain(h)
		dec := NewChain(h)
		n := rapid.IntRange(1, 8).Draw(t, "frames")
		for i := range n {
			pgno := rapid.Uint32Range(1, 1000).Draw(t, "pgno")
			commit := rapid.SampledFrom([]uint32{0, 0, pgno + 3}).Draw(t, "commit")
			page := bytes.Repeat([]byte{byte(i), byte(pgno)}, int(h.PageSize)/2)
			frame, next := enc.EncodeFrame(pgno, commit, page)
			enc = next
			fh, data, dnext, err := dec.Next(frame)
			if err != nil {
				t.Fatalf("frame %d: %v", i, err)
			}
			if fh.Pgno != pgno || fh.Commit != commit || fh.Salt1 != h.Salt1 || fh.Salt2 != h.Salt2 {
				t.Fatalf("frame %d: header %+v", i, fh)
			}
			if !bytes.Equal(data, page) {
				t.Fatalf("frame %d: data differs", i)
			}
			if fh.Checksum1 != dnext.S0 || fh.Checksum2 != dnext.S1 || dnext != enc {
				t.Fatalf("frame %d: chains diverge: %+v vs %+v", i, dnext, enc)
			}
			dec = dnext
		}
	})
}

func TestFrameOutOfOrderRejected(t *testing.T) {
	// Checksums are cumulative: a valid frame replayed at the wrong position
	// must fail, which is how SQLite finds the end of the valid log.
	c := NewChain(Header{Magic: MagicLE, Version: FormatVersion, PageSize: 512, Salt1: 1, Salt2: 2})
	f1, c1 := c.EncodeFrame(1, 0, nil)
	f2, _ := c1.EncodeFrame(2, 2, nil)
	if _, _, _, err := c.Next(f2); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("frame 2 first: %v", err)
	}
	if _, _, _, err := c1.Next(f1); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("frame 1 twice: %v", err)
	}
	other := c
	other.Salt2++
	f, _ := other.EncodeFrame(1, 0, nil)
	if _, _, _, err := c.Next(f); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "salt") {
		t.Fatalf("foreign salt: %v", err)
	}
	f0, _ := c.EncodeFrame(0, 0, nil)
	if _, _, _, err := c.Next(f0); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("pgno 0: %v", err)
	}
	if _, _, _, err := c.Next(append(f1, 0)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("long frame: %v", err)
	}
	if _, _, _, err := (Chain{}).Next(f1); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("zero chain: %v", err)
	}
}

func genIndex(t *rapid.T) (IndexHeader, CheckpointInfo) {
	ps := rapid.SampledFrom([]uint32{0, 512, 1024, 4096, 32768, 65536}).Draw(t, "pageSize")
	h := IndexHeader{
		Change:      rapid.Uint32().Draw(t, "change"),
		IsInit:      true,
		BigEndCksum: rapid.Bool().Draw(t, "bigEnd"),
		PageSize:    ps,
		MxFrame:     rapid.Uint32().Draw(t, "mxFrame"),
		NPage:       rapid.Uint32().Draw(t, "nPage"),
		FrameCksum:  [2]uint32{rapid.Uint32().Draw(t, "fc0"), rapid.Uint32().Draw(t, "fc1")},
		Salt:        [2]uint32{rapid.Uint32().Draw(t, "s0"), rapid.Uint32().Draw(t, "s1")},
	}
	var ci CheckpointInfo
	ci.NBackfill = rapid.Uint32().Draw(t, "nBackfill")
	for i := range ci.ReadMark {
		ci.ReadMark[i] = rapid.Uint32().Draw(t, "readMark")
	}
	ci.NBackfillAttempted = rapid.Uint32().Draw(t, "attempted")
	return h, ci
}

func TestIndexRoundTrip(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		h, ci := genIndex(t)
		b := EncodeIndex(h, ci)
		if len(b) != IndexHeaderSize {
			t.Fatalf("len %d", len(b))
		}
		gh, gci, err := DecodeIndex(append(b, make([]byte, 100)...)) // rest of -shm ignored
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		if gh != h || gci != ci {
			t.Fatalf("got %+v %+v want %+v %+v", gh, gci, h, ci)
		}
	})
}

func TestEmptyIndex(t *testing.T) {
	prev := IndexHeader{Change: 41, IsInit: true, BigEndCksum: true, PageSize: 4096, MxFrame: 9, NPage: 7,
		FrameCksum: [2]uint32{1, 2}, Salt: [2]uint32{3, 4}}
	h, ci := EmptyIndex(prev, 4096, 12, 5, 6)
	want := IndexHeader{Change: 42, IsInit: true, PageSize: 4096, NPage: 12, Salt: [2]uint32{5, 6}}
	if h != want {
		t.Fatalf("got %+v want %+v", h, want)
	}
	wantCI := CheckpointInfo{ReadMark: [5]uint32{0, 0, ReadMarkNotUsed, ReadMarkNotUsed, ReadMarkNotUsed}}
	if ci != wantCI {
		t.Fatalf("got %+v want %+v", ci, wantCI)
	}
	gh, gci, err := DecodeIndex(EncodeIndex(h, ci))
	if err != nil || gh != h || gci != ci {
		t.Fatalf("round trip: %v %+v %+v", err, gh, gci)
	}
}

func samplePageSet(nPages int, pageSize uint32) *PageSet {
	ps := &PageSet{Version: 7, PageSize: pageSize, DBSize: uint32(nPages) + 3, PreChecksum: 0x1122334455667788, PostChecksum: 0x99aabbccddeeff00}
	for i := range nPages {
		d := bytes.Repeat([]byte{byte(i + 1)}, int(pageSize))
		d[0] = 0xA5
		ps.Pages = append(ps.Pages, Page{Pgno: uint32(i)*1 + 2, Data: d})
	}
	return ps
}

func genPageSetRT(t *rapid.T) *PageSet {
	pageSize := uint32(512) << rapid.IntRange(0, 2).Draw(t, "pageShift")
	snapshot := rapid.Bool().Draw(t, "snapshot")
	dbSize := rapid.Uint32Range(0, 12).Draw(t, "dbSize")
	ps := &PageSet{
		Version:      rapid.Uint64Range(1, 1<<62).Draw(t, "version"),
		PageSize:     pageSize,
		DBSize:       dbSize,
		PreChecksum:  rapid.Uint64().Draw(t, "pre"),
		PostChecksum: rapid.Uint64().Draw(t, "post"),
	}
	if snapshot {
		ps.Flags = FlagSnapshot
	}
	for pgno := uint32(1); pgno <= dbSize; pgno++ {
		if snapshot || rapid.Bool().Draw(t, "include") {
			d := make([]byte, pageSize)
			d[rapid.IntRange(0, int(pageSize)-1).Draw(t, "pos")] = rapid.Byte().Draw(t, "val")
			ps.Pages = append(ps.Pages, Page{Pgno: pgno, Data: d})
		}
	}
	return ps
}

func pageSetsEqual(a, b *PageSet) bool {
	if a.Version != b.Version || a.Flags != b.Flags || a.PageSize != b.PageSize || a.DBSize != b.DBSize ||
		a.PreChecksum != b.PreChecksum || a.PostChecksum != b.PostChecksum || len(a.Pages) != len(b.Pages) {
		return false
	}
	for i := range a.Pages {
		if a.Pages[i].Pgno != b.Pages[i].Pgno || !bytes.Equal(a.Pages[i].Data, b.Pages[i].Data) {
			return false
		}
	}
	return true
}

func TestPageSetRoundTrip(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		ps := genPageSetRT(t)
		b, err := ps.MarshalBinary()
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		if len(b) != EncodedSize(ps.PageSize, len(ps.Pages)) {
			t.Fatalf("len %d, EncodedSize %d", len(b), EncodedSize(ps.PageSize, len(ps.Pages)))
		}
		got, err := DecodePageSet(b, Limits{})
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		if !pageSetsEqual(got, ps) {
			t.Fatalf("got %+v want %+v", got, ps)
		}
		// AppendBinary appends after existing bytes.
		prefix := []byte("xyz")
		b2, err := ps.AppendBinary(prefix)
		if err != nil || !bytes.Equal(b2[:3], prefix) || !bytes.Equal(b2[3:], b) {
			t.Fatalf("AppendBinary: %v", err)
		}
	})
}

func TestPageSetValidate(t *testing.T) {
	good := func() *PageSet { return samplePageSet(2, 512) }
	if err := good().Validate(); err != nil {
		t.Fatal(err)
	}
	cases := map[string]func(*PageSet){
		"version0":      func(ps *PageSet) { ps.Version = 0 },
		"pageSize":      func(ps *PageSet) { ps.PageSize = 1000 },
		"pageSizeSmall": func(ps *PageSet) { ps.PageSize = 256 },
		"pageSizeBig":   func(ps *PageSet) { ps.PageSize = 131072 },
		"flags":         func(ps *PageSet) { ps.Flags = 2 },
		"pgno0":         func(ps *PageSet) { ps.Pages[0].Pgno = 0 },
		"beyondDBSize":  func(ps *PageSet) { ps.DBSize = 2 },
		"unsorted":      func(ps *PageSet) { ps.Pages[0], ps.Pages[1] = ps.Pages[1], ps.Pages[0] },
		"duplicate":     func(ps *PageSet) { ps.Pages[1].Pgno = ps.Pages[0].Pgno },
		"shortData":     func(ps *PageSet) { ps.Pages[1].Data = ps.Pages[1].Data[:511] },
		"snapshotGap":   func(ps *PageSet) { ps.Flags = FlagSnapshot },
	}
	for name, mutate := range cases {
		ps := good()
		mutate(ps)
		if err := ps.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Validate = %v", name, err)
		}
		if _, err := ps.MarshalBinary(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: MarshalBinary = %v", name, err)
		}
	}
}

// isSentinel reports whether err wraps one of the package's decode sentinels.
func isSentinel(err error) bool {
	return errors.Is(err, ErrTruncated) || errors.Is(err, ErrCorrupt) || errors.Is(err, ErrTooLarge)
}

func TestDecodersRejectTruncation(t *testing.T) {
	hb := Header{Magic: MagicBE, Version: FormatVersion, PageSize: 4096, Salt1: 9, Salt2: 10}.Encode()
	for n := range HeaderSize {
		if _, err := DecodeHeader(hb[:n]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("header prefix %d: %v", n, err)
		}
	}
	c := NewChain(Header{Magic: MagicLE, Version: FormatVersion, PageSize: 512, Salt1: 1, Salt2: 2})
	frame, _ := c.EncodeFrame(3, 3, []byte("page"))
	for n := range len(frame) {
		if _, _, _, err := c.Next(frame[:n]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("frame prefix %d: %v", n, err)
		}
	}
	ib := EncodeIndex(IndexHeader{Change: 1, PageSize: 4096, MxFrame: 3}, CheckpointInfo{})
	for n := range IndexHeaderSize {
		if _, _, err := DecodeIndex(ib[:n]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("index prefix %d: %v", n, err)
		}
	}
	for _, ps := range []*PageSet{samplePageSet(0, 512), samplePageSet(2, 512)} {
		b, err := ps.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		for n := range len(b) {
			if _, err := DecodePageSet(b[:n], Limits{}); !errors.Is(err, ErrTruncated) {
				t.Fatalf("page set prefix %d of %d: %v", n, len(b), err)
			}
		}
	}
}

func flipBit(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i/8] ^= 1 << (i % 8)
	return c
}

func TestDecodersRejectBitFlips(t *testing.T) {
	hb := Header{Magic: MagicLE, Version: FormatVersion, PageSize: 4096, CheckpointSeq: 5, Salt1: 9, Salt2: 10}.Encode()
	for i := range HeaderSize * 8 {
		if _, err := DecodeHeader(flipBit(hb[:], i)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("header bit %d: %v", i, err)
		}
	}
	c := NewChain(Header{Magic: MagicBE, Version: FormatVersion, PageSize: 512, Salt1: 1, Salt2: 2})
	frame, _ := c.EncodeFrame(3, 3, []byte("some page content"))
	for i := range len(frame) * 8 {
		if _, _, _, err := c.Next(flipBit(frame, i)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("frame bit %d: %v", i, err)
		}
	}
	ib := EncodeIndex(IndexHeader{Change: 1, PageSize: 4096, MxFrame: 3, NPage: 2, Salt: [2]uint32{7, 8}}, CheckpointInfo{})
	for i := range indexHdrSize * 8 {
		// One copy flipped: copies differ.
		if _, _, err := DecodeIndex(flipBit(ib, i)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("index bit %d (one copy): %v", i, err)
		}
		// Both copies flipped identically: the checksum (or a field check)
		// must still catch it.
		both := flipBit(flipBit(ib, i), i+indexHdrSize*8)
		if _, _, err := DecodeIndex(both); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("index bit %d (both copies): %v", i, err)
		}
	}
	b, err := samplePageSet(2, 512).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for i := range len(b) * 8 {
		_, err := DecodePageSet(flipBit(b, i), Limits{})
		if !isSentinel(err) {
			t.Fatalf("page set bit %d: %v", i, err)
		}
		// Past the fixed header the sizes are unaffected, so only the record
		// checksum can (and must) notice.
		if i >= pageSetHeaderSize*8 && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("page set bit %d: %v, want ErrCorrupt", i, err)
		}
	}
}

func TestDecodePageSetLimitsAndHeader(t *testing.T) {
	ps := samplePageSet(2, 512)
	b, err := ps.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodePageSet(b, Limits{MaxPages: 1, MaxBytes: len(b)}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("MaxPages 1: %v", err)
	}
	if _, err := DecodePageSet(b, Limits{MaxPages: 4}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("DBSize 5 > MaxPages 4: %v", err)
	}
	if _, err := DecodePageSet(b, Limits{MaxPages: 5, MaxBytes: len(b)}); err != nil {
		t.Errorf("exact limits: %v", err)
	}
	if _, err := DecodePageSet(b, Limits{MaxBytes: len(b) - 1}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("MaxBytes: %v", err)
	}
	// A declared page count far beyond the input is rejected before any
	// allocation, whatever the input length.
	huge := bytes.Clone(b[:pageSetHeaderSize])
	huge[42], huge[43], huge[44], huge[45] = 0xff, 0xff, 0xff, 0xff
	if _, err := DecodePageSet(huge, Limits{}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("nPages 2^32-1: %v", err)
	}
	if _, err := DecodePageSet(huge, Limits{MaxPages: 0xffffffff, MaxBytes: 1 << 62}); !errors.Is(err, ErrTruncated) {
		t.Errorf("nPages 2^32-1 under huge limits: %v", err)
	}
	v3 := bytes.Clone(b)
	v3[4] = 3
	if _, err := DecodePageSet(v3, Limits{}); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "version 3") {
		t.Errorf("format version 3: %v", err)
	}
	bad := bytes.Clone(b)
	bad[0] = 'X'
	if _, err := DecodePageSet(bad, Limits{}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("magic: %v", err)
	}
	if _, err := DecodePageSet(append(bytes.Clone(b), 0), Limits{}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("trailing byte: %v", err)
	}
}

func TestDecodeHeaderRejectsFields(t *testing.T) {
	base := Header{Magic: MagicLE, Version: FormatVersion, PageSize: 4096}
	for name, h := range map[string]Header{
		"magic":        {Magic: 0x377f0681, Version: FormatVersion, PageSize: 4096},
		"version":      {Magic: MagicLE, Version: 3007001, PageSize: 4096},
		"pageSize1":    {Magic: MagicLE, Version: FormatVersion, PageSize: 1}, // db-header encoding of 64K; SQLite rejects it in the WAL
		"pageSize256":  {Magic: MagicLE, Version: FormatVersion, PageSize: 256},
		"pageSize3000": {Magic: MagicLE, Version: FormatVersion, PageSize: 3000},
		"pageSize128K": {Magic: MagicLE, Version: FormatVersion, PageSize: 131072},
	} {
		b := h.Encode() // valid checksum, so the field check is what fails
		if _, err := DecodeHeader(b[:]); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		}
	}
	b := base.Encode()
	if _, err := DecodeHeader(b[:]); err != nil {
		t.Fatal(err)
	}
}

func TestDecodeIndexRejectsFields(t *testing.T) {
	ib := EncodeIndex(IndexHeader{Change: 1, PageSize: 4096}, CheckpointInfo{})
	// Re-checksum after editing so only the field check can fail.
	edit := func(f func(h []byte)) []byte {
		b := bytes.Clone(ib)
		f(b[:indexHdrSize])
		s0, s1 := Checksum(nativeBigEndian, b[:indexCksumOff], 0, 0)
		putNative32(b[40:], s0)
		putNative32(b[44:], s1)
		copy(b[indexHdrSize:], b[:indexHdrSize])
		return b
	}
	for name, b := range map[string][]byte{
		"version":   edit(func(h []byte) { h[0]++ }),
		"isInit0":   edit(func(h []byte) { h[12] = 0 }),
		"bigEnd2":   edit(func(h []byte) { h[13] = 2 }),
		"pageSize3": edit(func(h []byte) { putNative16(h[14:], 3) }),
		"pageSize1K+1": edit(func(h []byte) {
			putNative16(h[14:], 0x0401)
		}),
		"pageSize256": edit(func(h []byte) { putNative16(h[14:], 256) }),
	} {
		if _, _, err := DecodeIndex(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestDecodePageSetFormats: format 2's record CRC covers each page through
// its checksum, and records of format 1 (a journal written before the
// upgrade), whose CRC covers every byte, still decode; each format's CRC
// is refused under the other's format number.
func TestDecodePageSetFormats(t *testing.T) {
	ps := samplePageSet(3, 512)
	v2, err := ps.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if v2[4] != 2 {
		t.Fatalf("written as format %d, want 2", v2[4])
	}
	v1 := bytes.Clone(v2)
	v1[4] = 1
	binary.LittleEndian.PutUint64(v1[len(v1)-8:], crc64.Checksum(v1[:len(v1)-8], crcTable))
	for name, b := range map[string][]byte{"format 1": v1, "format 2": v2} {
		got, err := DecodePageSet(b, Limits{})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !reflect.DeepEqual(got, ps) {
			t.Fatalf("%s: decoded %+v, want %+v", name, got, ps)
		}
		if err := CheckPageSetRecord(bytes.NewReader(b), int64(len(b))); err != nil {
			t.Fatalf("%s: CheckPageSetRecord: %v", name, err)
		}
	}
	swapped := bytes.Clone(v1)
	swapped[4] = 2
	if _, err := DecodePageSet(swapped, Limits{}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("format 1's CRC as format 2: %v", err)
	}
	if err := CheckPageSetRecord(bytes.NewReader(swapped), int64(len(swapped))); !errors.Is(err, ErrCorrupt) {
		t.Errorf("CheckPageSetRecord, format 1's CRC as format 2: %v", err)
	}
	// The sums AppendBinaryWith is given are the ones the CRC covers.
	sums := PageChecksums(ps)
	with, err := ps.AppendBinaryWith(nil, sums)
	if err != nil || !bytes.Equal(with, v2) {
		t.Fatalf("AppendBinaryWith its own checksums: %v, equal %v", err, bytes.Equal(with, v2))
	}
	sums[1] ^= 1
	wrong, err := ps.AppendBinaryWith(nil, sums)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodePageSet(wrong, Limits{}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a record made with a wrong page checksum: %v", err)
	}
	if _, err := ps.AppendBinaryWith(nil, sums[:1]); !errors.Is(err, ErrInvalid) {
		t.Errorf("too few checksums: %v", err)
	}
	// Every bit of every page counts, and a short record is not whole.
	for i := pageSetHeaderSize; i < len(v2)-8; i += 97 {
		bad := flipBit(v2, i*8)
		if err := CheckPageSetRecord(bytes.NewReader(bad), int64(len(bad))); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("bit flipped at byte %d: %v", i, err)
		}
	}
	if err := CheckPageSetRecord(bytes.NewReader(v2[:len(v2)-1]), int64(len(v2))); !errors.Is(err, ErrTruncated) {
		t.Errorf("short record: %v", err)
	}
}
