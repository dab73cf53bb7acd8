package server

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// BenchmarkServerThroughput: 10 clients over loopback QUIC push the demo
// mutator as fast as the server acknowledges, each keeping up to 2,000
// mutations in flight in pushes of 200; b.N mutations in all. The metric
// is acknowledged mutations per second, group commit included.
func BenchmarkServerThroughput(b *testing.B) {
	benchThroughput(b, nil, 200)
}

// BenchmarkServerThroughputFsync is the cost of synchronous=FULL both
// ways, with the same 10 clients each pushing one mutation per Push:
// "per-commit" makes every mutation a transaction of its own with its own
// fsync (GroupCommit 1), "per-group" lets the writer take whatever pushes
// wait into one transaction and one fsync (the default).
func BenchmarkServerThroughputFsync(b *testing.B) {
	b.Run("per-commit", func(b *testing.B) { benchThroughput(b, func(c *Config) { c.GroupCommit = 1 }, 1) })
	b.Run("per-group", func(b *testing.B) { benchThroughput(b, nil, 1) })
}

func benchThroughput(b *testing.B, tune func(*Config), batch int) {
	srv, addr := testServer(b, b.TempDir(), tune)
	const clients, window = 10, 2000
	per := b.N/clients + 1
	var cs []*client
	for i := 0; i < clients; i++ {
		conn := dial(b, addr, srv.Fingerprint())
		c := benchClient(b, conn, fmt.Sprintf("bench-%d", i))
		// The Welcome's read armed a 10 s deadline: a long run (one
		// fsync per mutation) outlasts it.
		c.stream.SetReadDeadline(time.Time{})
		cs = append(cs, c)
	}
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- c.pump(per, batch, window, fmt.Sprintf("cat-%d", i%3))
		}()
	}
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(per*clients)/time.Since(start).Seconds(), "acked/s")
	b.ReportMetric(float64(srv.Authority("demo").Version()), "versions")
}

// pump pushes n mutations in pushes of batch, with at most window unacked,
// reading acks and versions (not decoding them: a replica's work is not the
// server's throughput).
func (c *client) pump(n, batch, window int, name string) error {
	args := mutators.CategoryArgs(name, 1)
	next, acked := uint64(1), uint64(0)
	last := uint64(n)
	readErr := make(chan error, 1)
	ackCh := make(chan uint64, 1024)
	go func() {
		for {
			m, err := c.r.Read()
			if err != nil {
				readErr <- err
				return
			}
			switch m := m.(type) {
			case *protocol.Ack:
				ackCh <- m.LastMutationID
				if m.LastMutationID >= last {
					readErr <- nil
					return
				}
			case *protocol.Error:
				readErr <- m.Err()
				return
			}
		}
	}()
	for acked < last {
		for next <= last && next-acked <= uint64(window-batch) {
			p := &protocol.Push{}
			for j := 0; j < batch && next <= last; j++ {
				p.Mutations = append(p.Mutations, protocol.Mutation{ID: next, Name: mutators.CreateCategoryOrIncrementIfExists, Args: args})
				next++
			}
			if err := protocol.WriteMessage(c.stream, p); err != nil {
				return err
			}
		}
		select {
		case a := <-ackCh:
			acked = max(acked, a)
		case err := <-readErr:
			if err != nil {
				return err
			}
			acked = last
		}
	}
	return nil
}
