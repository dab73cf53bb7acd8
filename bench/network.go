package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// NetworkConfig configures RunNetwork: the end-to-end measurements over
// QUIC on loopback, with a real server and real replicas in this process.
type NetworkConfig struct {
	Dir      string
	Replicas int // connected replicas, each with a QUIC connection of its own
	Samples  int // mutations timed to confirmation, and versions timed to every replica
	Logger   *slog.Logger
}

// NetworkResult is what RunNetwork measured.
type NetworkResult struct {
	Replicas int
	// Confirm is Mutate to confirmed (the handle's Wait returns: the
	// server ran it and the replica rebased on the version that holds it),
	// at one replica while the others are connected.
	Confirm Percentiles
	// Fanout is from the moment the server commits a version (a one-row
	// update) to the moment each replica has rebased on it, over every
	// replica and version.
	Fanout Percentiles
	// WireBytes is the median size of those versions on the wire: the
	// Versions message with one version, length prefix included.
	WireBytes int
	// WholeBytes is the same versions' pages sent whole, with the same
	// header: what a protocol without deltas sends.
	WholeBytes int
	// Versions is how many versions the fan-out measured.
	Versions int
}

// warmCommits is how many commits RunNetwork makes before replicas
// connect: enough to take the server's WAL past one checkpoint and restart.
const warmCommits = 1200

// Percentiles summarise latencies.
type Percentiles struct {
	P50, P99, Max time.Duration
	N             int
}

func percentiles(d []time.Duration) Percentiles {
	if len(d) == 0 {
		return Percentiles{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return Percentiles{P50: at(0.50), P99: at(0.99), Max: s[len(s)-1], N: len(s)}
}

// RunNetwork starts a server on loopback and cfg.Replicas replicas, then
// measures Mutate-to-confirmed at one replica and the fan-out of versions to
// all of them.
func RunNetwork(ctx context.Context, cfg NetworkConfig) (NetworkResult, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Replicas < 1 || cfg.Samples < 1 {
		return NetworkResult{}, errors.New("network bench: need at least one replica and one sample")
	}
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return NetworkResult{}, err
	}
	setup := func(ctx context.Context, tx mutators.Tx) error {
		if _, err := tx.Exec(mutators.DemoSchema); err != nil {
			return err
		}
		// Enough rows over enough pages that a one-row update touches one
		// leaf among many, as in a real app.
		_, err := tx.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
			INSERT INTO Categories(name, count) SELECT 'cat-' || i, i FROM n`)
		return err
	}
	// All replicas share one address here; the per-address limit is for
	// strangers.
	srv, err := server.Open(ctx, server.Config{Dir: filepath.Join(cfg.Dir, "server"), Mutators: reg, Setup: setup, Logger: cfg.Logger, MaxConnsPerAddr: cfg.Replicas + 8})
	if err != nil {
		return NetworkResult{}, err
	}
	defer srv.Close()
	if err := srv.AddDatabase(ctx, "bench", "bench-secret"); err != nil {
		return NetworkResult{}, err
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		return NetworkResult{}, err
	}
	auth := srv.Authority("bench")
	// A server that has run a while writes over a WAL of its full length;
	// a fresh one appends to a WAL truncated at open, and a growing file's
	// fdatasync commits the file system's journal (on ext4 here: COMMIT
	// 0.55-0.72 ms appending against 0.34-0.50 ms overwriting, Mutate to
	// confirmed 2.0-2.5 ms against 1.6-2.1 ms with 10 replicas, measured
	// side by side). Run it past its first WAL generation (checkpoints every
	// 1,000 frames; a commit here writes two or three) before timing, so
	// that the section measures the steady state, not the first seconds.
	for i := 0; i < warmCommits; i++ {
		if _, err := auth.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`UPDATE Categories SET count = count + 1 WHERE name = 'cat-1500'`)
			return err
		}); err != nil {
			return NetworkResult{}, fmt.Errorf("network bench: warm up: %w", err)
		}
	}

	rigs := make([]*rig, cfg.Replicas)
	defer func() {
		for _, g := range rigs {
			if g != nil {
				g.r.Close()
			}
		}
	}()
	for i := range rigs {
		r, err := replica.Open(ctx, filepath.Join(cfg.Dir, fmt.Sprintf("r%d.db", i)), replica.Options{
			Mutators: reg, Logger: cfg.Logger,
			Remote: &replica.Remote{Addr: addr, Database: "bench", Credential: "bench-secret", Fingerprint: srv.Fingerprint()},
		})
		if err != nil {
			return NetworkResult{}, err
		}
		g := &rig{r: r, rebased: make(chan uint64, 4096)}
		r.OnChange(func(c replica.Change) {
			if c.Rebased {
				select {
				case g.rebased <- c.Version:
				default:
				}
			}
		})
		rigs[i] = g
	}
	for _, g := range rigs {
		sctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := g.r.Sync(sctx)
		cancel()
		if err != nil {
			return NetworkResult{}, fmt.Errorf("network bench: replica sync: %w", err)
		}
	}
	res := NetworkResult{Replicas: cfg.Replicas}

	// Mutate to confirmed at replica 0. Each sample starts once every
	// replica has rebased on the version the last one made: a latency,
	// measured from a quiet start. Back to back, the other replicas'
	// rebases of one sample's version (nine of them, about 0.15 ms of CPU
	// each, on the two cores this process shares with the server) ran into
	// the next sample and doubled the hop from Mutate to the server (from
	// 0.06 ms with one replica to 0.2 ms with ten, timed inside one run).
	var confirm []time.Duration
	for _, g := range rigs {
		drain(g.rebased)
	}
	for i := 0; i < cfg.Samples; i++ {
		start := time.Now()
		h, err := rigs[0].r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("cat-7", 1))
		if err != nil {
			return NetworkResult{}, err
		}
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = h.Wait(wctx)
		cancel()
		if err != nil {
			return NetworkResult{}, fmt.Errorf("network bench: wait for confirmation: %w", err)
		}
		confirm = append(confirm, time.Since(start))
		if err := allRebased(ctx, rigs, auth.Version()); err != nil {
			return NetworkResult{}, err
		}
	}
	res.Confirm = percentiles(confirm)

	// Fan-out: the server commits a one-row update; every replica rebases.
	for _, g := range rigs {
		drain(g.rebased)
	}
	var fanout []time.Duration
	var sizes, wholes []int
	for i := 0; i < cfg.Samples; i++ {
		start := time.Now()
		ps, err := auth.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`UPDATE Categories SET count = count + 1 WHERE name = 'cat-1000'`)
			return err
		})
		if err != nil {
			return NetworkResult{}, err
		}
		var wg sync.WaitGroup
		lat := make([]time.Duration, len(rigs))
		errs := make([]error, len(rigs))
		for j, g := range rigs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				timeout := time.After(30 * time.Second)
				for {
					select {
					case v := <-g.rebased:
						if v >= ps.Version {
							lat[j] = time.Since(start)
							return
						}
					case <-timeout:
						errs[j] = fmt.Errorf("network bench: replica %d did not reach version %d", j, ps.Version)
						return
					}
				}
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return NetworkResult{}, err
		}
		fanout = append(fanout, lat...)
		rec, err := srv.EncodedVersion("bench", ps.Version)
		if err != nil {
			return NetworkResult{}, err
		}
		sizes = append(sizes, len(protocol.AppendVersionsFrame(nil, rec)))
		raw, err := protocol.DecodeEncodedVersion(rec, protocol.DefaultLimits)
		if err != nil {
			return NetworkResult{}, err
		}
		whole := raw
		whole.Codec, whole.BaseDBSize, whole.Payload = protocol.CodecRaw, 0, make([]byte, len(raw.Pgnos)*int(raw.PageSize))
		wholes = append(wholes, len(protocol.AppendVersionsFrame(nil, whole.AppendBinary(nil))))
	}
	res.Fanout = percentiles(fanout)
	res.Versions = cfg.Samples
	slices.Sort(sizes)
	slices.Sort(wholes)
	res.WireBytes, res.WholeBytes = sizes[len(sizes)/2], wholes[len(wholes)/2]
	for _, g := range rigs {
		if g.r.Status().Checksum != auth.Checksum() {
			return NetworkResult{}, errors.New("network bench: a replica's checksum differs from the server's at the end")
		}
	}
	return res, nil
}

// rig is one replica of the network bench, which reports each rebase's
// version on its channel.
type rig struct {
	r       *replica.Replica
	rebased chan uint64
}

// allRebased waits until every rig has reported a rebase to version v or
// later.
func allRebased(ctx context.Context, rigs []*rig, v uint64) error {
	timeout := time.NewTimer(30 * time.Second)
	defer timeout.Stop()
	for j, g := range rigs {
		for g.r.Status().Version < v {
			select {
			case <-g.rebased:
			case <-timeout.C:
				return fmt.Errorf("network bench: replica %d did not reach version %d", j, v)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	return nil
}

func drain(c chan uint64) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

// String is the result as report lines.
func (r NetworkResult) String() string {
	return fmt.Sprintf("network, %d replicas: Mutate to confirmed p50 %s p99 %s; fan-out of a version to all p50 %s p99 %s (max %s); %d bytes on the wire per one-row update",
		r.Replicas, ms(r.Confirm.P50), ms(r.Confirm.P99), ms(r.Fanout.P50), ms(r.Fanout.P99), ms(r.Fanout.Max), r.WireBytes)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

// NetworkSection is the end-to-end section of the suite: for each count of
// replicas, Mutate to confirmed and the fan-out of a version, as p50 against
// p99 (over Config.Runs runs of samples each), and the bytes a one-row
// update takes on the wire against sending its pages whole.
func NetworkSection(replicas []int, samples int) Section {
	return Section{Name: "network", Run: func(ctx context.Context, env *Env) ([]Result, error) {
		var out []Result
		msf := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		for _, n := range replicas {
			var c50, c99, f50, f99, floor, wire, whole []float64
			for run := 0; run < max(1, env.Config.Runs); run++ {
				env.Progress("network: %d replicas, run %d", n, run+1)
				res, err := RunNetwork(ctx, NetworkConfig{Dir: filepath.Join(env.Dir, fmt.Sprintf("n%d-r%d", n, run)), Replicas: n, Samples: samples})
				if err != nil {
					return nil, err
				}
				fl, err := RunConfirmFloor(ctx, filepath.Join(env.Dir, fmt.Sprintf("n%d-r%d", n, run)), samples)
				if err != nil {
					return nil, err
				}
				c50, c99 = append(c50, msf(res.Confirm.P50)), append(c99, msf(res.Confirm.P99))
				f50, f99 = append(f50, msf(res.Fanout.P50)), append(f99, msf(res.Fanout.P99))
				floor = append(floor, msf(fl.Total()))
				wire, whole = append(wire, float64(res.WireBytes)), append(whole, float64(res.WholeBytes))
			}
			params := map[string]int{"clients": n}
			out = append(out,
				spreadResult("network", fmt.Sprintf("Mutate to confirmed, %d replicas connected", n), params, "ms", c50, c99,
					"over QUIC on loopback: the server ran it and the replica rebased on the version holding it"),
				pairResult("network", fmt.Sprintf("Mutate to confirmed p50 against its floor, %d replicas", n), params, "ms", "ours", c50, "floor", floor,
					"the floor: one fsync of a page plus one loopback QUIC round trip of 100 B, measured in the same run"),
				spreadResult("network", fmt.Sprintf("fan-out of a version to %d replicas", n), params, "ms", f50, f99,
					"from the server's commit until every replica has rebased on it, all in this process on the same cores"),
				pairResult("network", fmt.Sprintf("one-row update on the wire, %d replicas", n), params, "B", "ours", wire, "whole pages", whole,
					"the bytes that changed against the replica's old pages (or zstd with them as dictionary), against the same pages sent whole (SQLSync, libSQL)"),
			)
		}
		return out, nil
	}}
}

// FanoutSection is our server's fan-out of a one-row update to protocol
// subscribers (the server and QUIC alone) against a bare quic-go broadcast of
// a message of the same size over the same TLS and QUIC settings, at each
// count of subscribers, and against that broadcast after an fdatasync per
// round (the floor of a fan-out of durable versions), the three taking turns
// within each run (RunFanout): latency, and deliveries per CPU-second of the
// process (server and subscribers). Each run makes
// deliveries/n versions (at least fanoutMinSamples), so that every count
// measures about the same number of deliveries: 50 versions to 100
// subscribers were 5,000 deliveries in 0.3 s of CPU, where one stall of the
// machine moved the ratio by a tenth.
func FanoutSection(subscribers []int, deliveries int) Section {
	return Section{Name: "fanout", Run: func(ctx context.Context, env *Env) ([]Result, error) {
		var out []Result
		msf := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		for _, n := range subscribers {
			var o50, o99, b50, b99, ocpu, bcpu, dcpu, make50, make99 []float64
			samples := max(fanoutMinSamples, deliveries/n)
			for run := 0; run < max(1, env.Config.Runs); run++ {
				env.Progress("fanout: %d subscribers, run %d", n, run+1)
				dir := filepath.Join(env.Dir, fmt.Sprintf("fan%d-r%d", n, run))
				fan, err := RunFanout(ctx, dir, n, samples)
				if err != nil {
					return nil, err
				}
				ours, bare := fan.Ours, fan.Bare
				dcpu = append(dcpu, fan.BareDurable.PerCPUSecond)
				o50, o99 = append(o50, msf(ours.Latency.P50)), append(o99, msf(ours.Latency.P99))
				b50, b99 = append(b50, msf(bare.Latency.P50)), append(b99, msf(bare.Latency.P99))
				ocpu, bcpu = append(ocpu, ours.PerCPUSecond), append(bcpu, bare.PerCPUSecond)
				make50, make99 = append(make50, msf(ours.MakeVersion.P50)), append(make99, msf(ours.MakeVersion.P99))
			}
			params := map[string]int{"clients": n}
			out = append(out,
				pairResult("fanout", fmt.Sprintf("fan-out p50, %d subscribers", n), params, "ms", "ours", o50, "bare quic-go", b50,
					"from the server's commit (ours; making the version included) or the first write (bare) until each subscriber has it"),
				pairResult("fanout", fmt.Sprintf("fan-out p99, %d subscribers", n), params, "ms", "ours", o99, "bare quic-go", b99, ""),
				pairResult("fanout", fmt.Sprintf("deliveries per CPU-second, %d subscribers", n), params, "1/s", "ours", ocpu, "bare quic-go", bcpu,
					"server and subscribers share the process; higher is better"),
				pairResult("fanout", fmt.Sprintf("deliveries per CPU-second against a durable broadcast, %d subscribers", n), params, "1/s", "ours", ocpu, "bare quic-go + fdatasync", dcpu,
					"bare's broadcast after a page written and fdatasync'd per round, as each of our versions is durable before it leaves"),
				spreadResult("fanout", fmt.Sprintf("making the version, %d subscribers", n), params, "ms", make50, make99,
					"commit with fsync, capture, checksum, encoding, change-log append and the offer to every queue: the part of our p50 bare has not"),
			)
		}
		return out, nil
	}}
}

// fanoutMinSamples is the fewest versions a fan-out run makes.
const fanoutMinSamples = 20

// spreadResult is a line of one quantity's p50 and p99: no ratio, there is
// no other engine on the network side to compare with.
func spreadResult(section, label string, params map[string]int, unit string, p50, p99 []float64, note string) Result {
	return Result{Section: section, Label: label, Params: params, Unit: unit,
		A: Side{"p50", summarize(p50)}, B: Side{"p99", summarize(p99)}, Note: note}
}

// protocolClient is a bare protocol session, standing in for a replica
// where the bench measures the server alone.
type protocolClient struct {
	conn   *quic.Conn
	stream *quic.Stream
	r      *protocol.Reader
}

// dialProtocolClient opens a QUIC connection of its own to the bench
// server, says Hello to database "bench" as clientID at the server's
// current version, and reads the Welcome.
func dialProtocolClient(ctx context.Context, srv *server.Server, addr, clientID string) (*protocolClient, error) {
	tlsConf, err := protocol.ClientTLS(srv.Fingerprint(), "", "")
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(dctx, addr, tlsConf, protocol.QUICConfig())
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	stream, err := conn.OpenStreamSync(dctx)
	if err != nil {
		conn.CloseWithError(0, "")
		return nil, err
	}
	auth := srv.Authority("bench")
	hello := &protocol.Hello{Protocol: protocol.Version, Database: "bench", ClientID: clientID, Credential: "bench-secret", Version: auth.Version(), Checksum: auth.Checksum()}
	if err := protocol.WriteMessage(stream, hello); err != nil {
		conn.CloseWithError(0, "")
		return nil, err
	}
	r := protocol.NewReader(stream, protocol.DefaultLimits)
	m, err := r.Read()
	if err == nil {
		if _, ok := m.(*protocol.Welcome); !ok {
			err = fmt.Errorf("got %T, want a welcome", m)
		}
	}
	if err != nil {
		conn.CloseWithError(0, "")
		return nil, err
	}
	return &protocolClient{conn: conn, stream: stream, r: r}, nil
}

// startBenchServer starts a server on a loopback port with the demo
// mutators and one database, "bench", for protocol clients.
func startBenchServer(ctx context.Context, dir string, log *slog.Logger, clients int) (*server.Server, string, error) {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return nil, "", err
	}
	srv, err := server.Open(ctx, server.Config{Dir: dir, Mutators: reg, Logger: log, MaxConnsPerAddr: clients + 8,
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err }})
	if err != nil {
		return nil, "", err
	}
	if err := srv.AddDatabase(ctx, "bench", "bench-secret"); err != nil {
		srv.Close()
		return nil, "", err
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		srv.Close()
		return nil, "", err
	}
	return srv, addr, nil
}
