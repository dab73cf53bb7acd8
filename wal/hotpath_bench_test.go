package wal

import (
	"fmt"
	"testing"
)

// Hot paths of a rebase in this package besides the codec (bench_test.go):
// merging the versions a replica catches up on, and the checksum table's
// preview and update, which every apply does.

// chainSets returns n consecutive page sets of pages pages each, on a
// database of 1000 pages, with their checksums filled in.
func chainSets(n, pages int) []*PageSet {
	t := NewChecksumTable(4096)
	t.Resize(1000)
	var out []*PageSet
	for v := range n {
		ps := &PageSet{Version: uint64(v + 2), PageSize: 4096, DBSize: 1000, PreChecksum: t.Sum()}
		for i := range pages {
			d := make([]byte, 4096)
			d[0], d[1] = byte(v), byte(i)
			ps.Pages = append(ps.Pages, Page{Pgno: uint32((v*7+i*13)%1000 + 1), Data: d})
		}
		sortPages(ps.Pages)
		ps.PostChecksum = t.Preview(ps)
		t.Apply(ps)
		out = append(out, ps)
	}
	return out
}

// sortPages sorts by page number and drops duplicates, as a page set needs.
func sortPages(p []Page) []Page {
	for i := 1; i < len(p); i++ {
		for j := i; j > 0 && p[j].Pgno < p[j-1].Pgno; j-- {
			p[j], p[j-1] = p[j-1], p[j]
		}
	}
	return p
}

func BenchmarkMerge(b *testing.B) {
	for _, c := range []struct{ sets, pages int }{{10, 3}, {100, 3}, {10, 100}} {
		b.Run(fmt.Sprintf("sets=%d/pages=%d", c.sets, c.pages), func(b *testing.B) {
			sets := chainSets(c.sets, c.pages)
			for _, ps := range sets {
				if err := ps.Validate(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Merge(sets...); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkChecksumTablePreview(b *testing.B) {
	for _, pages := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("pages=%d", pages), func(b *testing.B) {
			t := NewChecksumTable(4096)
			t.Resize(1000)
			ps := chainSets(1, pages)[0]
			b.SetBytes(int64(len(ps.Pages)) * 4096)
			for b.Loop() {
				t.Preview(ps)
			}
		})
	}
}

func BenchmarkChecksumTableApply(b *testing.B) {
	ps := chainSets(1, 100)[0]
	t := NewChecksumTable(4096)
	t.Resize(1000)
	b.SetBytes(int64(len(ps.Pages)) * 4096)
	for b.Loop() {
		t.Apply(ps)
	}
}
