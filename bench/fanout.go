package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sys/unix"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

// The fan-out: our server's delivery of a version to n protocol
// subscribers against bare quic-go's broadcast of the same bytes to n
// connections with the same TLS and QUIC settings. Both sides are set up
// once and then take turns, a few rounds each, so that the two are measured
// under the same state of the machine: run one after the other, a neighbour's
// burst on this shared 2-vCPU machine fell on one side and moved the ratio of
// a single run anywhere between 0.69 and 0.99.

const (
	// fanoutWarmup is how many rounds each side runs before it is
	// measured, with a garbage collection after them: the first packets
	// after the handshakes (MTU probes, session tickets, the handshakes'
	// garbage) are the connections' start, not the steady fan-out.
	fanoutWarmup = 5
	// fanoutTurn is how many rounds a side runs before the other takes
	// its turn.
	fanoutTurn = 10
	// fanoutRoundTimeout bounds one round: every subscriber has the
	// version or the broadcast by then, or the bench fails.
	fanoutRoundTimeout = 30 * time.Second
)

// BroadcastResult is a fan-out measurement: latency from the start of a
// round until each subscriber has it, and deliveries per CPU-second of the
// whole process.
type BroadcastResult struct {
	Latency      Percentiles
	PerCPUSecond float64
}

// DeliveryResult is what our side of the fan-out measured.
type DeliveryResult struct {
	BroadcastResult
	// MakeVersion is the time to make each version: the commit with its
	// fsync, capture, checksum, encoding and change-log append, until
	// Exec returns (the offer to every subscriber included).
	MakeVersion Percentiles
	// Frame is the Versions message of the last version, as the server
	// wrote it to each subscriber: what the bare broadcast writes.
	Frame []byte
}

// fanoutSide is one side of the comparison, set up: round sends one
// version (ours) or message (bare) and waits until every subscriber has read
// it, recording the latencies; reset forgets what rounds recorded.
type fanoutSide interface {
	round(ctx context.Context) error
	reset()
	close()
}

// measureFanout warms each side up, then runs samples rounds of each, in
// turns of fanoutTurn rounds, and returns the CPU time of the process
// during each side's rounds. The side that goes first alternates from turn
// to turn.
func measureFanout(ctx context.Context, samples int, sides ...fanoutSide) ([]time.Duration, error) {
	for _, s := range sides {
		for range fanoutWarmup {
			if err := s.round(ctx); err != nil {
				return nil, err
			}
		}
		s.reset()
	}
	runtime.GC()
	cpu := make([]time.Duration, len(sides))
	for turn, done := 0, 0; done < samples; turn, done = turn+1, done+fanoutTurn {
		k := min(fanoutTurn, samples-done)
		for j := range sides {
			i := (j + turn) % len(sides)
			c0 := cpuTime()
			for range k {
				if err := sides[i].round(ctx); err != nil {
					return nil, err
				}
			}
			cpu[i] += cpuTime() - c0
		}
	}
	return cpu, nil
}

// RunDelivery measures the server's fan-out alone: cfg.Replicas protocol
// clients, each on a QUIC connection of its own, subscribe and only read;
// the time is from the server's commit of a one-row update until every
// client has read it. With no rebase on the receiving side, this is what
// the server and QUIC cost, which replicas on other machines would see.
func RunDelivery(ctx context.Context, cfg NetworkConfig) (DeliveryResult, error) {
	d, err := openDelivery(ctx, cfg)
	if err != nil {
		return DeliveryResult{}, err
	}
	defer d.close()
	cpu, err := measureFanout(ctx, cfg.Samples, d)
	if err != nil {
		return DeliveryResult{}, err
	}
	return d.result(cpu[0])
}

// RunBareBroadcast is the floor of the fan-out alone: n QUIC connections
// with the server's TLS and QUIC settings, and a loop that writes frame to
// each of them, as our server does with an encoded version (see
// openBare).
func RunBareBroadcast(ctx context.Context, dir string, n, samples int, frame []byte) (BroadcastResult, error) {
	b, err := openBare(ctx, dir, n, frame)
	if err != nil {
		return BroadcastResult{}, err
	}
	defer b.close()
	cpu, err := measureFanout(ctx, samples, b)
	if err != nil {
		return BroadcastResult{}, err
	}
	return b.result(cpu[0]), nil
}

// FanoutResult is one side-by-side run of the fan-out (RunFanout).
type FanoutResult struct {
	Ours DeliveryResult
	// Bare is the bare quic-go broadcast of the same frame: the floor of
	// the transport, with nothing durable in it.
	Bare BroadcastResult
	// BareDurable is the same broadcast after one page written and
	// fdatasync'd per round: the floor of a fan-out whose versions are
	// durable before they leave, as ours are (synchronous=FULL).
	BareDurable BroadcastResult
}

// RunFanout measures our fan-out to n subscribers, the bare broadcast of its
// frame to n connections, and that broadcast after an fdatasync per round,
// side by side, samples rounds each, taking turns (measureFanout).
func RunFanout(ctx context.Context, dir string, n, samples int) (FanoutResult, error) {
	d, err := openDelivery(ctx, NetworkConfig{Dir: dir, Replicas: n})
	if err != nil {
		return FanoutResult{}, err
	}
	defer d.close()
	// Bare writes the frame ours writes (the one-row update, 25 B since
	// protocol 4): the same bytes, read the same way.
	if err := d.round(ctx); err != nil {
		return FanoutResult{}, err
	}
	frame, err := d.frame()
	if err != nil {
		return FanoutResult{}, err
	}
	b, err := openBare(ctx, filepath.Join(dir, "bare"), n, frame)
	if err != nil {
		return FanoutResult{}, err
	}
	defer b.close()
	bd, err := openBare(ctx, filepath.Join(dir, "bare-durable"), n, frame)
	if err != nil {
		return FanoutResult{}, err
	}
	defer bd.close()
	if err := bd.makeDurable(filepath.Join(dir, "bare-durable", "log")); err != nil {
		return FanoutResult{}, err
	}
	cpu, err := measureFanout(ctx, samples, d, b, bd)
	if err != nil {
		return FanoutResult{}, err
	}
	ours, err := d.result(cpu[0])
	return FanoutResult{Ours: ours, Bare: b.result(cpu[1]), BareDurable: bd.result(cpu[2])}, err
}

// subscribers is what both sides share: the QUIC connections and the
// reader goroutines, which stop once done is closed or their stream ends.
type subscribers struct {
	conns   []*quic.Conn
	done    chan struct{}
	readers sync.WaitGroup
}

// stop closes the connections and waits for the readers.
func (s *subscribers) stop() {
	close(s.done)
	for _, c := range s.conns {
		c.CloseWithError(0, "")
	}
	s.readers.Wait()
}

// receipt is a subscriber's reading of a version, stamped when it read it.
type receipt struct {
	version uint64
	at      time.Time
}

// delivery is our side: a bench server with database "bench" and n
// protocol subscribers, whose readers stamp each version they read and send
// it on one channel, as bare's readers do.
type delivery struct {
	subscribers
	srv  *server.Server
	auth *server.Authority
	n    int
	got  chan receipt
	lat  []time.Duration
	made []time.Duration
}

func openDelivery(ctx context.Context, cfg NetworkConfig) (*delivery, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	srv, addr, err := startBenchServer(ctx, filepath.Join(cfg.Dir, "server"), cfg.Logger, cfg.Replicas)
	if err != nil {
		return nil, err
	}
	d := &delivery{srv: srv, auth: srv.Authority("bench"), n: cfg.Replicas, got: make(chan receipt, cfg.Replicas*4)}
	d.done = make(chan struct{})
	for i := range cfg.Replicas {
		pc, err := dialProtocolClient(ctx, srv, addr, fmt.Sprintf("sub-%d", i))
		if err != nil {
			d.close()
			return nil, fmt.Errorf("delivery bench: %w", err)
		}
		d.conns = append(d.conns, pc.conn)
		d.readers.Add(1)
		go func() {
			defer d.readers.Done()
			for {
				m, err := pc.r.Read()
				if err != nil {
					return
				}
				if vs, ok := m.(*protocol.Versions); ok {
					for _, v := range vs.Versions {
						select {
						case d.got <- receipt{v.Version, time.Now()}:
						case <-d.done:
							return
						}
					}
				}
			}
		}()
	}
	return d, nil
}

// round makes one version and waits until every subscriber has read it:
// each reads each version once, and a round waits for all of them before
// the next, so n receipts of this version.
func (d *delivery) round(ctx context.Context) error {
	start := time.Now()
	ps, err := d.auth.Exec(ctx, func(tx mutators.Tx) error {
		_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES ('Food', 1) ON CONFLICT(name) DO UPDATE SET count = count + 1`)
		return err
	})
	d.made = append(d.made, time.Since(start))
	if err != nil {
		return err
	}
	timeout := time.NewTimer(fanoutRoundTimeout)
	defer timeout.Stop()
	for range d.n {
		select {
		case r := <-d.got:
			if r.version != ps.Version {
				return fmt.Errorf("delivery bench: a subscriber read version %d while %d was due", r.version, ps.Version)
			}
			d.lat = append(d.lat, r.at.Sub(start))
		case <-timeout.C:
			return fmt.Errorf("delivery bench: a subscriber did not get version %d", ps.Version)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (d *delivery) reset() { d.lat, d.made = d.lat[:0], d.made[:0] }

// frame is the Versions frame of the newest version, as the server wrote
// it to each subscriber.
func (d *delivery) frame() ([]byte, error) {
	rec, err := d.srv.EncodedVersion("bench", d.auth.Version())
	if err != nil {
		return nil, err
	}
	return protocol.AppendVersionsFrame(nil, rec), nil
}

func (d *delivery) result(cpu time.Duration) (DeliveryResult, error) {
	frame, err := d.frame()
	if err != nil {
		return DeliveryResult{}, err
	}
	return DeliveryResult{
		BroadcastResult: BroadcastResult{Latency: percentiles(d.lat), PerCPUSecond: float64(len(d.lat)) / cpu.Seconds()},
		MakeVersion:     percentiles(d.made),
		Frame:           frame,
	}, nil
}

func (d *delivery) close() {
	d.stop()
	d.srv.Close()
}

// bareBroadcast is the floor: n QUIC connections with the server's TLS and
// QUIC settings, and a loop that writes the same frame to each of them, as
// our server does with an encoded version. frame is our server's Versions
// message for the version measured (DeliveryResult.Frame: 25 bytes for a
// one-row update), and the subscribers read it with the protocol reader,
// as ours do: the two sides differ only on the server side, which is what
// their CPU ratio is to compare. The time is from the start of the loop
// until each subscriber has read it.
type bareBroadcast struct {
	subscribers
	srv   *bareServer
	frame []byte
	outs  []*quic.Stream
	got   chan time.Time
	lat   []time.Duration
	// log, if set (makeDurable), takes one page and an fdatasync at the
	// start of every round, written over a file of durableLogPages pages
	// in turn as a WAL is overwritten in place.
	log    *os.File
	page   []byte
	rounds int
}

// durableLogPages is the length of a durable bare broadcast's log, in pages.
const durableLogPages = 64

// makeDurable gives b a log at path, presized and synced, so that each of
// its rounds starts with a page written over it and an fdatasync.
func (b *bareBroadcast) makeDurable(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("bare broadcast: %w", err)
	}
	b.page = make([]byte, 4096)
	if _, err := f.WriteAt(make([]byte, durableLogPages*len(b.page)), 0); err != nil {
		f.Close()
		return fmt.Errorf("bare broadcast: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("bare broadcast: %w", err)
	}
	b.log = f
	return nil
}

func openBare(ctx context.Context, dir string, n int, frame []byte) (*bareBroadcast, error) {
	if m, err := protocol.Decode(frameBody(frame), protocol.DefaultLimits); err != nil {
		return nil, fmt.Errorf("bare broadcast: the frame: %w", err)
	} else if _, ok := m.(*protocol.Versions); !ok {
		return nil, fmt.Errorf("bare broadcast: the frame is a %T, not Versions", m)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("bare broadcast: %w", err)
	}
	srv, err := listenBare(dir)
	if err != nil {
		return nil, err
	}
	b := &bareBroadcast{srv: srv, frame: frame, got: make(chan time.Time, n*4)}
	b.done = make(chan struct{})
	conf, err := protocol.ClientTLS(srv.fingerprint, "", "")
	if err != nil {
		b.close()
		return nil, err
	}
	for range n {
		c, s, err := srv.dialBare(ctx, conf)
		if err != nil {
			b.close()
			return nil, fmt.Errorf("bare broadcast: dial: %w", err)
		}
		b.conns = append(b.conns, c)
		sc, ss, err := srv.acceptBare(ctx)
		if err != nil {
			b.close()
			return nil, fmt.Errorf("bare broadcast: accept: %w", err)
		}
		b.conns = append(b.conns, sc)
		b.outs = append(b.outs, ss)
		b.readers.Add(1)
		go func() {
			defer b.readers.Done()
			r := protocol.NewReader(s, protocol.DefaultLimits)
			for {
				m, err := r.Read()
				if err != nil {
					return
				}
				if vs, ok := m.(*protocol.Versions); ok {
					for range vs.Versions {
						select {
						case b.got <- time.Now():
						case <-b.done:
							return
						}
					}
				}
			}
		}()
	}
	return b, nil
}

func (b *bareBroadcast) round(ctx context.Context) error {
	start := time.Now()
	if b.log != nil {
		b.rounds++
		b.page[0] = byte(b.rounds)
		if _, err := b.log.WriteAt(b.page, int64(b.rounds%durableLogPages)*int64(len(b.page))); err != nil {
			return fmt.Errorf("bare broadcast: %w", err)
		}
		if err := unix.Fdatasync(int(b.log.Fd())); err != nil {
			return fmt.Errorf("bare broadcast: %w", err)
		}
	}
	for _, s := range b.outs {
		if _, err := s.Write(b.frame); err != nil {
			return fmt.Errorf("bare broadcast: write: %w", err)
		}
	}
	timeout := time.NewTimer(fanoutRoundTimeout)
	defer timeout.Stop()
	for range b.outs {
		select {
		case at := <-b.got:
			b.lat = append(b.lat, at.Sub(start))
		case <-timeout.C:
			return errors.New("bare broadcast: a subscriber did not get the message")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (b *bareBroadcast) reset() { b.lat = b.lat[:0] }

func (b *bareBroadcast) result(cpu time.Duration) BroadcastResult {
	return BroadcastResult{Latency: percentiles(b.lat), PerCPUSecond: float64(len(b.lat)) / cpu.Seconds()}
}

func (b *bareBroadcast) close() {
	b.stop()
	b.srv.close()
	if b.log != nil {
		b.log.Close()
	}
}
