package server

import (
	"errors"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// Limits of parking.
const (
	// parkRetry is how often parked pushes are forwarded again. A forward
	// that finds no owner answers at once (no responders), so this is the
	// cost of a retry, not of a wait; 200 ms is well under the fail-over
	// target (5 s) and keeps a node from spinning on a database whose
	// lease has not run out yet.
	parkRetry = 200 * time.Millisecond
	// parkLimit is how long a push may stay parked before its session is
	// told to reconnect: a forward's own bound, so that parking never
	// holds a push longer than one forward to a live owner would.
	parkLimit = forwardTimeout
)

// parkable reports whether a forward that ended with err left its pushes
// unrun and may be repeated: no node answered for the database
// (ErrNotOwner), or the owner's lease went free or changed hands while it
// was in flight (errOwnerChanged; the old owner may have run some of them,
// and a mutation it ran is not run twice when forwarded again, by its id).
//
// Parking them, rather than telling their sessions to reconnect, is what
// keeps a fail-over short: each reconnect restarted the replicas' backoff
// from a session younger than it counts as stable, and in
// TestClusterFailover their first confirmation came 3.5 s after the new
// owner served.
func parkable(err error) bool {
	return errors.Is(err, ErrNotOwner) || errors.Is(err, errOwnerChanged)
}

// parkedPushes are a follower's pushes waiting for an owner, in arrival
// order, and the time the oldest of them was first parked. Used by the
// writer alone. A push that arrives while any are parked queues behind
// them, so that a client's pushes reach the owner in the order it sent
// them.
type parkedPushes struct {
	reqs  []pushRequest
	since time.Time        // when the oldest parked push was first parked
	timer <-chan time.Time // fires when the parked pushes are due again
}

// holds reports whether any pushes are parked.
func (p *parkedPushes) holds() bool { return len(p.reqs) > 0 }

// queue parks a push that arrived behind the parked ones.
func (p *parkedPushes) queue(r pushRequest) { p.reqs = append(p.reqs, r) }

// retry is the channel that fires when the parked pushes are due to be
// forwarded again; nil (never ready) while none are parked.
func (p *parkedPushes) retry() <-chan time.Time { return p.timer }

// take returns the parked pushes to forward again, keeping the time they
// were first parked for park.
func (p *parkedPushes) take() []pushRequest {
	reqs := p.reqs
	p.reqs, p.timer = nil, nil
	return reqs
}

// park parks the pushes a forward at now left unrun. Those parked for
// parkLimit or longer are told to reconnect instead; park returns how many.
// Parking nothing ends the parked period.
func (p *parkedPushes) park(left []pushRequest, now time.Time) (failed int) {
	if len(left) == 0 {
		if !p.holds() {
			p.since = time.Time{}
		}
		return 0
	}
	if p.since.IsZero() {
		p.since = now
	}
	p.reqs = append(left, p.reqs...)
	if now.Sub(p.since) >= parkLimit {
		return p.fail("no node has answered for the database's owner; reconnect")
	}
	p.timer = time.After(parkRetry)
	return 0
}

// fail tells the sessions of every parked push why it was not run, and
// returns how many there were.
func (p *parkedPushes) fail(msg string) int {
	n := len(p.reqs)
	for _, r := range p.reqs {
		r.answer(ForwardedResult{Code: protocol.CodeInternal, Message: msg})
	}
	p.reqs, p.timer, p.since = nil, nil, time.Time{}
	return n
}
