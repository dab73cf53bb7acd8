package replica

import (
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// The sync loop's decisions, kept apart from sockets and files so that they
// can be tested on their own (syncstate_test.go, with property tests): what
// to push next, how long to wait before reconnecting, and when to rebase.

// pushLimits bound what one session may push: the server's limits from its
// Welcome, and the size of a message this client may send.
type pushLimits struct {
	MaxBatch    int // mutations per Push
	MaxInFlight int // mutations pushed and not yet acknowledged
	MaxBytes    int // encoded bytes of the mutations of one Push
}

// Defaults for limits a server leaves at zero. A zero in a Welcome would
// otherwise stop every push; the protocol's defaults are what a server that
// forgot to say means.
const (
	defaultMaxInFlight = 10000
	// pushOverhead is an upper bound on the bytes a mutation costs in a Push
	// besides its name and arguments (id and two length varints).
	pushOverhead = 3 * 10
)

// newPushLimits turns a Welcome's limits into the ones a session applies.
// The message budget keeps a margin below the receiver's maximum for the
// type byte and the count.
func newPushLimits(w *protocol.Welcome) pushLimits {
	l := pushLimits{MaxBatch: int(w.MaxBatch), MaxInFlight: int(w.MaxInFlight), MaxBytes: protocol.DefaultLimits.MaxMessage - 64}
	if l.MaxBatch <= 0 || l.MaxBatch > protocol.DefaultLimits.MaxBatch {
		// The server's decoder refuses more than its MaxBatch; a client
		// never sends more than the protocol default either, whatever a
		// server claims.
		l.MaxBatch = protocol.DefaultLimits.MaxBatch
	}
	if l.MaxInFlight <= 0 {
		l.MaxInFlight = defaultMaxInFlight
	}
	return l
}

// pushCursor is a session's position in the push stream.
type pushCursor struct {
	Pushed uint64 // highest id pushed in this session (starts at the Welcome's last mutation id)
	Acked  uint64 // highest id the server said it processed (Welcome, then Acks)
}

// inFlight is the number of mutations pushed and not yet acknowledged.
func (c pushCursor) inFlight() uint64 {
	if c.Pushed <= c.Acked {
		return 0
	}
	return c.Pushed - c.Acked
}

// ack records an Ack. Acks never go back; one beyond what was pushed (the
// server processed a push of an earlier session that this one did not
// repeat) moves the push position along with it, since those ids need no
// pushing.
func (c pushCursor) ack(id uint64) pushCursor {
	if id > c.Acked {
		c.Acked = id
	}
	if c.Acked > c.Pushed {
		c.Pushed = c.Acked
	}
	return c
}

// pushable is what planPush needs of a pending mutation.
type pushable struct {
	ID   uint64
	Size int // bytes of name and arguments
}

// planPush decides the next Push: it returns how many mutations of pending
// (ascending, consecutive ids: the queue's pending mutations after the
// cursor's Pushed) to send now, 0 for none. It sends in id order only, never
// more than MaxBatch, never more than MaxInFlight unacknowledged, and never
// more than MaxBytes in one message, except that a single mutation always
// goes alone (its size is bounded by the mutators' own limit, far below a
// message).
func planPush(pending []pushable, c pushCursor, l pushLimits) int {
	if len(pending) == 0 || pending[0].ID != c.Pushed+1 {
		// Not the next id: sending it would be a gap. The caller passes the
		// mutations after Pushed; anything else is a bug upstream, and
		// sending nothing is the safe answer.
		return 0
	}
	room := uint64(l.MaxInFlight)
	if f := c.inFlight(); f >= room {
		return 0
	} else {
		room -= f
	}
	n, bytes := 0, 0
	for _, m := range pending {
		if n >= l.MaxBatch || uint64(n) >= room {
			break
		}
		if n > 0 && m.ID != pending[n-1].ID+1 {
			break
		}
		size := m.Size + pushOverhead
		if n > 0 && bytes+size > l.MaxBytes {
			break
		}
		n++
		bytes += size
	}
	return n
}

// backoffMin and backoffMax bound the wait between connection attempts.
const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 30 * time.Second
)

// backoff is how long to wait before connection attempt number attempt
// (0 for the first retry): exponential from min, capped at max, with "equal
// jitter": half the step fixed and half random (jitter in [0, 1)), so that
// replicas that lost the same server do not come back in lockstep, and
// none waits less than half its step.
func backoff(attempt int, minD, maxD time.Duration, jitter float64) time.Duration {
	if minD <= 0 {
		minD = time.Millisecond
	}
	if maxD < minD {
		maxD = minD
	}
	step := minD
	for i := 0; i < attempt && step < maxD; i++ {
		step *= 2
	}
	if step > maxD {
		step = maxD
	}
	if jitter < 0 || jitter >= 1 || jitter != jitter {
		jitter = 0
	}
	half := step / 2
	return half + time.Duration(float64(step-half)*jitter)
}

// maxRebaseBatch is the most versions one rebase takes while more keep
// arriving, so that a steady stream cannot postpone the rebase forever.
const maxRebaseBatch = 1024

// rebaseState is what rebaseDue decides on.
type rebaseState struct {
	Collected       int    // versions (or a whole snapshot) arrived and not applied
	SnapshotPartial bool   // a snapshot is half received
	MoreWaiting     bool   // more messages are already waiting to be read
	Pending         uint64 // this client's pending mutations (the queue)
	// Acked is how many of them the server has acknowledged since the last
	// rebase: the next rebase settles them instead of replaying them.
	Acked uint64
	// SinceRebase is the time since the last rebase.
	SinceRebase time.Duration
}

const (
	// drainMinReplay is the replay below which a rebase is never deferred:
	// replaying that few costs less than keeping other clients' changes
	// out of sight.
	drainMinReplay = 64
	// maxRebaseDefer bounds how long a backlog's drain may defer a rebase,
	// so that other clients' changes still show within it.
	maxRebaseDefer = time.Second
)

// rebaseDue says whether the versions collected so far should be applied
// now: only when some are there and no snapshot is half received (its pages
// are one page set; applying a part is impossible); a full batch at once;
// otherwise not while more is already waiting to be read (it would join the
// same rebase, which costs one replay whatever the number of versions).
//
// And not while a backlog drains (the server acknowledges a long queue push
// by push): a rebase replays every mutation still pending, so rebasing on
// every version would replay P, then P-batch, and so on, O(P^2) in all.
// Instead, while the replay would exceed drainMinReplay, the rebase waits
// until the acknowledgements since the last one reach half of what it would
// replay, or maxDefer has passed since the last rebase. Each rebase then
// replays at most twice what it settles, so draining P mutations replays at
// most 2P in all (plus drainMinReplay per rebase at the tail, plus one
// backlog per maxDefer of drain time).
func rebaseDue(s rebaseState, maxDefer time.Duration) bool {
	if s.Collected == 0 || s.SnapshotPartial {
		return false
	}
	if s.Collected >= maxRebaseBatch {
		return true
	}
	if s.MoreWaiting {
		return false
	}
	replay := s.Pending - min(s.Acked, s.Pending)
	if replay <= drainMinReplay || s.SinceRebase >= maxDefer {
		return true
	}
	return 2*s.Acked >= replay
}

// silenceWatch follows a connection's count of packets received, while a
// session waits for an ack, to tell when its node has sent nothing for a
// while (see silenceLimit).
type silenceWatch struct {
	Received uint64    // the count at the last look
	Since    time.Time // when the count last moved, or the watch began; zero: not watching
}

// look is the watch after seeing the count received at now, and whether
// the node has been silent for limit. A watch that was not watching starts
// at now: silence is counted only from when the session began to wait.
func (w silenceWatch) look(received uint64, now time.Time, limit time.Duration) (silenceWatch, bool) {
	if w.Since.IsZero() || received != w.Received {
		return silenceWatch{Received: received, Since: now}, false
	}
	return w, now.Sub(w.Since) >= limit
}
