package replica

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// genPending draws pending mutations with consecutive ids from first.
func genPending(t *rapid.T, first uint64) []pushable {
	n := rapid.IntRange(0, 50).Draw(t, "n")
	out := make([]pushable, n)
	for i := range out {
		out[i] = pushable{ID: first + uint64(i), Size: rapid.IntRange(0, 300).Draw(t, "size")}
	}
	return out
}

// TestPlanPushProperties: whatever the state, a plan is a prefix of the
// pending mutations that respects every limit, and it is as long as the
// limits allow (nothing is held back for no reason).
func TestPlanPushProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		acked := rapid.Uint64Range(0, 100).Draw(t, "acked")
		pushed := acked + rapid.Uint64Range(0, 30).Draw(t, "inflight")
		c := pushCursor{Pushed: pushed, Acked: acked}
		l := pushLimits{
			MaxBatch:    rapid.IntRange(1, 20).Draw(t, "maxBatch"),
			MaxInFlight: rapid.IntRange(1, 40).Draw(t, "maxInFlight"),
			MaxBytes:    rapid.IntRange(1, 2000).Draw(t, "maxBytes"),
		}
		pending := genPending(t, pushed+1)
		k := planPush(pending, c, l)
		if k < 0 || k > len(pending) {
			t.Fatalf("plan of %d out of %d pending", k, len(pending))
		}
		if k > l.MaxBatch {
			t.Fatalf("plan of %d exceeds max batch %d", k, l.MaxBatch)
		}
		if c.inFlight()+uint64(k) > uint64(l.MaxInFlight) && k > 0 {
			t.Fatalf("plan of %d with %d in flight exceeds %d", k, c.inFlight(), l.MaxInFlight)
		}
		bytes := 0
		for _, m := range pending[:k] {
			bytes += m.Size + pushOverhead
		}
		if k > 1 && bytes > l.MaxBytes {
			t.Fatalf("plan of %d mutations, %d bytes, exceeds %d", k, bytes, l.MaxBytes)
		}
		// Maximal: one more would break a limit.
		if k < len(pending) {
			next := bytes + pending[k].Size + pushOverhead
			fits := k+1 <= l.MaxBatch && c.inFlight()+uint64(k+1) <= uint64(l.MaxInFlight) && (k == 0 || next <= l.MaxBytes)
			if fits {
				t.Fatalf("plan of %d stops early: the next one fits (bytes %d/%d, in flight %d/%d)", k, next, l.MaxBytes, c.inFlight()+uint64(k+1), l.MaxInFlight)
			}
		}
	})
}

// TestPlanPushNeverGaps: a plan only ever starts right after what was
// pushed: a pending list that does not (a stale list) gets no push.
func TestPlanPushNeverGaps(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		pushed := rapid.Uint64Range(0, 100).Draw(t, "pushed")
		first := rapid.Uint64Range(0, 200).Draw(t, "first")
		pending := genPending(t, first)
		k := planPush(pending, pushCursor{Pushed: pushed, Acked: pushed}, pushLimits{MaxBatch: 1000, MaxInFlight: 1000, MaxBytes: 1 << 20})
		if k > 0 && pending[0].ID != pushed+1 {
			t.Fatalf("pushes from %d after %d", pending[0].ID, pushed)
		}
	})
}

// TestPushSimulation drives a session the way the loop does: mutations
// appear, pushes go out under the limits, acks come back in order, the
// connection drops and the next session starts from the server's last id.
// Every mutation reaches the server, in order, none is skipped, and the
// server (which skips duplicates) processes each exactly once.
func TestPushSimulation(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		l := pushLimits{MaxBatch: rapid.IntRange(1, 8).Draw(t, "maxBatch"), MaxInFlight: rapid.IntRange(1, 16).Draw(t, "maxInFlight"), MaxBytes: 1 << 20}
		var (
			made      uint64   // ids 1..made exist
			settled   uint64   // the replica's settled base
			server    uint64   // the server's last processed id
			unacked   []uint64 // pushed ids on the wire, not yet processed
			processed []uint64 // ids the server ran, in order, no duplicates
		)
		cur := pushCursor{}
		steps := rapid.IntRange(1, 200).Draw(t, "steps")
		for range steps {
			switch rapid.IntRange(0, 4).Draw(t, "op") {
			case 0: // Mutate
				made++
			case 1: // push what the plan says
				var pending []pushable
				for id := max(cur.Pushed, settled) + 1; id <= made; id++ {
					pending = append(pending, pushable{ID: id, Size: 10})
				}
				cur = cur.ack(settled)
				k := planPush(pending, cur, l)
				if k > 0 {
					for _, m := range pending[:k] {
						unacked = append(unacked, m.ID)
					}
					cur.Pushed = pending[k-1].ID
				}
				if cur.inFlight() > uint64(l.MaxInFlight) {
					t.Fatalf("%d in flight, limit %d", cur.inFlight(), l.MaxInFlight)
				}
			case 2: // the server processes some and acks
				n := rapid.IntRange(0, len(unacked)).Draw(t, "process")
				for _, id := range unacked[:n] {
					switch {
					case id <= server:
						// duplicate: skipped
					case id == server+1:
						server = id
						processed = append(processed, id)
					default:
						t.Fatalf("gap: pushed %d after server's %d", id, server)
					}
				}
				unacked = unacked[n:]
				cur = cur.ack(server)
			case 3: // a rebase settles what the server processed
				settled = server
			case 4: // the connection drops; a new session is welcomed
				unacked = nil
				cur = pushCursor{Pushed: server, Acked: server}
			}
		}
		for i, id := range processed {
			if id != uint64(i)+1 {
				t.Fatalf("server processed %v", processed)
			}
		}
	})
}

func TestPushCursorAck(t *testing.T) {
	c := pushCursor{Pushed: 10, Acked: 5}
	if got := c.ack(3); got != c {
		t.Fatalf("ack went back: %+v", got)
	}
	if got := c.ack(8); got.Acked != 8 || got.Pushed != 10 || got.inFlight() != 2 {
		t.Fatalf("ack 8: %+v", got)
	}
	if got := c.ack(12); got.Acked != 12 || got.Pushed != 12 || got.inFlight() != 0 {
		t.Fatalf("ack past pushed: %+v", got)
	}
}

func TestNewPushLimits(t *testing.T) {
	l := newPushLimits(&protocol.Welcome{MaxBatch: 0, MaxInFlight: 0})
	if l.MaxBatch != protocol.DefaultLimits.MaxBatch || l.MaxInFlight != defaultMaxInFlight || l.MaxBytes <= 0 {
		t.Fatalf("zero limits: %+v", l)
	}
	l = newPushLimits(&protocol.Welcome{MaxBatch: 1 << 30, MaxInFlight: 7})
	if l.MaxBatch != protocol.DefaultLimits.MaxBatch || l.MaxInFlight != 7 {
		t.Fatalf("limits: %+v", l)
	}
	// A mutation at the mutators' size limit always fits in a push of its own.
	if one := planPush([]pushable{{ID: 1, Size: 2 << 20}}, pushCursor{}, l); one != 1 {
		t.Fatalf("a large mutation is not pushed: %d", one)
	}
}

func TestBackoffProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		minD := time.Duration(rapid.Int64Range(1, int64(time.Second)).Draw(t, "min"))
		maxD := minD * time.Duration(rapid.Int64Range(1, 1000).Draw(t, "ratio"))
		attempt := rapid.IntRange(0, 200).Draw(t, "attempt")
		j1 := rapid.Float64Range(0, 0.999999).Draw(t, "jitter1")
		d := backoff(attempt, minD, maxD, j1)
		if d < minD/2 || d > maxD {
			t.Fatalf("backoff(%d, %v, %v, %v) = %v", attempt, minD, maxD, j1, d)
		}
		// Without jitter, the wait never shrinks as attempts grow.
		if backoff(attempt+1, minD, maxD, 0) < backoff(attempt, minD, maxD, 0) {
			t.Fatalf("backoff shrank after attempt %d", attempt)
		}
	})
}

func TestBackoffShape(t *testing.T) {
	if d := backoff(0, 100*time.Millisecond, 30*time.Second, 0); d != 50*time.Millisecond {
		t.Fatalf("first: %v", d)
	}
	if d := backoff(3, 100*time.Millisecond, 30*time.Second, 0.999999); d < 799*time.Millisecond || d > 800*time.Millisecond {
		t.Fatalf("fourth, full jitter: %v", d)
	}
	if d := backoff(1000, 100*time.Millisecond, 30*time.Second, 0.5); d != 22500*time.Millisecond {
		t.Fatalf("capped: %v", d)
	}
	// Bad jitter (NaN, out of range) never makes a wait out of bounds.
	for _, j := range []float64{-1, 2, nan()} {
		if d := backoff(2, time.Second, time.Minute, j); d != 2*time.Second {
			t.Fatalf("jitter %v: %v", j, d)
		}
	}
}

func nan() float64 { var z float64; return z / z }

func TestNextAttempt(t *testing.T) {
	if got := nextAttempt(5, true, stableSession, false); got != 0 {
		t.Fatalf("stable session: %d", got)
	}
	if got := nextAttempt(5, true, time.Millisecond, false); got != 6 {
		t.Fatalf("short session: %d", got)
	}
	if got := nextAttempt(5, false, time.Hour, false); got != 6 {
		t.Fatalf("refused: %d", got)
	}
	if got := nextAttempt(64, false, 0, false); got != 64 {
		t.Fatalf("bounded: %d", got)
	}
	if got := nextAttempt(5, true, time.Millisecond, true); got != 0 {
		t.Fatalf("short session ended by its credential: %d", got)
	}
	if got := nextAttempt(5, false, time.Millisecond, true); got != 6 {
		t.Fatalf("hello refused as expired: %d", got)
	}
}

// TestReconnectAfterCredentialEnds drives the reconnect decision as the
// sync loop does (credentialEnded, nextAttempt, backoff) through sessions
// whose token lives 300 ms: every expiry is followed by a reconnect within
// the shortest backoff, however many there are; a source that keeps
// handing out stale tokens (the Hello is refused as expired) backs off
// ever more, up to the cap; a revocation is renewed like an expiry; other
// endings of short sessions back off as before.
func TestReconnectAfterCredentialEnds(t *testing.T) {
	expired := fmt.Errorf("session: %w", &protocol.RemoteError{Code: protocol.CodeCredentialExpired, Message: "token expired"})
	revoked := &protocol.RemoteError{Code: protocol.CodeCredentialRevoked}
	slow := &protocol.RemoteError{Code: protocol.CodeSlowClient}
	if !credentialEnded(expired) || !credentialEnded(revoked) || credentialEnded(slow) || credentialEnded(errors.New("x")) || credentialEnded(nil) {
		t.Fatal("credentialEnded misclassifies")
	}
	if fatalSyncError(expired) || fatalSyncError(revoked) || !fatalSyncError(&protocol.RemoteError{Code: protocol.CodeUnauthorized}) {
		t.Fatal("an expired or revoked credential must not be fatal; unauthorized must")
	}
	if !fatalSyncError(fmt.Errorf("%w: %w", errTokenSource, ErrNoToken)) || fatalSyncError(fmt.Errorf("%w: %w", errTokenSource, errors.New("idp down"))) {
		t.Fatal("a token source's ErrNoToken must be fatal, its other errors not")
	}
	step := func(attempt int, welcomed bool, lasted time.Duration, err error) (int, time.Duration) {
		a := nextAttempt(attempt, welcomed, lasted, credentialEnded(err))
		return a, backoff(a, backoffMin, backoffMax, 0.999)
	}
	attempt := 3 // whatever came before
	for i := range 100 {
		var wait time.Duration
		attempt, wait = step(attempt, true, 300*time.Millisecond, expired)
		if attempt != 0 || wait > backoffMin {
			t.Fatalf("expiry %d: attempt %d, wait %v; want a reconnect within %v", i, attempt, wait, backoffMin)
		}
	}
	if a, w := step(0, true, 300*time.Millisecond, revoked); a != 0 || w > backoffMin {
		t.Fatalf("revoked: attempt %d, wait %v", a, w)
	}
	var prev time.Duration
	for i := range 12 {
		var wait time.Duration
		attempt, wait = step(attempt, false, time.Millisecond, expired)
		if wait < prev || wait > backoffMax {
			t.Fatalf("stale token %d: wait %v after %v (cap %v)", i, wait, prev, backoffMax)
		}
		prev = wait
	}
	if prev < backoffMax*9/10 {
		t.Fatalf("a stale token source backs off to %v, want about %v", prev, backoffMax)
	}
	if a, _ := step(0, true, 300*time.Millisecond, slow); a != 1 {
		t.Fatalf("short session cut for slowness: attempt %d, want 1", a)
	}
}

func TestRebaseDue(t *testing.T) {
	cases := []struct {
		collected     int
		partial, more bool
		want          bool
	}{
		{0, false, false, false},
		{1, false, false, true},
		{1, false, true, false},              // more is waiting: it joins this rebase
		{1, true, false, false},              // a snapshot half received cannot be applied
		{maxRebaseBatch, false, true, true},  // a full batch goes even if more keeps coming
		{maxRebaseBatch, true, false, false}, // never with a partial snapshot
	}
	for _, c := range cases {
		if got := rebaseDue(rebaseState{Collected: c.collected, SnapshotPartial: c.partial, MoreWaiting: c.more}, time.Second); got != c.want {
			t.Errorf("rebaseDue(%d, %v, %v) = %v", c.collected, c.partial, c.more, got)
		}
	}
}
