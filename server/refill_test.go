package server

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"
)

// streamFollower is a Follower whose log holds versions first..last, and
// only its Versions is real: refillLogLocked uses nothing else.
type streamFollower struct {
	Follower
	first, last uint64
	// cut: Versions fails after the last version with another error than
	// a gap (a node cut off).
	cut bool
}

func (f streamFollower) Versions(ctx context.Context, db string, after, through uint64, apply func(uint64, []byte) error) error {
	if after+1 < f.first {
		return fmt.Errorf("%w: starts at %d", ErrFollowGap, f.first)
	}
	if through == 0 {
		through = f.last
	}
	for v := after + 1; v <= through; v++ {
		if v > f.last {
			if f.cut {
				return errors.New("the stream's leader is gone")
			}
			return fmt.Errorf("%w: ends at %d", ErrFollowGap, f.last)
		}
		if err := apply(v, refillRec(v)); err != nil {
			return err
		}
	}
	return nil
}

func refillRec(v uint64) []byte {
	return binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, v*7), v)
}

// TestRefillLog: after a take-over or a restore, the change log is
// continued from the version log up to the database's version (from its
// own last version, or the refillVersions before the database's from an
// empty or too new log), so that replicas catch up from it; where the
// version log cannot, the log starts afresh.
func TestRefillLog(t *testing.T) {
	for _, c := range []struct {
		name        string
		vl          VersionLog
		have        uint64 // the change log holds 1..have
		version     uint64
		first, last uint64 // the change log after; 0, 0: empty
	}{
		{"continues its own", streamFollower{first: 1, last: 40}, 5, 40, 1, 40},
		{"from empty", streamFollower{first: 1, last: 2000}, 0, 2000, 2000 - refillVersions + 1, 2000},
		{"from empty, a short stream", streamFollower{first: 1, last: 30}, 0, 30, 1, 30},
		{"its own trimmed away", streamFollower{first: 900, last: 2000}, 5, 2000, 2000 - refillVersions + 1, 2000},
		{"its own too far behind", streamFollower{first: 1, last: 3000}, 5, 3000, 3000 - refillVersions + 1, 3000},
		{"ahead of the database", streamFollower{first: 1, last: 30}, 50, 30, 1, 30},
		{"the stream trimmed past both", streamFollower{first: 1990, last: 2000}, 5, 2000, 0, 0},
		{"the stream behind the database", streamFollower{first: 1, last: 20, cut: true}, 5, 30, 0, 0},
		{"no cluster", nil, 5, 30, 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			l, err := openChangeLog(t.TempDir(), 64, 1<<20, Retention{})
			if err != nil {
				t.Fatal(err)
			}
			defer l.close()
			for v := uint64(1); v <= c.have; v++ {
				if err := l.append(v, refillRec(v), time.Now()); err != nil {
					t.Fatal(err)
				}
			}
			d := &database{name: "db", cfg: &Config{VersionLog: c.vl}, clog: l, log: slog.New(slog.DiscardHandler)}
			if err := d.refillLogLocked(context.Background(), c.version); err != nil {
				t.Fatal(err)
			}
			if l.first() != c.first || l.last() != c.last {
				t.Fatalf("change log holds %d..%d, want %d..%d", l.first(), l.last(), c.first, c.last)
			}
			if c.last == 0 {
				return
			}
			recs, err := l.read(c.first, c.last)
			if err != nil {
				t.Fatal(err)
			}
			for i, r := range recs {
				if v := c.first + uint64(i); string(r) != string(refillRec(v)) {
					t.Fatalf("record of version %d is not the stream's", v)
				}
			}
		})
	}
}

func TestRefillStart(t *testing.T) {
	for _, c := range []struct {
		last, version, after uint64
		reset                bool
	}{
		{0, 0, 0, false},
		{0, 30, 0, false},
		{0, 5000, 5000 - refillVersions, false},
		{5, 40, 5, false},
		{40, 40, 40, false},
		{1000, 1000 + refillVersions, 1000, false},
		{999, 1000 + refillVersions, 1000, true}, // too far behind: from refillVersions before
		{50, 30, 0, true},                        // ahead of the database
	} {
		after, reset := refillStart(c.last, c.version)
		if after != c.after || reset != c.reset {
			t.Errorf("refillStart(%d, %d) = %d, %v; want %d, %v", c.last, c.version, after, reset, c.after, c.reset)
		}
	}
}
