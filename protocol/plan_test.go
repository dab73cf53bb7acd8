package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// checkPlan encodes the frames, decodes them with the limits a client of l
// reads with, and checks that each is within l and that they give back
// items in order.
func checkPlan(t *testing.T, items []Item, l ReceiveLimits, frames []Frame) {
	t.Helper()
	dl := l.Decoding(DefaultLimits)
	dl.MaxMessage = int(max(l.MaxMessage, minPlanMessage))
	dl.MaxVersions = int(max(l.MaxVersions, 1))
	var got []Item
	asm := NewReassembler(1 << 40)
	for i := range frames {
		b := frames[i].Append(nil)
		n, k := binary.Uvarint(b)
		if k <= 0 || int(n) != len(b)-k {
			t.Fatalf("frame %d: length prefix %d (%d bytes), body %d", i, n, k, len(b)-k)
		}
		if n > uint64(dl.MaxMessage) {
			t.Fatalf("frame %d: %d bytes, limit %d", i, n, dl.MaxMessage)
		}
		m, err := Decode(b[k:], dl)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if asm.Pending() {
			if _, ok := m.(*VersionPart); !ok {
				t.Fatalf("frame %d: %T between the parts of a version", i, m)
			}
		}
		switch m := m.(type) {
		case *Versions:
			if len(m.Versions) > int(max(l.MaxVersions, 1)) {
				t.Fatalf("frame %d: %d versions, limit %d", i, len(m.Versions), l.MaxVersions)
			}
			for _, v := range m.Versions {
				got = append(got, Item{Version: v.Version, Rec: v.AppendBinary(nil)})
			}
		case *VersionPart:
			rec, err := asm.Add(m)
			if err != nil {
				t.Fatalf("frame %d: %v", i, err)
			}
			if rec != nil {
				got = append(got, Item{Version: m.Version, Rec: rec})
			}
		default:
			got = append(got, Item{Msg: m})
		}
	}
	if asm.Pending() {
		t.Fatal("the plan ends inside a version")
	}
	if len(got) != len(items) {
		t.Fatalf("%d items back, want %d", len(got), len(items))
	}
	for i := range items {
		switch {
		case items[i].Msg != nil:
			if !bytes.Equal(Encode(got[i].Msg), Encode(items[i].Msg)) {
				t.Fatalf("item %d: message %v, want %v", i, got[i].Msg, items[i].Msg)
			}
		case got[i].Version != items[i].Version || !bytes.Equal(got[i].Rec, items[i].Rec):
			t.Fatalf("item %d: version %d (%d bytes), want %d (%d bytes)", i, got[i].Version, len(got[i].Rec), items[i].Version, len(items[i].Rec))
		}
	}
}

// record is an encoded raw version of version v with about size bytes of
// payload.
func record(v uint64, size int) []byte {
	ev := EncodedVersion{Version: v, PageSize: 512, DBSize: 1, Pgnos: []uint32{1}, Payload: bytes.Repeat([]byte{byte(v)}, size)}
	return ev.AppendBinary(nil)
}

func TestPlanFrames(t *testing.T) {
	l := ReceiveLimits{MaxMessage: 1000, MaxVersions: 3, MaxVersionBytes: 1 << 30}
	items := []Item{
		{Version: 1, Rec: record(1, 10)},
		{Version: 2, Rec: record(2, 10)},
		{Version: 3, Rec: record(3, 10)},
		{Version: 4, Rec: record(4, 10)}, // a fourth: a new message (MaxVersions)
		{Msg: &Ack{LastMutationID: 7, Version: 4}},
		{Version: 5, Rec: record(5, 2500)}, // parts
		{Version: 6, Rec: record(6, 600)},
		{Version: 7, Rec: record(7, 600)}, // does not fit beside 6
		{Msg: &Error{Code: CodeShuttingDown}},
	}
	frames := PlanFrames(items, l)
	checkPlan(t, items, l, frames)
	var kinds []string
	for _, f := range frames {
		switch {
		case f.Part != nil:
			kinds = append(kinds, "part")
		case f.Msg != nil:
			kinds = append(kinds, "msg")
		default:
			kinds = append(kinds, "versions")
		}
	}
	want := []string{"versions", "versions", "msg", "part", "part", "part", "versions", "versions", "msg"}
	if len(kinds) != len(want) {
		t.Fatalf("frames %v, want %v", kinds, want)
	}
	for i := range want {
		if kinds[i] != want[i] {
			t.Fatalf("frames %v, want %v", kinds, want)
		}
	}
	if len(frames[0].Recs) != 3 {
		t.Fatalf("first message has %d versions, want 3", len(frames[0].Recs))
	}
}

func TestReassemblerRefuses(t *testing.T) {
	rec := record(9, 3000)
	parts := PlanFrames([]Item{{Version: 9, Rec: rec}}, ReceiveLimits{MaxMessage: 1024, MaxVersions: 1})
	if len(parts) < 3 {
		t.Fatalf("%d frames, want parts", len(parts))
	}
	if _, err := NewReassembler(100).Add(parts[0].Part); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("over the limit: %v", err)
	}
	a := NewReassembler(1 << 20)
	if _, err := a.Add(parts[1].Part); !errors.Is(err, ErrMalformed) {
		t.Fatalf("starting mid-way: %v", err)
	}
	if _, err := a.Add(parts[0].Part); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Add(parts[2].Part); !errors.Is(err, ErrMalformed) || a.Pending() {
		t.Fatalf("skipping a part: %v, pending %v", err, a.Pending())
	}
	other := *parts[1].Part
	other.Version = 10
	a.Add(parts[0].Part)
	if _, err := a.Add(&other); !errors.Is(err, ErrMalformed) {
		t.Fatalf("another version mid-way: %v", err)
	}
}

func TestHelloLimitsRoundTrip(t *testing.T) {
	h := &Hello{Protocol: Version, Database: "d", ClientID: "c", Receive: ReceiveLimits{MaxMessage: 1 << 20, MaxVersions: 7, MaxVersionBytes: 5 << 30}}
	m, err := Decode(Encode(h), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.(*Hello).Receive; got != h.Receive {
		t.Fatalf("limits %+v, want %+v", got, h.Receive)
	}
	old := &Hello{Protocol: 1, Database: "d", ClientID: "c"}
	b := Encode(old)
	b = b[:len(b)-3] // a version 1 hello has no limits
	if m, err := Decode(b, DefaultLimits); err != nil || m.(*Hello).Protocol != 1 {
		t.Fatalf("version 1 hello: %v", err)
	}
	if err := (ReceiveLimits{MaxMessage: 1000, MaxVersions: 1, MaxVersionBytes: 1 << 30}).Check(); !errors.Is(err, ErrLimits) {
		t.Fatalf("below the floor: %v", err)
	}
	if err := DefaultReceiveLimits.Check(); err != nil {
		t.Fatal(err)
	}
}

// FuzzPlanFrames: for random record sizes, messages and limits, every frame
// is within the limits and the frames give back every item in order.
func FuzzPlanFrames(f *testing.F) {
	f.Add([]byte{10, 20, 0, 200, 255}, uint16(300), uint8(2))
	f.Add([]byte{1, 1, 1, 1}, uint16(256), uint8(1))
	f.Add([]byte{250, 0, 250, 0}, uint16(2000), uint8(0))
	f.Fuzz(func(t *testing.T, sizes []byte, maxMsg uint16, maxVers uint8) {
		if len(sizes) > 64 {
			sizes = sizes[:64]
		}
		l := ReceiveLimits{MaxMessage: uint32(maxMsg), MaxVersions: uint32(maxVers), MaxVersionBytes: 1 << 30}
		var items []Item
		v := uint64(1)
		for i, s := range sizes {
			if s == 0 {
				items = append(items, Item{Msg: &Ack{LastMutationID: uint64(i), Version: v - 1}})
				continue
			}
			items = append(items, Item{Version: v, Rec: record(v, int(s)*int(s)/8)})
			v++
		}
		checkPlan(t, items, l, PlanFrames(items, l))
	})
}

func TestReadRecordHeader(t *testing.T) {
	ev := EncodedVersion{Version: 3, PageSize: 4096, DBSize: 9, PostChecksum: 42, Pgnos: []uint32{1, 5, 9}, Payload: []byte{1}}
	if h, err := ReadRecordHeader(ev.AppendBinary(nil)); err != nil || h != (RecordHeader{Version: 3, PageBytes: 3 * 4096, PostChecksum: 42}) {
		t.Fatalf("%+v, %v", h, err)
	}
	if _, err := ReadRecordHeader([]byte{1, 2}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("truncated: %v", err)
	}
}

// TestHelloAppVersion: a version 3 Hello carries AppVersion; a version 2
// Hello (no AppVersion) still decodes, with AppVersion 0, so a server of
// this build admits clients of the previous protocol.
func TestHelloAppVersion(t *testing.T) {
	h := &Hello{Protocol: Version, Database: "d", ClientID: "c", AppVersion: 1<<40 + 7}
	m, err := Decode(Encode(h), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.(*Hello).AppVersion; got != h.AppVersion {
		t.Fatalf("app version %d, want %d", got, h.AppVersion)
	}
	v2 := &Hello{Protocol: 2, Database: "d", ClientID: "c", AppVersion: 9}
	b := Encode(v2)
	m, err = Decode(b, DefaultLimits)
	if err != nil {
		t.Fatalf("version 2 hello: %v", err)
	}
	if got := m.(*Hello); got.Protocol != 2 || got.AppVersion != 0 {
		t.Fatalf("version 2 hello decoded as %+v", got)
	}
	// A version 2 hello with a trailing field is malformed, not read.
	if _, err := Decode(append(b, 5), DefaultLimits); !errors.Is(err, ErrMalformed) {
		t.Fatalf("version 2 hello with trailing bytes: %v", err)
	}
	if !CodeUpgradeRequired.Fatal() {
		t.Fatal("upgrade required must be fatal")
	}
}
