package wal

import (
	"fmt"
	"testing"
)

func benchSet(n int) *PageSet {
	ps := &PageSet{Version: 2, PageSize: 4096, DBSize: uint32(n)}
	for i := range n {
		d := make([]byte, 4096)
		d[0] = byte(i)
		ps.Pages = append(ps.Pages, Page{Pgno: uint32(i + 1), Data: d})
	}
	return ps
}

func BenchmarkEncodePageSet(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("pages=%d", n), func(b *testing.B) {
			ps := benchSet(n)
			buf := make([]byte, 0, EncodedSize(ps.PageSize, n))
			b.SetBytes(int64(EncodedSize(ps.PageSize, n)))
			b.ReportAllocs()
			for b.Loop() {
				var err error
				if buf, err = ps.AppendBinary(buf[:0]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodePageSet(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("pages=%d", n), func(b *testing.B) {
			enc, err := benchSet(n).MarshalBinary()
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(enc)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := DecodePageSet(enc, Limits{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPageChecksum(b *testing.B) {
	page := make([]byte, 4096)
	b.SetBytes(int64(len(page)))
	for b.Loop() {
		PageChecksum(42, page)
	}
}

func BenchmarkChecksum(b *testing.B) {
	page := make([]byte, 4096)
	b.SetBytes(int64(len(page)))
	for b.Loop() {
		Checksum(false, page, 0, 0)
	}
}
