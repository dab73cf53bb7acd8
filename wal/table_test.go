package wal

import (
	"bytes"
	"testing"

	"pgregory.net/rapid"
)

// refDB is the reference model: an in-memory database as a map from page
// number to contents; pages never written read as zeros.
type refDB struct {
	pageSize uint32
	size     uint32
	pages    map[uint32][]byte
}

func newRefDB(pageSize uint32) *refDB {
	return &refDB{pageSize: pageSize, pages: map[uint32][]byte{}}
}

func (r *refDB) apply(ps *PageSet) {
	if ps.Flags&FlagSnapshot != 0 {
		clear(r.pages)
	}
	for pgno := range r.pages {
		if pgno > ps.DBSize {
			delete(r.pages, pgno)
		}
	}
	r.size = ps.DBSize
	for _, p := range ps.Pages {
		r.pages[p.Pgno] = bytes.Clone(p.Data)
	}
}

func (r *refDB) page(pgno uint32) []byte {
	if d, ok := r.pages[pgno]; ok {
		return d
	}
	return make([]byte, r.pageSize)
}

// sum recomputes the whole-database checksum from scratch.
func (r *refDB) sum() uint64 {
	var s uint64
	for pgno := uint32(1); pgno <= r.size; pgno++ {
		s ^= PageChecksum(pgno, r.page(pgno))
	}
	return s
}

func (r *refDB) equal(o *refDB) bool {
	if r.size != o.size {
		return false
	}
	for pgno := uint32(1); pgno <= r.size; pgno++ {
		if !bytes.Equal(r.page(pgno), o.page(pgno)) {
			return false
		}
	}
	return true
}

// genStep draws a page set for version v: sometimes a snapshot, otherwise a
// few changed pages with the database growing, shrinking or keeping size.
func genStep(t *rapid.T, pageSize uint32, v uint64, maxSize uint32) *PageSet {
	ps := &PageSet{Version: v, PageSize: pageSize, DBSize: rapid.Uint32Range(0, maxSize).Draw(t, "dbSize")}
	snapshot := v == 1 || rapid.IntRange(0, 5).Draw(t, "snapshotRoll") == 0
	if snapshot {
		ps.Flags = FlagSnapshot
	}
	for pgno := uint32(1); pgno <= ps.DBSize; pgno++ {
		if snapshot || rapid.IntRange(0, 3).Draw(t, "include") == 0 {
			d := make([]byte, pageSize)
			// Mostly small variations so collisions between versions of a
			// page are likely and exercised.
			d[rapid.IntRange(0, 3).Draw(t, "pos")] = rapid.Byte().Draw(t, "val")
			ps.Pages = append(ps.Pages, Page{Pgno: pgno, Data: d})
		}
	}
	return ps
}

func TestZeroPageChecksum(t *testing.T) {
	for _, pageSize := range []uint32{512, 4096, 65536} {
		z := zeroTableFor(pageSize)
		zero := make([]byte, pageSize)
		for _, pgno := range []uint32{0, 1, 2, 3, 255, 256, 65537, 1<<31 + 12345, 0xffffffff} {
			if got, want := z.sum(pgno), PageChecksum(pgno, zero); got != want {
				t.Fatalf("page size %d pgno %d: %#x want %#x", pageSize, pgno, got, want)
			}
		}
	}
}

func TestChecksumTableModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		const pageSize = 512
		tab := NewChecksumTable(pageSize)
		ref := newRefDB(pageSize)
		steps := rapid.IntRange(1, 12).Draw(t, "steps")
		for v := uint64(1); v <= uint64(steps); v++ {
			ps := genStep(t, pageSize, v, 24)
			if err := ps.Validate(); err != nil {
				t.Fatalf("generator produced invalid set: %v", err)
			}
			before := tab.Clone()
			beforeSum := tab.Sum()
			preview := tab.Preview(ps)
			if tab.Sum() != beforeSum {
				t.Fatalf("Preview changed the table")
			}
			tab.Apply(ps)
			ref.apply(ps)
			want := ref.sum()
			if preview != want || tab.Sum() != want {
				t.Fatalf("v%d: preview %#x, applied %#x, recomputed %#x", v, preview, tab.Sum(), want)
			}
			if tab.Pages() != ref.size {
				t.Fatalf("v%d: %d pages, want %d", v, tab.Pages(), ref.size)
			}
			for pgno := uint32(1); pgno <= ref.size; pgno++ {
				if tab.Page(pgno) != PageChecksum(pgno, ref.page(pgno)) {
					t.Fatalf("v%d: page %d checksum", v, pgno)
				}
			}
			if tab.Page(0) != 0 || tab.Page(ref.size+1) != 0 {
				t.Fatalf("out-of-range Page not 0")
			}
			if before.Sum() != beforeSum {
				t.Fatalf("Clone shares state with the original")
			}
		}
	})
}

func TestChecksumTableSetAndResize(t *testing.T) {
	tab := NewChecksumTable(512)
	ref := newRefDB(512)
	data := bytes.Repeat([]byte{7}, 512)
	tab.Set(5, PageChecksum(5, data)) // grows with zero pages 1..4
	ref.size = 5
	ref.pages[5] = data
	if tab.Pages() != 5 || tab.Sum() != ref.sum() {
		t.Fatalf("after Set(5): %d pages, sum %#x want %#x", tab.Pages(), tab.Sum(), ref.sum())
	}
	tab.Set(0, 123) // no page 0: ignored
	if tab.Sum() != ref.sum() {
		t.Fatalf("Set(0) changed the sum")
	}
	tab.Resize(2)
	ref.size = 2
	delete(ref.pages, 5)
	if tab.Sum() != ref.sum() {
		t.Fatalf("after shrink: %#x want %#x", tab.Sum(), ref.sum())
	}
	tab.Resize(6) // page 5 comes back as zeros, not as its old contents
	ref.size = 6
	if tab.Sum() != ref.sum() {
		t.Fatalf("after regrow: %#x want %#x", tab.Sum(), ref.sum())
	}
	tab.Resize(0)
	if tab.Sum() != 0 || tab.Pages() != 0 {
		t.Fatalf("empty table: sum %#x pages %d", tab.Sum(), tab.Pages())
	}
}

func TestMergeModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		const pageSize = 512
		base := genStep(t, pageSize, 1, 16) // version 1 is always a snapshot
		n := rapid.IntRange(1, 6).Draw(t, "n")
		var sets []*PageSet
		for i := range n {
			sets = append(sets, genStep(t, pageSize, uint64(i+2), 16))
		}
		seq := newRefDB(pageSize)
		seq.apply(base)
		seqTab := NewChecksumTable(pageSize)
		seqTab.Apply(base)
		pre := seqTab.Sum()
		for _, s := range sets {
			s.PreChecksum = seqTab.Sum()
			seqTab.Apply(s)
			s.PostChecksum = seqTab.Sum()
			seq.apply(s)
		}
		m, err := Merge(sets...)
		if err != nil {
			t.Fatalf("Merge: %v", err)
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("merged set invalid: %v", err)
		}
		last := sets[len(sets)-1]
		if m.Version != last.Version || m.DBSize != last.DBSize || m.PostChecksum != last.PostChecksum ||
			m.PreChecksum != pre || m.Flags != sets[0].Flags {
			t.Fatalf("merged metadata %+v", m)
		}
		merged := newRefDB(pageSize)
		merged.apply(base)
		mergedTab := NewChecksumTable(pageSize)
		mergedTab.Apply(base)
		if mergedTab.Preview(m) != m.PostChecksum {
			t.Fatalf("merged Preview %#x, want PostChecksum %#x", mergedTab.Preview(m), m.PostChecksum)
		}
		merged.apply(m)
		if !merged.equal(seq) {
			t.Fatalf("merged result differs from sequential application")
		}
		// Merging with the base too yields a snapshot equal to the end state.
		all, err := Merge(append([]*PageSet{base}, sets...)...)
		if err != nil {
			t.Fatalf("Merge with base: %v", err)
		}
		fresh := newRefDB(pageSize)
		fresh.pages[1] = []byte("stale") // a snapshot replaces whatever was there
		fresh.size = 40
		fresh.apply(all)
		if all.Flags&FlagSnapshot == 0 || all.Validate() != nil || !fresh.equal(seq) {
			t.Fatalf("merge from snapshot: flags %d, validate %v", all.Flags, all.Validate())
		}
	})
}

func TestMergeErrors(t *testing.T) {
	a := samplePageSet(1, 512)
	b := samplePageSet(1, 512)
	b.Version = a.Version + 2
	if _, err := Merge(a, b); err == nil {
		t.Error("gap accepted")
	}
	c := samplePageSet(1, 1024)
	c.Version = a.Version + 1
	if _, err := Merge(a, c); err == nil {
		t.Error("page size change accepted")
	}
	if _, err := Merge(); err == nil {
		t.Error("empty merge accepted")
	}
	bad := samplePageSet(1, 512)
	bad.Version = a.Version + 1
	bad.Pages[0].Pgno = 0
	if _, err := Merge(a, bad); err == nil {
		t.Error("invalid input accepted")
	}
}

// TestChecksumEqualErrorsDoNotCancel: the same damage at the same offset of
// two pages changes the whole-database checksum. With plain CRCs XORed
// together (LTX's scheme) the two changes cancel, since CRC is linear.
func TestChecksumEqualErrorsDoNotCancel(t *testing.T) {
	a, b := make([]byte, 4096), make([]byte, 4096)
	for i := range a {
		a[i], b[i] = byte(i), byte(i*7)
	}
	sum := PageChecksum(5, a) ^ PageChecksum(7, b)
	a2, b2 := append([]byte(nil), a...), append([]byte(nil), b...)
	a2[100] ^= 0x90
	b2[100] ^= 0x90
	if PageChecksum(5, a2)^PageChecksum(7, b2) == sum {
		t.Fatal("equal errors in two pages cancel out in the whole-database checksum")
	}
	if pageCRC(5, a2)^pageCRC(7, b2) != pageCRC(5, a)^pageCRC(7, b) {
		t.Fatal("the premise: with plain CRCs they cancel")
	}
}
