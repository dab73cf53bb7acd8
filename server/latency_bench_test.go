package server

import (
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// BenchmarkPushAck: one client pushes one mutation and waits for its ack:
// the server's part of Mutate-to-confirmed (network both ways, the writer,
// the commit's fsync, capture, encode, log).
func BenchmarkPushAck(b *testing.B) {
	srv, addr := testServer(b, b.TempDir(), nil)
	c := benchClient(b, dial(b, addr, srv.Fingerprint()), "lat")
	args := mutators.CategoryArgs("Food", 1)
	var lat []time.Duration
	b.ResetTimer()
	for i := 1; i <= b.N; i++ {
		start := time.Now()
		if err := protocol.WriteMessage(c.stream, &protocol.Push{Mutations: []protocol.Mutation{{ID: uint64(i), Name: mutators.CreateCategoryOrIncrementIfExists, Args: args}}}); err != nil {
			b.Fatal(err)
		}
		for {
			m, err := c.r.Read()
			if err != nil {
				b.Fatal(err)
			}
			if a, ok := m.(*protocol.Ack); ok && a.LastMutationID == uint64(i) {
				break
			}
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	p := sortedDurations(lat)
	b.ReportMetric(float64(p[len(p)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(p[len(p)*99/100].Microseconds())/1000, "p99-ms")
}

func sortedDurations(d []time.Duration) []time.Duration {
	s := append([]time.Duration(nil), d...)
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s
}
