package server

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// helloOnce opens a stream on conn, sends h and reads the answer (Welcome
// or Error), then ends the stream.
func helloOnce(ctx context.Context, conn *quic.Conn, h protocol.Hello) (protocol.Message, error) {
	stream, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	defer stream.Close()
	defer stream.CancelRead(0)
	h.Protocol = protocol.Version
	if err := protocol.WriteMessage(stream, &h); err != nil {
		return nil, err
	}
	stream.SetReadDeadline(time.Now().Add(30 * time.Second))
	return protocol.NewReader(stream, protocol.DefaultLimits).Read()
}

// BenchmarkGoodHelloUnderBadHellos measures a good Hello's time to its
// Welcome (its secret verified before, as a reconnecting client's is)
// with no other traffic ("quiet-ns"), and while 200 concurrent Hellos with
// wrong secrets arrive without pause from the same address ("loaded-ns"),
// in the same run; "ratio" is loaded over quiet. "limited" is the server
// as configured by default; "unlimited" turns the failure budget off, so
// every bad Hello costs a PBKDF2 run (unlocked, so the good Hello waits
// only for CPU, not for a lock). "unknown-db" floods with Hellos for a
// database that does not exist, refused before any credential check: the
// cost of the traffic alone, the floor "limited" can reach. Run with
// -benchtime=20x.
func BenchmarkGoodHelloUnderBadHellos(b *testing.B) {
	for _, tc := range []struct {
		name  string
		burst int
		db    string // the bad Hellos' database
	}{{"unknown-db", 0, "nosuch"}, {"limited", 0, "demo"}, {"unlimited", 1 << 30, "demo"}} {
		b.Run(tc.name, func(b *testing.B) {
			srv, addr := testServer(b, b.TempDir(), func(c *Config) {
				c.MaxConnsPerAddr = 1000
				c.AuthFailureBurst = tc.burst
			})
			ctx := context.Background()
			good := dial(b, addr, srv.Fingerprint())
			hello := protocol.Hello{Database: "demo", ClientID: "good", Credential: "s3cret", Checksum: newImage().sums.Sum()}
			if m, err := helloOnce(ctx, good, hello); err != nil {
				b.Fatal(err)
			} else {
				welcome(b, m)
			}
			measure := func() time.Duration {
				var total time.Duration
				for range b.N {
					start := time.Now()
					m, err := helloOnce(ctx, good, hello)
					if err != nil {
						b.Fatal(err)
					}
					welcome(b, m)
					total += time.Since(start)
				}
				return total / time.Duration(b.N)
			}
			b.ResetTimer()
			quiet := measure()

			conns := make([]*quic.Conn, 8)
			for i := range conns {
				conns[i] = dial(b, addr, srv.Fingerprint())
			}
			bctx, stop := context.WithCancel(ctx)
			var wg sync.WaitGroup
			var mu sync.Mutex
			codes := map[protocol.Code]int{}
			for i := range 200 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					bad := protocol.Hello{Database: tc.db, ClientID: "bad", Credential: "guess"}
					for bctx.Err() == nil {
						m, err := helloOnce(bctx, conns[i%len(conns)], bad)
						if e, ok := m.(*protocol.Error); ok && err == nil {
							mu.Lock()
							codes[e.Code]++
							mu.Unlock()
						}
					}
				}()
			}
			time.Sleep(100 * time.Millisecond) // let the flood build up
			loaded := measure()
			b.StopTimer()
			stop()
			wg.Wait()
			b.ReportMetric(float64(quiet.Nanoseconds()), "quiet-ns")
			b.ReportMetric(float64(loaded.Nanoseconds()), "loaded-ns")
			b.ReportMetric(float64(loaded)/float64(quiet), "ratio")
			b.Logf("bad Hellos answered: %d unauthorized, %d rate-limited, %d unknown database", codes[protocol.CodeUnauthorized], codes[protocol.CodeRateLimited], codes[protocol.CodeUnknownDatabase])
		})
	}
}
