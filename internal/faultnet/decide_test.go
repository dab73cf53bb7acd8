package faultnet

import (
	"errors"
	"math"
	"testing"
	"time"

	"pgregory.net/rapid"
)

func TestDecideZeroProfileForwardsAtOnce(t *testing.T) {
	for i := uint64(0); i < 1000; i++ {
		v := Decide(7, Profile{}, Packet{Dir: Up, Client: 1, Index: i})
		if v != (Verdict{Copies: 1}) {
			t.Fatalf("packet %d: %+v, want one copy at once", i, v)
		}
	}
}

func TestDecideIsPure(t *testing.T) {
	p := Profile{Loss: 0.3, Duplicate: 0.3, Reorder: 0.3, Delay: time.Millisecond, Jitter: 5 * time.Millisecond, ReorderDelay: 20 * time.Millisecond}
	for i := uint64(0); i < 1000; i++ {
		pkt := Packet{Dir: Down, Client: 3, Index: i, At: time.Duration(i) * time.Millisecond}
		if a, b := Decide(42, p, pkt), Decide(42, p, pkt); a != b {
			t.Fatalf("packet %d: %+v then %+v", i, a, b)
		}
	}
}

// TestDecideRates checks that loss, duplication and reordering happen at
// about their probabilities. The seed is fixed, so this is deterministic:
// the bounds (5 standard deviations) only say the generator is not biased.
func TestDecideRates(t *testing.T) {
	const n = 20000
	p := Profile{Loss: 0.2, Duplicate: 0.1, Reorder: 0.25, Jitter: 4 * time.Millisecond, ReorderDelay: time.Second}
	var lost, dup, reordered, copies int
	for i := uint64(0); i < n; i++ {
		v := Decide(1, p, Packet{Dir: Up, Client: 1, Index: i})
		switch v.Copies {
		case 0:
			lost++
		case 2:
			dup++
		}
		for c := 0; c < v.Copies; c++ {
			copies++
			d := v.Delays[c]
			if d >= time.Second {
				reordered++
				d -= time.Second
			}
			if d < 0 || d >= p.Jitter {
				t.Fatalf("packet %d copy %d: delay %v outside [0, %v) + reorder", i, c, v.Delays[c], p.Jitter)
			}
		}
	}
	near := func(name string, got, trials int, prob float64) {
		t.Helper()
		mean := float64(trials) * prob
		sd := math.Sqrt(float64(trials) * prob * (1 - prob))
		if math.Abs(float64(got)-mean) > 5*sd {
			t.Errorf("%s: %d of %d, want about %.0f", name, got, trials, mean)
		}
	}
	near("lost", lost, n, p.Loss)
	near("duplicated", dup, n-lost, p.Duplicate)
	near("reordered", reordered, copies, p.Reorder)
}

// TestDecideStreamsIndependent checks that directions, clients and seeds
// draw different faults: a stream keyed on the index alone would lose the
// same packets of every client.
func TestDecideStreamsIndependent(t *testing.T) {
	p := Profile{Loss: 0.5}
	pattern := func(seed uint64, d Direction, client int) (bits uint64) {
		for i := uint64(0); i < 64; i++ {
			if Decide(seed, p, Packet{Dir: d, Client: client, Index: i}).Copies == 0 {
				bits |= 1 << i
			}
		}
		return bits
	}
	base := pattern(1, Up, 1)
	for name, other := range map[string]uint64{
		"other direction": pattern(1, Down, 1),
		"other client":    pattern(1, Up, 2),
		"other seed":      pattern(2, Up, 1),
	} {
		if other == base {
			t.Errorf("%s loses the same packets: %064b", name, base)
		}
	}
}

func TestDecidePartitions(t *testing.T) {
	p := Profile{Partitions: []Partition{
		{From: time.Second, Until: 2 * time.Second, Dir: Up, Client: 2},
		{From: 5 * time.Second, Until: 6 * time.Second, Dir: Both},
	}}
	cases := []struct {
		pkt  Packet
		drop bool
	}{
		{Packet{Dir: Up, Client: 2, At: 999 * time.Millisecond}, false},
		{Packet{Dir: Up, Client: 2, At: time.Second}, true},
		{Packet{Dir: Up, Client: 2, At: 1999 * time.Millisecond}, true},
		{Packet{Dir: Up, Client: 2, At: 2 * time.Second}, false}, // healed
		{Packet{Dir: Down, Client: 2, At: 1500 * time.Millisecond}, false},
		{Packet{Dir: Up, Client: 1, At: 1500 * time.Millisecond}, false},
		{Packet{Dir: Up, Client: 1, At: 5 * time.Second}, true},
		{Packet{Dir: Down, Client: 9, At: 5500 * time.Millisecond}, true},
		{Packet{Dir: Down, Client: 9, At: 6 * time.Second}, false},
	}
	for _, c := range cases {
		v := Decide(3, p, c.pkt)
		if got := v.Copies == 0; got != c.drop || v.Partitioned != c.drop {
			t.Errorf("%+v: %+v, want dropped=%v by a partition", c.pkt, v, c.drop)
		}
	}
}

func TestProfileValidate(t *testing.T) {
	bad := []Profile{
		{Loss: -0.1},
		{Duplicate: 1.5},
		{Reorder: math.NaN()},
		{Delay: -time.Millisecond},
		{Delay: MaxDelay, Jitter: time.Millisecond},
		{Jitter: math.MaxInt64, ReorderDelay: math.MaxInt64}, // must not overflow into a pass
		{Partitions: []Partition{{Until: time.Second}}},
		{Partitions: []Partition{{Dir: 8, Until: time.Second}}},
		{Partitions: []Partition{{Dir: Up, From: 2, Until: 1}}},
		{Partitions: []Partition{{Dir: Up, Client: -1}}},
	}
	for _, p := range bad {
		if err := p.Validate(); !errors.Is(err, ErrProfile) {
			t.Errorf("%+v: %v, want ErrProfile", p, err)
		}
	}
	good := Profile{Loss: 1, Duplicate: 1, Reorder: 1, Delay: time.Second, Jitter: time.Second, ReorderDelay: time.Second,
		Partitions: []Partition{{Dir: Both, From: 0, Until: 0}}}
	if err := good.Validate(); err != nil {
		t.Errorf("%+v: %v", good, err)
	}
}

// TestDecideProperties: for any valid profile, verdicts are within bounds,
// a total loss drops everything, and a packet in a partition is dropped.
func TestDecideProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := Profile{
			Loss:         rapid.Float64Range(0, 1).Draw(t, "loss"),
			Duplicate:    rapid.Float64Range(0, 1).Draw(t, "dup"),
			Reorder:      rapid.Float64Range(0, 1).Draw(t, "reorder"),
			Delay:        time.Duration(rapid.Int64Range(0, int64(time.Second)).Draw(t, "delay")),
			Jitter:       time.Duration(rapid.Int64Range(0, int64(time.Second)).Draw(t, "jitter")),
			ReorderDelay: time.Duration(rapid.Int64Range(0, int64(time.Second)).Draw(t, "rdelay")),
		}
		part := Partition{
			From:   time.Duration(rapid.Int64Range(0, 1000).Draw(t, "from")),
			Dir:    Direction(rapid.IntRange(1, 3).Draw(t, "pdir")),
			Client: rapid.IntRange(0, 3).Draw(t, "pclient"),
		}
		part.Until = part.From + time.Duration(rapid.Int64Range(0, 1000).Draw(t, "len"))
		p.Partitions = []Partition{part}
		if err := p.Validate(); err != nil {
			t.Fatalf("valid profile refused: %v", err)
		}
		pkt := Packet{
			Dir:    Direction(rapid.IntRange(1, 2).Draw(t, "dir")),
			Client: rapid.IntRange(1, 3).Draw(t, "client"),
			Index:  rapid.Uint64().Draw(t, "index"),
			At:     time.Duration(rapid.Int64Range(0, 3000).Draw(t, "at")),
		}
		seed := rapid.Uint64().Draw(t, "seed")
		v := Decide(seed, p, pkt)
		checkVerdict(t, p, pkt, v)
		if p.Loss == 1 && v.Copies != 0 {
			t.Fatalf("loss 1 sent %+v", v)
		}
	})
}

type fataler interface{ Fatalf(string, ...any) }

func checkVerdict(t fataler, p Profile, pkt Packet, v Verdict) {
	if v.Copies < 0 || v.Copies > 2 {
		t.Fatalf("%d copies", v.Copies)
	}
	for i := 0; i < v.Copies; i++ {
		if v.Delays[i] < 0 || v.Delays[i] > MaxDelay {
			t.Fatalf("copy %d delayed %v", i, v.Delays[i])
		}
		if p.Validate() == nil && v.Delays[i] > p.Delay+p.Jitter+p.ReorderDelay {
			t.Fatalf("copy %d delayed %v, above the profile's %v", i, v.Delays[i], p.Delay+p.Jitter+p.ReorderDelay)
		}
	}
	for _, q := range p.Partitions {
		if q.covers(pkt) && (v.Copies != 0 || !v.Partitioned) {
			t.Fatalf("partition %+v let %+v through: %+v", q, pkt, v)
		}
	}
	if v.Partitioned && v.Copies != 0 {
		t.Fatalf("partitioned yet sent: %+v", v)
	}
}

// FuzzDecide: Decide never panics, on valid or invalid profiles, and its
// verdicts stay within bounds.
func FuzzDecide(f *testing.F) {
	f.Add(uint64(1), 0.1, 0.1, 0.1, int64(time.Millisecond), int64(time.Millisecond), int64(time.Millisecond), int64(0), int64(time.Second), uint8(3), 0, uint8(1), 1, uint64(0), int64(0))
	f.Add(uint64(0), -1.0, 2.0, math.NaN(), int64(-1), int64(math.MaxInt64), int64(math.MinInt64), int64(5), int64(1), uint8(200), -5, uint8(7), -1, uint64(math.MaxUint64), int64(-1))
	f.Fuzz(func(t *testing.T, seed uint64, loss, dup, reorder float64, delay, jitter, rdelay, from, until int64,
		pdir uint8, pclient int, dir uint8, client int, index uint64, at int64) {
		p := Profile{Loss: loss, Duplicate: dup, Reorder: reorder, Delay: time.Duration(delay), Jitter: time.Duration(jitter),
			ReorderDelay: time.Duration(rdelay),
			Partitions:   []Partition{{From: time.Duration(from), Until: time.Duration(until), Dir: Direction(pdir), Client: pclient}}}
		pkt := Packet{Dir: Direction(dir), Client: client, Index: index, At: time.Duration(at)}
		v := Decide(seed, p, pkt)
		checkVerdict(t, p, pkt, v)
	})
}
