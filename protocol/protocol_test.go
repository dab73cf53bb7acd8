package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/wal"
)

func sampleMessages() []Message {
	return []Message{
		&Hello{Protocol: Version, Database: "demo", ClientID: "c1", Credential: "s3cret", Version: 14, Checksum: 0xdeadbeefcafef00d},
		&Welcome{Version: 20, LastMutationID: 3, PageSize: 4096, MaxBatch: 1000, MaxInFlight: 10000, Snapshot: true},
		&Error{Code: CodeUnauthorized, Message: "wrong credential for database demo"},
		&Push{Mutations: []Mutation{{ID: 1, Name: "inc", Args: []byte(`{"a":1}`)}, {ID: 2, Name: "inc", Args: []byte(`{}`)}}},
		&Push{Mutations: []Mutation{}},
		&Ack{LastMutationID: 7, Version: 99},
		&Versions{Versions: []EncodedVersion{
			{Version: 5, PageSize: 4096, DBSize: 3, PostChecksum: 2, Codec: CodecRaw, Pgnos: []uint32{1, 3}, Payload: make([]byte, 8192)},
			{Version: 6, PageSize: 4096, DBSize: 3, PostChecksum: 3, Codec: CodecZstdDict, BaseDBSize: 3, Pgnos: []uint32{2}, Payload: []byte{1, 2, 3}},
			// A patch against a smaller database: two new bytes at offset
			// 3 of page 1, nothing in the new page 4.
			{Version: 7, PageSize: 512, DBSize: 4, PostChecksum: 4, Codec: CodecPatch, BaseDBSize: 2, Pgnos: []uint32{1, 4}, Payload: []byte{1, 3<<2 | 1, 0xaa, 0xbb, 0}},
			{Version: 8, Flags: 1, PageSize: 65536, DBSize: 1, PostChecksum: 5, Codec: CodecRaw, Pgnos: []uint32{1}, Payload: []byte{9}},
		}},
		&SnapshotChunk{Version: 9, PageSize: 4096, DBSize: 10, Checksum: 77, First: 3, Count: 2, Codec: CodecZstd, Payload: []byte("zz")},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, m := range sampleMessages() {
		b := Encode(m)
		got, err := Decode(b, DefaultLimits)
		if err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("%T: got %+v, want %+v", m, got, m)
		}
		// Every strict prefix is an error, never a panic or a message.
		for i := 0; i < len(b); i++ {
			if _, err := Decode(b[:i], DefaultLimits); err == nil {
				t.Fatalf("%T: prefix of %d/%d bytes decoded", m, i, len(b))
			}
		}
		if _, err := Decode(append(b, 0), DefaultLimits); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%T with a trailing byte: %v, want ErrMalformed", m, err)
		}
	}
}

func TestStream(t *testing.T) {
	var buf []byte
	for _, m := range sampleMessages() {
		buf = AppendFrame(buf, m)
	}
	r := NewReader(bytes.NewReader(buf), DefaultLimits)
	for _, want := range sampleMessages() {
		got, err := r.Read()
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("read %T: %+v, %v", want, got, err)
		}
	}
	if _, err := r.Read(); err != io.EOF {
		t.Fatalf("at end: %v, want io.EOF", err)
	}
	// Cut inside a message: malformed, not EOF.
	r = NewReader(bytes.NewReader(buf[:len(buf)-1]), DefaultLimits)
	var err error
	for err == nil {
		_, err = r.Read()
	}
	if !errors.Is(err, ErrMalformed) {
		t.Fatalf("truncated stream: %v, want ErrMalformed", err)
	}
}

func TestRefusals(t *testing.T) {
	small := DefaultLimits
	small.MaxMessage, small.MaxBatch, small.MaxString = 64, 1, 4
	cases := []struct {
		name string
		b    []byte
		l    Limits
		want error
	}{
		{"unknown type", []byte{99, 1, 2}, DefaultLimits, ErrUnknownType},
		{"empty", nil, DefaultLimits, ErrMalformed},
		{"oversized", Encode(&Error{Code: 1, Message: strings.Repeat("x", 100)}), small, ErrTooLarge},
		{"long string", Encode(&Hello{Database: "toolong"}), small, ErrTooLarge},
		{"big batch", Encode(&Push{Mutations: []Mutation{{ID: 1}, {ID: 2}}}), small, ErrTooLarge},
		{"ids not ascending", Encode(&Push{Mutations: []Mutation{{ID: 2}, {ID: 2}}}), DefaultLimits, ErrMalformed},
		{"bad bool", []byte{byte(TypeWelcome), 0, 0, 0, 0, 0, 7}, DefaultLimits, ErrMalformed},
		{"forged count", []byte{byte(TypePush), 0xff, 0x07}, DefaultLimits, ErrTooLarge},
		{"count beyond bytes", []byte{byte(TypePush), 100}, DefaultLimits, ErrMalformed},
		{"versions not consecutive", Encode(&Versions{Versions: []EncodedVersion{
			{Version: 5, PageSize: 4096, DBSize: 1, Pgnos: []uint32{}},
			{Version: 7, PageSize: 4096, DBSize: 1, Pgnos: []uint32{}},
		}}), DefaultLimits, ErrMalformed},
		{"page beyond db size", Encode(&Versions{Versions: []EncodedVersion{{Version: 5, PageSize: 4096, DBSize: 1, Pgnos: []uint32{2}}}}), DefaultLimits, ErrMalformed},
		{"bad page size", Encode(&Versions{Versions: []EncodedVersion{{Version: 5, PageSize: 1000, DBSize: 1}}}), DefaultLimits, ErrMalformed},
		{"snapshot chunk outside", Encode(&SnapshotChunk{Version: 1, PageSize: 4096, DBSize: 2, First: 2, Count: 2}), DefaultLimits, ErrMalformed},
	}
	for _, c := range cases {
		_, err := Decode(c.b, c.l)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	// The reader refuses an oversized length without reading the body.
	frame := AppendFrame(nil, &Error{Message: strings.Repeat("x", 100)})
	if _, err := NewReader(bytes.NewReader(frame[:8]), small).Read(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized frame: %v", err)
	}
	if _, err := NewReader(bytes.NewReader([]byte{0, 0, 0, 0}), DefaultLimits).Read(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("zero-length frame: %v", err)
	}
}

// testVersion builds a base image of n pages and a page set that changes a
// few bytes in some of them and appends a page.
func testVersion(rng *rand.Rand, n int) (base [][]byte, ps *wal.PageSet) {
	const size = 4096
	base = make([][]byte, n)
	for i := range base {
		base[i] = make([]byte, size)
		for j := size / 2; j < size; j++ { // cells at the end, free space before, as in a b-tree page
			base[i][j] = byte(rng.IntN(256))
		}
	}
	ps = &wal.PageSet{Version: 2, PageSize: size, DBSize: uint32(n + 1), PostChecksum: 2}
	for i := 0; i < n; i += 3 {
		p := append([]byte(nil), base[i]...)
		p[100+rng.IntN(size-200)] ^= 0x5a
		ps.Pages = append(ps.Pages, wal.Page{Pgno: uint32(i + 1), Data: p})
	}
	fresh := make([]byte, size)
	copy(fresh, "a new page")
	ps.Pages = append(ps.Pages, wal.Page{Pgno: uint32(n + 1), Data: fresh})
	return base, ps
}

func TestVersionCodecs(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base, ps := testVersion(rng, 10)
	before := func(p uint32) []byte { return base[p-1] }
	lookup := func(p uint32) ([]byte, error) { return base[p-1], nil }

	// A change in place (a byte flipped in each changed page): the patch.
	patch, err := EncodeVersion(ps, 10, before)
	if err != nil {
		t.Fatal(err)
	}
	// Many scattered bytes changed in place (every 16th of a page's
	// cells): too many runs for the patch, a pattern for XOR then zstd.
	scattered := &wal.PageSet{Version: ps.Version, PageSize: ps.PageSize, DBSize: ps.DBSize, PostChecksum: 2}
	for _, p := range ps.Pages {
		d := append([]byte(nil), p.Data...)
		for j := 2048; j < len(d); j += 16 {
			d[j] ^= 0x5a
		}
		scattered.Pages = append(scattered.Pages, wal.Page{Pgno: p.Pgno, Data: d})
	}
	xor, err := EncodeVersion(scattered, 10, before)
	if err != nil {
		t.Fatal(err)
	}
	// The same pages with their content shifted by two bytes, as an
	// insert shifts a page's cell pointers: XOR does not see it, the
	// dictionary does.
	shifted := &wal.PageSet{Version: ps.Version, PageSize: ps.PageSize, DBSize: ps.DBSize, PostChecksum: 2}
	for _, p := range ps.Pages {
		d := make([]byte, len(p.Data))
		copy(d[2:], p.Data)
		shifted.Pages = append(shifted.Pages, wal.Page{Pgno: p.Pgno, Data: d})
	}
	dict, err := EncodeVersion(shifted, 10, before)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := EncodeVersion(ps, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	if patch.Codec != CodecPatch || xor.Codec != CodecXorZstd || dict.Codec != CodecZstdDict || plain.Codec != CodecZstd {
		t.Fatalf("codecs %d, %d, %d and %d", patch.Codec, xor.Codec, dict.Codec, plain.Codec)
	}
	// A flipped byte costs the run count, one run header and the byte,
	// except on the new page, whose bytes are patched onto zeros.
	if len(patch.Payload) > 4*(len(ps.Pages)-1)+16 {
		t.Fatalf("patch of %d pages takes %d bytes: % x", len(ps.Pages), len(patch.Payload), patch.Payload)
	}
	raw := len(ps.Pages) * 4096
	t.Logf("%d pages: raw %d B, zstd %d B, patch %d B; scattered: xor+zstd %d B; shifted: zstd+dict %d B", len(ps.Pages), raw, len(plain.Payload), len(patch.Payload), len(xor.Payload), len(dict.Payload))
	if len(xor.Payload) > raw/40 || len(dict.Payload) > raw/20 || len(dict.Payload) >= len(plain.Payload) {
		t.Fatalf("the delta codecs do not pay: xor %d B, dict %d B, plain %d B, raw %d B", len(xor.Payload), len(dict.Payload), len(plain.Payload), raw)
	}
	for _, c := range []struct {
		ev EncodedVersion
		ps *wal.PageSet
	}{{patch, ps}, {xor, scattered}, {dict, shifted}, {plain, ps}} {
		// Through the wire format and back.
		m, err := Decode(Encode(&Versions{Versions: []EncodedVersion{c.ev}}), DefaultLimits)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeVersion(&m.(*Versions).Versions[0], DefaultLimits, lookup)
		if err != nil {
			t.Fatalf("codec %d: %v", c.ev.Codec, err)
		}
		if !reflect.DeepEqual(got, c.ps) {
			t.Fatalf("codec %d: page set differs after the round trip", c.ev.Codec)
		}
	}
	// A wrong base must not decode to the right pages.
	wrong := func(p uint32) ([]byte, error) { return base[(p)%10], nil }
	for _, c := range []struct {
		ev EncodedVersion
		ps *wal.PageSet
	}{{patch, ps}, {xor, scattered}, {dict, shifted}} {
		if got, err := DecodeVersion(&c.ev, DefaultLimits, wrong); err == nil && reflect.DeepEqual(got, c.ps) {
			t.Fatalf("codec %d: decoded the right pages from the wrong base", c.ev.Codec)
		}
		if _, err := DecodeVersion(&c.ev, DefaultLimits, nil); !errors.Is(err, ErrMalformed) {
			t.Fatalf("codec %d without base: %v", c.ev.Codec, err)
		}
	}
	// Incompressible pages go raw.
	noise := &wal.PageSet{Version: 3, PageSize: 512, DBSize: 1, Pages: []wal.Page{{Pgno: 1, Data: make([]byte, 512)}}}
	for i := range noise.Pages[0].Data {
		noise.Pages[0].Data[i] = byte(rng.IntN(256))
	}
	ev, err := EncodeVersion(noise, 0, nil)
	if err != nil || ev.Codec != CodecRaw {
		t.Fatalf("noise: codec %d, %v", ev.Codec, err)
	}
	// A payload that inflates beyond what the page count allows is refused.
	big := &wal.PageSet{Version: 3, PageSize: 4096, DBSize: 4, Pages: []wal.Page{{Pgno: 1, Data: make([]byte, 4096)}, {Pgno: 2, Data: make([]byte, 4096)}}}
	ev, _ = EncodeVersion(big, 0, nil)
	ev.Pgnos = ev.Pgnos[:1]
	if _, err := DecodeVersion(&ev, DefaultLimits, nil); !errors.Is(err, ErrMalformed) {
		t.Fatalf("inflating payload: %v", err)
	}
}

func TestSnapshotChunk(t *testing.T) {
	raw := bytes.Repeat([]byte("page"), 2048) // two 4 KiB pages
	c, err := EncodeSnapshotChunk(4, 4096, 5, 123, 2, raw)
	if err != nil {
		t.Fatal(err)
	}
	if c.Codec != CodecZstd || c.Count != 2 {
		t.Fatalf("chunk %+v", c)
	}
	m, err := Decode(Encode(c), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.(*SnapshotChunk).Pages(DefaultLimits)
	if err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("pages: %v", err)
	}
	if _, err := EncodeSnapshotChunk(4, 4096, 5, 123, 2, raw[:100]); err == nil {
		t.Fatal("encoded a partial page")
	}
}

func TestCodes(t *testing.T) {
	if !CodeUnauthorized.Fatal() || CodeGap.Fatal() || CodeSlowClient.Fatal() || CodeBusy.Fatal() || CodeBusy.String() != "server busy" {
		t.Fatal("fatal codes")
	}
	e := (&Error{Code: CodeUnknownDatabase, Message: `no database "x"`}).Err()
	var re *RemoteError
	if !errors.As(e, &re) || re.Code != CodeUnknownDatabase || !strings.Contains(e.Error(), "unknown database") {
		t.Fatalf("error %v", e)
	}
}

func TestPreEncodedVersions(t *testing.T) {
	want := sampleMessages()[6].(*Versions)
	var parts [][]byte
	for i := range want.Versions {
		b := want.Versions[i].AppendBinary(nil)
		v, err := DecodeEncodedVersion(b, DefaultLimits)
		if err != nil || !reflect.DeepEqual(v, want.Versions[i]) {
			t.Fatalf("version %d: %+v, %v", i, v, err)
		}
		parts = append(parts, b)
	}
	frame := AppendVersionsFrame(nil, parts...)
	if !bytes.Equal(frame, AppendFrame(nil, want)) {
		t.Fatal("a frame of pre-encoded versions differs from the encoded message")
	}
	if _, err := DecodeEncodedVersion(append(parts[0], 1), DefaultLimits); !errors.Is(err, ErrMalformed) {
		t.Fatalf("trailing byte: %v", err)
	}
}

// TestFrameLengths: the length prefix is a minimal uvarint (one byte under
// 128 bytes of message), read back exactly at each width; a zero,
// non-minimal or over-32-bit prefix is malformed.
func TestFrameLengths(t *testing.T) {
	for _, size := range []int{1, 127, 128, 16383, 16384, 1<<21 + 5} {
		m := &Error{Code: CodeInternal, Message: string(bytes.Repeat([]byte("x"), size))}
		b := AppendFrame([]byte("before"), m)
		b = AppendVersionsFrame(b, []byte("not decoded"))
		frame := b[len("before"):]
		n, k := binary.Uvarint(frame)
		if want := len(Encode(m)); int(n) != want || k != len(binary.AppendUvarint(nil, uint64(want))) {
			t.Fatalf("message of %d bytes: prefix %d in %d bytes", want, n, k)
		}
		l := DefaultLimits
		l.MaxString = size
		got, err := NewReader(bytes.NewReader(frame), l).Read()
		if err != nil || got.(*Error).Message != m.Message {
			t.Fatalf("message of %d: %v", size, err)
		}
	}
	for name, b := range map[string][]byte{
		"non-minimal":    {0x81, 0x00, byte(TypeAck), 0, 0},
		"beyond 32 bits": {0x80, 0x80, 0x80, 0x80, 0x10},
		"cut prefix":     {0x81},
	} {
		if _, err := NewReader(bytes.NewReader(b), DefaultLimits).Read(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%s: %v", name, err)
		}
	}
	// A zero first byte after the first message is no legacy frame.
	b := AppendFrame(nil, &Ack{LastMutationID: 1, Version: 2})
	r := NewReader(bytes.NewReader(append(b, 0, 0, 0, 5)), DefaultLimits)
	if _, err := r.Read(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("zero length: %v", err)
	}
}

// TestLegacyFraming: a protocol 3 client's Hello (a uint32 length prefix)
// is read, so that the server can refuse its protocol; the Reader then
// says Legacy and reads no more, and WriteLegacyMessage's Error is what a
// protocol 3 client parses: a uint32 length, then the message.
func TestLegacyFraming(t *testing.T) {
	h := &Hello{Protocol: 3, Database: "demo", ClientID: "old", Credential: "s3cret", AppVersion: 9}
	var old bytes.Buffer
	if err := WriteLegacyMessage(&old, h); err != nil {
		t.Fatal(err)
	}
	old.Write(AppendFrame(nil, &Ack{}))
	r := NewReader(&old, DefaultLimits)
	m, err := r.Read()
	if err != nil || !reflect.DeepEqual(m, h) || !r.Legacy() {
		t.Fatalf("legacy hello: %#v, %v, legacy %v", m, err, r.Legacy())
	}
	if _, err := r.Read(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("after a legacy hello: %v", err)
	}
	var out bytes.Buffer
	e := &Error{Code: CodeProtocolVersion, Message: "this server speaks 4 to 4"}
	if err := WriteLegacyMessage(&out, e); err != nil {
		t.Fatal(err)
	}
	b := out.Bytes()
	if n := binary.BigEndian.Uint32(b); int(n) != len(b)-4 {
		t.Fatalf("legacy prefix %d for %d bytes", n, len(b)-4)
	}
	if got, err := Decode(b[4:], DefaultLimits); err != nil || !reflect.DeepEqual(got, e) {
		t.Fatalf("legacy error: %#v, %v", got, err)
	}
	// A fresh (protocol 4) Reader is not legacy.
	r = NewReader(bytes.NewReader(AppendFrame(nil, e)), DefaultLimits)
	if _, err := r.Read(); err != nil || r.Legacy() {
		t.Fatalf("uvarint frame: %v, legacy %v", err, r.Legacy())
	}
}
