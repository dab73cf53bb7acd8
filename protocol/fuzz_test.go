package protocol

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/sqlrebase/sqlrebase/wal"
)

// FuzzDecode: any bytes decode to a message or an error, never a panic, and
// a decoded message re-encodes to bytes that decode to the same message.
func FuzzDecode(f *testing.F) {
	for _, m := range sampleMessages() {
		f.Add(Encode(m))
	}
	f.Add([]byte{byte(TypePush), 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b, DefaultLimits)
		if err != nil {
			return
		}
		again, err := Decode(Encode(m), DefaultLimits)
		if err != nil {
			t.Fatalf("re-encoded %T does not decode: %v", m, err)
		}
		if !bytes.Equal(Encode(again), Encode(m)) {
			t.Fatalf("%T: encoding not stable", m)
		}
	})
}

// FuzzReader: a stream of arbitrary bytes yields messages and then an
// error; it never panics or allocates beyond the limits.
func FuzzReader(f *testing.F) {
	var all []byte
	for _, m := range sampleMessages() {
		all = AppendFrame(all, m)
	}
	f.Add(all)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	// Protocol 3's framing (an old client's Hello), then more.
	var legacy bytes.Buffer
	WriteLegacyMessage(&legacy, &Hello{Protocol: 3, Database: "d", ClientID: "c"})
	f.Add(append(legacy.Bytes(), all...))
	f.Add([]byte{0x80, 0x80, 0x80, 0x80, 0x10}) // a prefix beyond 32 bits
	small := DefaultLimits
	small.MaxMessage = 1 << 16
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b), small)
		for i := 0; i <= len(b); i++ {
			if _, err := r.Read(); err != nil {
				return
			}
		}
		t.Fatal("more messages than bytes")
	})
}

// FuzzDecodeVersion: an encoded version with arbitrary payload and page
// numbers decodes to a valid page set or an error, whatever the base.
func FuzzDecodeVersion(f *testing.F) {
	rng := rand.New(rand.NewPCG(3, 4))
	base, ps := testVersion(rng, 4)
	for _, withBase := range []bool{true, false} {
		var before func(uint32) []byte
		if withBase {
			before = func(p uint32) []byte { return base[p-1] }
		}
		ev, err := EncodeVersion(ps, 4, before)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(Encode(&Versions{Versions: []EncodedVersion{ev}}))
	}
	// A version whose bytes moved takes the dictionary codec (the one
	// above, changed in place, takes XOR): seed both.
	shifted := &wal.PageSet{Version: ps.Version, PageSize: ps.PageSize, DBSize: ps.DBSize}
	for _, p := range ps.Pages {
		d := make([]byte, len(p.Data))
		copy(d[3:], p.Data)
		shifted.Pages = append(shifted.Pages, wal.Page{Pgno: p.Pgno, Data: d})
	}
	ev, err := EncodeVersion(shifted, 4, func(p uint32) []byte { return base[p-1] })
	if err != nil || ev.Codec != CodecZstdDict {
		f.Fatalf("shifted seed: codec %d, %v", ev.Codec, err)
	}
	f.Add(Encode(&Versions{Versions: []EncodedVersion{ev}}))
	// Scattered bytes changed in place take XOR then zstd (the patch of
	// the version above is seeded by the first loop): seed it too.
	scattered := &wal.PageSet{Version: ps.Version, PageSize: ps.PageSize, DBSize: ps.DBSize}
	for _, p := range ps.Pages {
		d := append([]byte(nil), p.Data...)
		for j := 2048; j < len(d); j += 16 {
			d[j] ^= 0x5a
		}
		scattered.Pages = append(scattered.Pages, wal.Page{Pgno: p.Pgno, Data: d})
	}
	if ev, err = EncodeVersion(scattered, 4, func(p uint32) []byte { return base[p-1] }); err != nil || ev.Codec != CodecXorZstd {
		f.Fatalf("scattered seed: codec %d, %v", ev.Codec, err)
	}
	f.Add(Encode(&Versions{Versions: []EncodedVersion{ev}}))
	chunk, err := EncodeSnapshotChunk(3, 4096, 4, 0, 1, bytes.Repeat(base[0], 2))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(Encode(chunk))
	small := DefaultLimits
	small.MaxPageBytes = 1 << 20
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b, small)
		if err != nil {
			return
		}
		if c, ok := m.(*SnapshotChunk); ok {
			if raw, err := c.Pages(small); err == nil && len(raw) != int(c.Count)*int(c.PageSize) {
				t.Fatalf("snapshot chunk decoded to %d bytes for %d pages", len(raw), c.Count)
			}
			return
		}
		vs, ok := m.(*Versions)
		if !ok {
			return
		}
		for i := range vs.Versions {
			ps, err := DecodeVersion(&vs.Versions[i], small, func(p uint32) ([]byte, error) {
				if int(p) <= len(base) {
					return base[p-1], nil
				}
				return make([]byte, 4096), nil
			})
			if err != nil {
				continue
			}
			if err := ps.Validate(); err != nil {
				t.Fatalf("decoded an invalid page set: %v", err)
			}
		}
	})
}

// FuzzPatch: for any old and new page (a nil old: a page of zeros), the
// patch decodes back to the new page, alone and followed by other bytes,
// and takes at most a few bytes more than the page.
func FuzzPatch(f *testing.F) {
	f.Add([]byte("old page contents"), []byte("old pAge contents"), false)
	f.Add([]byte{}, []byte("a new page"), true)
	f.Add(bytes.Repeat([]byte{1}, 600), bytes.Repeat([]byte{2, 1, 1}, 200), false)
	f.Fuzz(func(t *testing.T, a, b []byte, fresh bool) {
		const size = 512
		page, old := make([]byte, size), make([]byte, size)
		copy(old, a)
		copy(page, b)
		if fresh {
			old = nil
		}
		enc := appendPatch([]byte{0xee}, page, old)[1:]
		if len(enc) > size+size/2+8 {
			t.Fatalf("patch of %d bytes for a page of %d", len(enc), size)
		}
		got := make([]byte, size)
		copy(got, old)
		n, err := walkPatch(append(enc, 7, 7), 1, size, func(_, off int, data []byte) { copy(got[off:], data) })
		if err != nil || n != len(enc) {
			t.Fatalf("walk: %d of %d bytes, %v", n, len(enc), err)
		}
		if !bytes.Equal(got, page) {
			t.Fatalf("patch decodes to another page")
		}
	})
}
