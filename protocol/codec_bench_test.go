package protocol

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkEncodeVersionShifted: the versions of BenchmarkEncodeVersion
// with every page's bytes moved by two (as an insert moves a page's cell
// pointers), where the patch does not pay and the zstd codecs win.
func BenchmarkEncodeVersionShifted(b *testing.B) {
	for _, n := range []int{3, 100} {
		rng := rand.New(rand.NewPCG(1, uint64(n)))
		base, ps := testVersion(rng, n*3-2)
		for i, p := range ps.Pages {
			d := make([]byte, len(p.Data))
			copy(d[2:], p.Data)
			ps.Pages[i].Data = d
		}
		before := func(p uint32) []byte { return base[p-1] }
		b.Run(itoa(n)+"-pages", func(b *testing.B) {
			enc := NewEncoder()
			defer enc.Close()
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := enc.Version(ps, uint32(len(base)), before); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkEncodeVersion: a version of 3 changed pages against their old
// images (about what a one-row update writes), and a 100-page one.
func BenchmarkEncodeVersion(b *testing.B) {
	for _, n := range []int{3, 100} {
		rng := rand.New(rand.NewPCG(1, uint64(n)))
		base, ps := testVersion(rng, n*3-2)
		before := func(p uint32) []byte { return base[p-1] }
		b.Run(itoa(n)+"-pages", func(b *testing.B) {
			enc := NewEncoder()
			defer enc.Close()
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := enc.Version(ps, uint32(len(base)), before); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodeVersion(b *testing.B) {
	for _, n := range []int{3, 100} {
		rng := rand.New(rand.NewPCG(1, uint64(n)))
		base, ps := testVersion(rng, n*3-2)
		ev, err := EncodeVersion(ps, uint32(len(base)), func(p uint32) []byte { return base[p-1] })
		if err != nil {
			b.Fatal(err)
		}
		lookup := func(p uint32) ([]byte, error) { return base[p-1], nil }
		b.Run(itoa(n)+"-pages", func(b *testing.B) {
			dec := NewDecoder(DefaultLimits)
			defer dec.Close()
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := dec.Version(&ev, lookup); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}
