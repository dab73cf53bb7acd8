package server

import (
	"testing"
	"time"
)

func TestLifeSteps(t *testing.T) {
	var l life
	now := time.Unix(1000, 0)
	if l.acquire() != stepOpen || l.state != tOpening {
		t.Fatal("a closed database is opened by its first acquirer")
	}
	if l.acquire() != stepWait {
		t.Fatal("a second acquirer during the opening waits")
	}
	l.opened(true, now)
	if l.state != tOpen || l.refs != 1 {
		t.Fatalf("opened: %+v", l)
	}
	if l.acquire() != stepUse || l.refs != 2 {
		t.Fatal("an open database is shared")
	}
	if l.release(now) || l.idle(false) {
		t.Fatal("idle with a holder left")
	}
	gen := l.gen
	if !l.release(now.Add(time.Second)) || !l.idle(false) {
		t.Fatal("not idle after the last release")
	}
	if l.idle(true) {
		t.Fatal("idle with pushes queued")
	}
	if l.idleFor(gen, time.Minute, false, now.Add(30*time.Second)) {
		t.Fatal("closed before IdleClose")
	}
	if !l.idleFor(gen, time.Minute, false, now.Add(2*time.Minute)) {
		t.Fatal("not closable after IdleClose")
	}
	// An acquire since the timer was armed makes it stale.
	l.acquire()
	l.release(now.Add(3 * time.Minute))
	if l.idleFor(gen, time.Minute, false, now.Add(time.Hour)) {
		t.Fatal("a stale idle timer may close")
	}
	if !l.startClose(false) || l.state != tClosing || l.acquire() != stepWait {
		t.Fatal("closing: acquirers wait")
	}
	l.closed()
	if l.acquire() != stepOpen {
		t.Fatal("closed: the next acquirer opens again")
	}
	l.opened(false, now)
	if l.state != tClosed {
		t.Fatal("a failed opening leaves it closed")
	}
	l.acquire()
	l.opened(true, now)
	l.pin()
	if l.release(now) || l.startClose(false) {
		t.Fatal("a pinned database is never idle")
	}
	if !l.forceClose() || l.state != tClosing {
		t.Fatal("the server's close closes even a pinned database")
	}
}

// TestLifeReleaseAfterForceClose: a holder that is not a session (an
// owner's snapshot, a forwarded push) may still hold the database when the
// server closes it, and release it afterwards; that release is no bug (it
// panicked, found by the chaos suite's cluster mode), a release nobody
// took still is.
func TestLifeReleaseAfterForceClose(t *testing.T) {
	now := time.Unix(1000, 0)
	var l life
	l.acquire()
	l.opened(true, now)
	l.acquire() // two holders
	if !l.forceClose() {
		t.Fatal("forceClose of an open database")
	}
	l.release(now)
	l.closed()
	l.release(now)
	if l.state != tClosed || l.refs != 0 || l.orphans != 0 {
		t.Fatalf("after the orphans' releases: %+v", l)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a release nobody took did not panic")
		}
	}()
	l.release(now)
}

func TestPickVictim(t *testing.T) {
	t0 := time.Unix(1000, 0)
	cases := []struct {
		cands []victim
		want  int
	}{
		{nil, -1},
		{[]victim{{idle: false, idleSince: t0}}, -1},
		{[]victim{{idle: true, idleSince: t0.Add(2)}, {idle: true, idleSince: t0.Add(1)}, {idle: false, idleSince: t0}}, 1},
		{[]victim{{idle: true, idleSince: t0}}, 0},
	}
	for i, c := range cases {
		if got := pickVictim(c.cands); got != c.want {
			t.Errorf("case %d: %d, want %d", i, got, c.want)
		}
	}
}

// FuzzLife drives the state machine with arbitrary calls, made only where
// the registry makes them, and checks its invariants: a reference is handed
// out only while open, a close starts only with no holder and no pin, and
// references never go negative.
func FuzzLife(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7})
	f.Add([]byte{0, 1, 0, 2, 2, 4, 5, 0, 1})
	f.Fuzz(func(t *testing.T, ops []byte) {
		var l life
		now := time.Unix(0, 0)
		var gens []uint64
		for _, op := range ops {
			now = now.Add(time.Second)
			before := l
			switch op % 8 {
			case 0:
				switch l.acquire() {
				case stepUse:
					if before.state != tOpen || l.refs != before.refs+1 {
						t.Fatalf("use while %v: %+v", before.state, l)
					}
				case stepOpen:
					if before.state != tClosed || l.state != tOpening {
						t.Fatalf("open while %v", before.state)
					}
				case stepWait:
					if before.state != tOpening && before.state != tClosing {
						t.Fatalf("wait while %v", before.state)
					}
				}
			case 1:
				if l.state == tOpening {
					l.opened(op&0x80 == 0, now)
				}
			case 2:
				if l.state == tOpen && l.refs > 0 {
					if l.release(now) {
						gens = append(gens, l.gen)
					}
				}
			case 3:
				if l.state == tOpen {
					l.pin()
				}
			case 4, 5:
				busy := op%8 == 5
				ok := false
				if len(gens) > 0 && op&0x80 != 0 {
					ok = l.idleFor(gens[len(gens)-1], time.Second, busy, now) && l.startClose(busy)
				} else {
					ok = l.startClose(busy)
				}
				if ok && (before.refs != 0 || before.pinned || busy || before.state != tOpen) {
					t.Fatalf("closing %+v (busy %v)", before, busy)
				}
			case 6:
				if l.state == tClosing {
					l.closed()
				}
			case 7:
				if l.forceClose() && before.state != tOpen {
					t.Fatalf("force-closed while %v", before.state)
				}
			}
			if l.refs < 0 || (l.state != tOpen && l.refs != 0) {
				t.Fatalf("refs %d while %v", l.refs, l.state)
			}
		}
	})
}
