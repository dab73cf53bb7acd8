package server

import "time"

// tstate is where a hosted database is in its life: closed (only its name
// and credentials in memory), opening, open, or closing.
type tstate uint8

const (
	tClosed tstate = iota
	tOpening
	tOpen
	tClosing
)

func (s tstate) String() string {
	return [...]string{"closed", "opening", "open", "closing"}[s]
}

// life is one hosted database's lifecycle as a small state machine: no
// locks, no I/O, no clock of its own (the caller passes the time). The
// registry drives it under the tenant's lock and does the opening and
// closing outside it; what the machine guarantees is that a database is
// handed out only while open, and is closed only while nobody holds it.
type life struct {
	state     tstate
	refs      int       // holders: sessions, admin calls (open only)
	pinned    bool      // Server.Authority handed it out: never closed before the server
	idleSince time.Time // when refs last fell to zero (open, refs 0)
	gen       uint64    // bumped by every acquire: an idle timer armed before it does nothing
	// orphans are the references forceClose dropped: holders that are not
	// sessions (an owner's snapshot in Server.WithAuthority, a forwarded
	// push in ServeForwarded) may still be running when the server
	// closes, and release after it.
	orphans int
}

// acquireStep is what an acquirer does next.
type acquireStep uint8

const (
	stepUse  acquireStep = iota // open: a reference was taken, use it
	stepOpen                    // was closed: the caller now opens it (state opening)
	stepWait                    // opening or closing: wait for that to end, then try again
)

// acquire takes a reference if open, or claims the opening if closed.
func (l *life) acquire() acquireStep {
	switch l.state {
	case tOpen:
		l.refs++
		l.gen++
		return stepUse
	case tClosed:
		l.state = tOpening
		return stepOpen
	}
	return stepWait
}

// opened ends an opening: open with the opener's reference on success,
// closed again on failure.
func (l *life) opened(ok bool, now time.Time) {
	if l.state != tOpening {
		panic("server: opened while " + l.state.String()) // a bug of the registry, never input
	}
	if !ok {
		l.state = tClosed
		return
	}
	l.state, l.refs, l.idleSince = tOpen, 1, now
	l.gen++
}

// pin keeps an open database open until the server closes.
func (l *life) pin() { l.pinned = true }

// release drops a reference. It reports whether the database became idle
// (then the caller arms an idle timer for gen).
func (l *life) release(now time.Time) (idle bool) {
	if l.state != tOpen && l.orphans > 0 {
		l.orphans-- // held across the server's close (forceClose)
		return false
	}
	if l.state != tOpen || l.refs <= 0 {
		panic("server: release of an unheld database") // a bug of the registry, never input
	}
	l.refs--
	if l.refs > 0 {
		return false
	}
	l.idleSince = now
	return !l.pinned
}

// idle reports whether the database may be closed now: open, held by
// nobody and not pinned. busy is what the database itself says (pushes
// still queued for its writer).
func (l *life) idle(busy bool) bool {
	return l.state == tOpen && l.refs == 0 && !l.pinned && !busy
}

// idleFor reports whether an idle timer armed at gen may close the
// database now: still idle, nobody acquired it since, and idle for at
// least d.
func (l *life) idleFor(gen uint64, d time.Duration, busy bool, now time.Time) bool {
	return l.gen == gen && l.idle(busy) && now.Sub(l.idleSince) >= d
}

// startClose moves an idle database to closing; false if it is not idle.
func (l *life) startClose(busy bool) bool {
	if !l.idle(busy) {
		return false
	}
	l.state = tClosing
	return true
}

// forceClose moves an open database to closing whoever holds it (the
// server is closing: its sessions have ended or are being ended).
func (l *life) forceClose() bool {
	if l.state != tOpen {
		return false
	}
	l.state, l.refs, l.orphans = tClosing, 0, l.orphans+l.refs
	return true
}

// closed ends a closing.
func (l *life) closed() {
	if l.state != tClosing {
		panic("server: closed while " + l.state.String()) // a bug of the registry, never input
	}
	l.state, l.refs, l.pinned = tClosed, 0, false
}

// pickVictim chooses which open database to close to make room for
// another: the least recently used of those idle (the earliest idleSince).
// It returns -1 if none is idle.
func pickVictim(cands []victim) int {
	best := -1
	for i, c := range cands {
		if c.idle && (best < 0 || c.idleSince.Before(cands[best].idleSince)) {
			best = i
		}
	}
	return best
}

// victim is an open database as pickVictim sees it.
type victim struct {
	idle      bool
	idleSince time.Time
}
