package cluster

import (
	"fmt"
	"testing"
	"time"
)

func TestSnapshotPolicyDue(t *testing.T) {
	p := SnapshotPolicy{MinVersions: 10, MaxVersions: 100}.withDefaults()
	for _, c := range []struct {
		name                     string
		versions, bytes, dbBytes uint64
		want                     bool
	}{
		{"nothing yet", 0, 0, 4096, false},
		{"light versions", 50, 1000, 4096, false},
		{"outweigh the database", 50, 4097, 4096, true},
		{"weigh exactly the database", 50, 4096, 4096, false},
		{"outweigh but too soon", 9, 1 << 20, 4096, false},
		{"at the minimum", 10, 1 << 20, 4096, true},
		{"light but many", 100, 10, 1 << 30, true},
		{"light, one short of many", 99, 10, 1 << 30, false},
		{"unknown database size", 10, 1, 0, true},
	} {
		if got := p.due(c.versions, c.bytes, c.dbBytes); got != c.want {
			t.Errorf("%s: due(%d, %d, %d) = %v, want %v", c.name, c.versions, c.bytes, c.dbBytes, got, c.want)
		}
	}
}

func TestSnapshotPolicyDefaults(t *testing.T) {
	p := SnapshotPolicy{}.withDefaults()
	if p.MinVersions != DefaultSnapshotMinVersions || p.MaxVersions != DefaultSnapshotMaxVersions {
		t.Fatalf("defaults %+v", p)
	}
	if p := (SnapshotPolicy{MinVersions: 50, MaxVersions: 5}).withDefaults(); p.MaxVersions != 50 {
		t.Fatalf("MaxVersions below MinVersions: %+v", p)
	}
}

// TestSnapStateSequence walks the state machine through a run of appends:
// one snapshot in flight at most, counts reset when one starts, given back
// (with a pause of MinVersions) when it fails.
func TestSnapStateSequence(t *testing.T) {
	s := newSnapState(SnapshotPolicy{MinVersions: 3, MaxVersions: 5}, 0)
	type step struct {
		op      string // "a" append, "ok" / "fail" finished
		rec, db uint64
		want    bool
	}
	steps := []step{
		{"a", 10, 1000, false}, {"a", 10, 1000, false}, {"a", 10, 1000, false}, {"a", 10, 1000, false},
		{"a", 10, 1000, true},                                                    // the fifth: MaxVersions
		{"a", 2000, 1000, false}, {"a", 10, 1000, false}, {"a", 10, 1000, false}, // in flight: never a second
		{"ok", 0, 0, false},
		{"a", 10, 1000, true}, // 4 versions since the start, 2030 bytes > 1000: due
		{"fail", 0, 0, false},
		// The failed one's 4 versions come back (4, 2030 bytes): due, but
		// held until MinVersions more (versions 5, 6 held; 7 goes).
		{"a", 10, 1000, false}, {"a", 10, 1000, false}, {"a", 10, 1000, true},
		{"ok", 0, 0, false},
		{"a", 10, 1000, false}, {"a", 10, 1000, false},
	}
	for i, st := range steps {
		switch st.op {
		case "a":
			if got := s.appended(st.rec, st.db); got != st.want {
				t.Fatalf("step %d: appended(%d, %d) = %v, want %v (state %+v)", i, st.rec, st.db, got, st.want, s)
			}
		case "ok", "fail":
			s.finished(st.op == "ok")
		}
	}
	// A stored snapshot far behind counts at the start.
	s = newSnapState(SnapshotPolicy{MinVersions: 3, MaxVersions: 5}, 4)
	if !s.appended(1, 1<<20) {
		t.Fatal("the fifth version since the stored snapshot did not start one")
	}
}

// FuzzSnapState: whatever the appends and outcomes, at most one snapshot
// is in flight, none starts sooner than MinVersions versions after the
// last start or later than MaxVersions versions after it while none is in
// flight and none failed, and a start happens exactly when the policy says.
func FuzzSnapState(f *testing.F) {
	f.Add(uint8(3), uint8(7), []byte{1, 2, 3, 200, 4, 5, 6, 0, 7, 8})
	f.Add(uint8(0), uint8(0), []byte{255, 255, 255, 0, 1})
	f.Add(uint8(1), uint8(1), []byte{9, 0, 9, 1, 9})
	f.Fuzz(func(t *testing.T, minV, maxV uint8, ops []byte) {
		p := SnapshotPolicy{MinVersions: uint64(minV), MaxVersions: uint64(maxV)}
		s := newSnapState(p, 0)
		pol := s.policy
		inFlight := false
		sinceStart := uint64(0) // versions since the last start (or the beginning)
		failed := false
		for i, op := range ops {
			switch {
			case op == 0 || op == 1: // the snapshot in flight ends
				s.finished(op == 1)
				if inFlight && op == 0 {
					failed = true
				}
				inFlight = false
			default:
				rec, db := uint64(op)*97, uint64(op%16)*512
				before := s
				started := s.appended(rec, db)
				sinceStart++
				if started {
					if inFlight {
						t.Fatalf("op %d: a second snapshot started while one is in flight", i)
					}
					if sinceStart < pol.MinVersions {
						t.Fatalf("op %d: started %d versions after the last start (min %d)", i, sinceStart, pol.MinVersions)
					}
					if want := pol.due(before.versions+1, before.bytes+rec, db) && before.versions+1 >= before.holdUntil; !want {
						t.Fatalf("op %d: started though not due (state %+v)", i, before)
					}
					inFlight, sinceStart, failed = true, 0, false
				} else if !inFlight && !failed && sinceStart >= pol.MaxVersions {
					t.Fatalf("op %d: %d versions since the last start and none in flight: not started (max %d)", i, sinceStart, pol.MaxVersions)
				}
			}
			if s.inFlight != inFlight {
				t.Fatalf("op %d: state says in flight %v, want %v", i, s.inFlight, inFlight)
			}
		}
	})
}

// BenchmarkRestoreRead measures what a restore pays per version after the
// snapshot: Log.Read, one direct get per entry, over the in-process
// connection to an embedded single node (sync always). Its ns/op is the
// per-version cost behind DefaultSnapshotMaxVersions.
func BenchmarkRestoreRead(b *testing.B) {
	_, nc, js := single(b)
	ctx := bounded(b, 5*time.Minute)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		b.Fatal(err)
	}
	ap, err := l.NewAppender(ctx, "bench", "bench")
	if err != nil {
		b.Fatal(err)
	}
	const n = 2000
	rec := make([]byte, 200)
	for v := uint64(1); v <= n; v++ {
		if _, err := ap.Append(ctx, v, rec); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	read := 0
	for read < b.N {
		es, err := l.Read(ctx, "bench", 0, min(n, b.N-read))
		if err != nil {
			b.Fatal(err)
		}
		if len(es) == 0 {
			b.Fatal(fmt.Errorf("read nothing"))
		}
		read += len(es)
	}
}
