package wal

import (
	"bytes"
	"encoding/binary"
	"hash/crc64"
	"testing"
)

// Fuzz targets: no input may panic, and whatever decodes must re-encode to
// the same bytes (so decoding is injective and loses nothing). CI runs only
// the seeds; run with -fuzz locally.

func FuzzDecodeHeader(f *testing.F) {
	for _, h := range []Header{
		{Magic: MagicLE, Version: FormatVersion, PageSize: 4096, Salt1: 1, Salt2: 2},
		{Magic: MagicBE, Version: FormatVersion, PageSize: 65536, CheckpointSeq: 9},
	} {
		b := h.Encode()
		f.Add(b[:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeHeader(b)
		if err != nil {
			if !isSentinel(err) {
				t.Fatalf("error without sentinel: %v", err)
			}
			return
		}
		if enc := h.Encode(); !bytes.Equal(enc[:], b[:HeaderSize]) {
			t.Fatalf("re-encodes to %x, input %x", enc, b[:HeaderSize])
		}
	})
}

func FuzzChainNext(f *testing.F) {
	c := NewChain(Header{Magic: MagicLE, Version: FormatVersion, PageSize: 512, Salt1: 7, Salt2: 8, Checksum1: 1, Checksum2: 2})
	fr, _ := c.EncodeFrame(1, 0, []byte("hello"))
	f.Add(fr, false)
	cb := c
	cb.BigEndian = true
	fr, _ = cb.EncodeFrame(3, 3, []byte("world"))
	f.Add(fr, true)
	f.Fuzz(func(t *testing.T, frame []byte, big bool) {
		c := c
		c.BigEndian = big
		fh, page, next, err := c.Next(frame)
		if err != nil {
			if !isSentinel(err) {
				t.Fatalf("error without sentinel: %v", err)
			}
			return
		}
		re, renext := c.EncodeFrame(fh.Pgno, fh.Commit, page)
		if !bytes.Equal(re, frame) || renext != next {
			t.Fatalf("re-encode differs")
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	f.Add(EncodeIndex(IndexHeader{Change: 3, PageSize: 4096, MxFrame: 5, NPage: 9, Salt: [2]uint32{1, 2}}, CheckpointInfo{NBackfill: 2}))
	h, ci := EmptyIndex(IndexHeader{}, 65536, 1, 3, 4)
	f.Add(EncodeIndex(h, ci))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, ci, err := DecodeIndex(b)
		if err != nil {
			if !isSentinel(err) {
				t.Fatalf("error without sentinel: %v", err)
			}
			return
		}
		re := EncodeIndex(h, ci)
		// The unused field and lock bytes are not part of the decoded value:
		// compare with them zeroed.
		want := bytes.Clone(b[:IndexHeaderSize])
		clear(want[120:128])
		clear(want[132:136])
		if bytes.Equal(want[4:8], []byte{0, 0, 0, 0}) {
			if !bytes.Equal(re, want) {
				t.Fatalf("re-encodes to %x, input %x", re, want)
			}
		}
		h2, ci2, err := DecodeIndex(re)
		if err != nil || h2 != h || ci2 != ci {
			t.Fatalf("re-decode: %v", err)
		}
	})
}

func FuzzDecodePageSet(f *testing.F) {
	for _, ps := range []*PageSet{samplePageSet(0, 512), samplePageSet(2, 512)} {
		b, err := ps.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	snap := &PageSet{Version: 1, Flags: FlagSnapshot, PageSize: 512, DBSize: 1, Pages: []Page{{1, make([]byte, 512)}}}
	b, err := snap.MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	v1 := bytes.Clone(b)
	v1[4] = pageSetFormatV1
	binary.LittleEndian.PutUint64(v1[len(v1)-8:], crc64.Checksum(v1[:len(v1)-8], crcTable))
	f.Add(v1)
	f.Fuzz(func(t *testing.T, b []byte) {
		head, herr := PeekPageSet(b)
		if herr != nil && !isSentinel(herr) {
			t.Fatalf("peek: error without sentinel: %v", herr)
		}
		ps, err := DecodePageSet(b, Limits{MaxPages: 64, MaxBytes: 1 << 20})
		cerr := CheckPageSetRecord(bytes.NewReader(b), int64(len(b)))
		if cerr != nil && !isSentinel(cerr) {
			t.Fatalf("check: error without sentinel: %v", cerr)
		}
		if err == nil && cerr != nil {
			t.Fatalf("decodes, but its record does not check: %v", cerr)
		}
		if err == nil {
			// Whatever decodes whole, its header peeks as the same fields.
			if herr != nil {
				t.Fatalf("decodes but does not peek: %v", herr)
			}
			if want := *ps; head.Version != want.Version || head.Flags != want.Flags || head.PageSize != want.PageSize ||
				head.DBSize != want.DBSize || head.PreChecksum != want.PreChecksum || head.PostChecksum != want.PostChecksum || head.Pages != nil {
				t.Fatalf("peek %+v, decode %+v", head, want)
			}
		}
		if err != nil {
			if !isSentinel(err) {
				t.Fatalf("error without sentinel: %v", err)
			}
			return
		}
		re, err := ps.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded set does not re-encode: %v", err)
		}
		if b[4] == pageSetFormatV1 {
			// Re-encoded in format 2: the same but for the format
			// number and the record CRC.
			if len(re) != len(b) || !bytes.Equal(re[6:len(re)-8], b[6:len(b)-8]) {
				t.Fatalf("re-encode of a format-1 record differs")
			}
		} else if !bytes.Equal(re, b) {
			t.Fatalf("re-encode differs")
		}
	})
}
