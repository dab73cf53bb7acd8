// Package faultnet is a userspace UDP relay for tests: it sits between QUIC
// clients and a server on 127.0.0.1 and loses, duplicates, reorders and
// delays their packets, and partitions them, as a seeded fault profile says.
//
// What happens to each packet is decided by Decide, a pure function of the
// seed, the profile, the packet's direction, client and index and the time
// since the relay started: the same run of packets meets the same faults, so
// a failing seed can be replayed, and the decision has unit tests of its own.
// The relay's socket loops only read, ask Decide and deliver.
package faultnet

import (
	"errors"
	"fmt"
	"time"
)

// Direction is the way a packet travels through the relay.
type Direction uint8

const (
	// Up is from a client to the server.
	Up Direction = 1 << iota
	// Down is from the server to a client.
	Down
	// Both is Up and Down, for partitions.
	Both = Up | Down
)

func (d Direction) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	case Both:
		return "both"
	}
	return fmt.Sprintf("Direction(%d)", uint8(d))
}

// Limits of a profile and of the relay.
const (
	// MaxDelay bounds Delay+Jitter+ReorderDelay: a packet held longer is
	// no longer a delay but a loss, and a misread profile (hours for
	// milliseconds) would otherwise hold every packet in memory.
	MaxDelay = 10 * time.Second
	// MaxQueued bounds the packets waiting out their delay; beyond it the
	// relay drops, as a router's full queue does.
	MaxQueued = 16384
	// MaxClients bounds the client addresses the relay keeps an upstream
	// socket for.
	MaxClients = 1024
	// maxPacket is the largest UDP payload the relay reads.
	maxPacket = 64 << 10
)

// Errors of the relay.
var (
	// ErrProfile is wrapped by every error of Profile.Validate.
	ErrProfile = errors.New("faultnet: invalid profile")
	// ErrClosed is returned by a closed relay.
	ErrClosed = errors.New("faultnet: relay closed")
)

// Partition drops every packet of one direction (or both) of one client (or
// all) for a period of time.
type Partition struct {
	// From and Until bound the period, as times since the relay started
	// (Relay.Elapsed): packets at From <= t < Until are dropped.
	From, Until time.Duration
	// Dir is the direction cut: Up, Down or Both.
	Dir Direction
	// Client is the client cut: 0 for every client, n for the nth client
	// address the relay has seen (1-based, in order of first packet).
	Client int
}

// covers says whether the partition drops pkt.
func (p Partition) covers(pkt Packet) bool {
	return pkt.At >= p.From && pkt.At < p.Until && p.Dir&pkt.Dir != 0 &&
		(p.Client == 0 || p.Client == pkt.Client)
}

// Profile is what the relay does to packets. The zero Profile forwards every
// packet at once, once.
type Profile struct {
	// Loss is the probability that a packet is dropped.
	Loss float64
	// Duplicate is the probability that a packet not dropped is sent
	// twice (each copy with a delay of its own).
	Duplicate float64
	// Reorder is the probability that a copy is held back ReorderDelay
	// more than its delay, so that later packets overtake it.
	Reorder float64
	// Delay and Jitter: each copy waits Delay plus a uniform part of
	// Jitter. Jitter alone reorders packets closer than it.
	Delay, Jitter time.Duration
	// ReorderDelay is the extra wait of a reordered copy.
	ReorderDelay time.Duration
	// Partitions drop everything in their periods.
	Partitions []Partition
}

// Validate says whether the profile makes sense: probabilities in [0, 1],
// durations not negative and their sum within MaxDelay, partitions with a
// direction and a period.
func (p Profile) Validate() error {
	for _, f := range []struct {
		name string
		v    float64
	}{{"Loss", p.Loss}, {"Duplicate", p.Duplicate}, {"Reorder", p.Reorder}} {
		if !(f.v >= 0 && f.v <= 1) { // also refuses NaN
			return fmt.Errorf("%w: %s %v is not a probability", ErrProfile, f.name, f.v)
		}
	}
	if p.Delay < 0 || p.Jitter < 0 || p.ReorderDelay < 0 {
		return fmt.Errorf("%w: negative delay", ErrProfile)
	}
	if p.Delay > MaxDelay || p.Jitter > MaxDelay || p.ReorderDelay > MaxDelay ||
		p.Delay+p.Jitter+p.ReorderDelay > MaxDelay {
		return fmt.Errorf("%w: Delay+Jitter+ReorderDelay above %v", ErrProfile, MaxDelay)
	}
	for i, q := range p.Partitions {
		switch {
		case q.Dir == 0 || q.Dir&^Both != 0:
			return fmt.Errorf("%w: partition %d: direction %v", ErrProfile, i, q.Dir)
		case q.Until < q.From:
			return fmt.Errorf("%w: partition %d ends before it starts", ErrProfile, i)
		case q.Client < 0:
			return fmt.Errorf("%w: partition %d: client %d", ErrProfile, i, q.Client)
		}
	}
	return nil
}

// Packet is what Decide knows of a packet.
type Packet struct {
	// Dir is the way it travels.
	Dir Direction
	// Client is the 1-based number of its client address.
	Client int
	// Index counts the packets of this client and direction, from 0.
	Index uint64
	// At is the time since the relay started.
	At time.Duration
}

// Verdict is what to do with a packet: send Copies copies (0: drop it), the
// ith after Delays[i].
type Verdict struct {
	Copies int
	Delays [2]time.Duration
	// Partitioned says the packet was dropped by a partition (not by loss).
	Partitioned bool
}

// Decide returns what to do with pkt under profile p and seed. It is pure:
// the same arguments give the same verdict. Its random draws come from a
// stream keyed by (seed, direction, client, index), not from a shared
// generator, so that the verdict of one packet does not depend on how the
// relay's goroutines interleaved the others. p must be valid
// (Profile.Validate); out-of-range values are clamped, never a panic.
func Decide(seed uint64, p Profile, pkt Packet) Verdict {
	for _, q := range p.Partitions {
		if q.covers(pkt) {
			return Verdict{Partitioned: true}
		}
	}
	rng := stream{state: seed ^ mix(uint64(pkt.Dir)<<56^uint64(uint32(pkt.Client))<<24^0x9e3779b97f4a7c15) ^ mix(pkt.Index+0x632be59bd9b4e019)}
	if rng.float() < p.Loss {
		return Verdict{}
	}
	v := Verdict{Copies: 1}
	if rng.float() < p.Duplicate {
		v.Copies = 2
	}
	delay, jitter, reorder := clamp(p.Delay), clamp(p.Jitter), clamp(p.ReorderDelay)
	for i := 0; i < v.Copies; i++ {
		d := delay
		if jitter > 0 {
			d += time.Duration(rng.next() % uint64(jitter))
		}
		if rng.float() < p.Reorder {
			d += reorder
		}
		v.Delays[i] = min(d, MaxDelay) // at most 3*MaxDelay before: no overflow
	}
	return v
}

// clamp bounds a delay to [0, MaxDelay].
func clamp(d time.Duration) time.Duration { return min(max(d, 0), MaxDelay) }

// stream is SplitMix64: a tiny generator good enough for fault decisions,
// seeded per packet.
type stream struct{ state uint64 }

func (s *stream) next() uint64 {
	s.state += 0x9e3779b97f4a7c15
	return mix(s.state)
}

// float returns a uniform float64 in [0, 1).
func (s *stream) float() float64 { return float64(s.next()>>11) / (1 << 53) }

// mix is SplitMix64's finaliser.
func mix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
