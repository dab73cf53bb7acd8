package replica

import (
	"bytes"
	"encoding/json"
	"testing"
)

func FuzzDecodeQueueHeader(f *testing.F) {
	f.Add(encodeQueueHeader([16]byte{1, 2, 3}, 0))
	f.Add(encodeQueueHeader([16]byte{0xff}, 1<<64-1))
	f.Add([]byte("SRQ1"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		cid, base, err := decodeQueueHeader(b)
		if err != nil {
			return
		}
		// A header that decodes is exactly what encoding produces.
		if got := encodeQueueHeader(cid, base); !bytes.Equal(got, b[:queueHeaderSize]) {
			t.Fatalf("re-encoded header %x differs from input %x", got, b[:queueHeaderSize])
		}
	})
}

func FuzzDecodeQueueRecords(f *testing.F) {
	var seed []byte
	for id := uint64(1); id <= 3; id++ {
		seed = appendQueueRecord(seed, queuedMutation{ID: id, Name: "m", Args: json.RawMessage(`{"a":1}`)})
	}
	f.Add(seed, uint64(0))
	f.Add(seed, uint64(2))
	f.Add(seed[:len(seed)-1], uint64(0))
	f.Add([]byte{}, uint64(0))
	f.Add(appendQueueRecord(nil, queuedMutation{ID: 9}), uint64(100))
	f.Fuzz(func(t *testing.T, b []byte, base uint64) {
		all, valid := decodeQueueRecords(b, 0)
		if valid < 0 || valid > len(b) {
			t.Fatalf("valid = %d of %d bytes", valid, len(b))
		}
		// The valid prefix is exactly the re-encoding of its records.
		var enc []byte
		for _, m := range all {
			enc = appendQueueRecord(enc, m)
		}
		if !bytes.Equal(enc, b[:valid]) {
			t.Fatalf("re-encoded records differ from the valid prefix")
		}
		for i := 1; i < len(all); i++ {
			if all[i].ID != all[i-1].ID+1 {
				t.Fatalf("ids not consecutive: %d after %d", all[i].ID, all[i-1].ID)
			}
		}
		// A base only filters; it never changes where the valid prefix ends.
		after, valid2 := decodeQueueRecords(b, base)
		if valid2 != valid {
			t.Fatalf("valid with base %d = %d, without = %d", base, valid2, valid)
		}
		var want []queuedMutation
		for _, m := range all {
			if m.ID > base {
				want = append(want, m)
			}
		}
		if len(after) != len(want) {
			t.Fatalf("%d records after base %d, want %d", len(after), base, len(want))
		}
		for i := range want {
			if after[i].ID != want[i].ID || after[i].Name != want[i].Name || !bytes.Equal(after[i].Args, want[i].Args) {
				t.Fatalf("record %d differs with base %d", i, base)
			}
		}
	})
}
