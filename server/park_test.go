package server

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestParkable(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("%w: nobody answers", ErrNotOwner), true},
		{fmt.Errorf("%w (now held by %q)", errOwnerChanged, "b"), true},
		{errors.New("cluster: the owner could not run the pushes: disk I/O error"), false},
		{fmt.Errorf("server: forward: %w", errors.New("context deadline exceeded")), false},
	} {
		if got := parkable(c.err); got != c.want {
			t.Errorf("parkable(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// parkedReq is a forwarded push whose answer the test reads.
func parkedReq(id uint64) pushRequest {
	return pushRequest{fwd: &ForwardedPush{ClientID: fmt.Sprint(id)}, reply: make(chan ForwardedResult, 1)}
}

// TestParkedPushesKeepOrderAndExpire: pushes parked, then queued behind
// them, come back in arrival order; the park period lasts from the first
// park until a forward leaves nothing; after parkLimit they are failed.
func TestParkedPushesKeepOrderAndExpire(t *testing.T) {
	var p parkedPushes
	if p.holds() || p.retry() != nil {
		t.Fatal("an empty park holds pushes or has a retry due")
	}
	t0 := time.Unix(1000, 0)
	a, b, c := parkedReq(1), parkedReq(2), parkedReq(3)
	if n := p.park([]pushRequest{a, b}, t0); n != 0 {
		t.Fatalf("park failed %d at once", n)
	}
	if !p.holds() || p.retry() == nil {
		t.Fatal("parked pushes hold nothing or have no retry")
	}
	p.queue(c)
	got := p.take()
	if len(got) != 3 || got[0].fwd != a.fwd || got[1].fwd != b.fwd || got[2].fwd != c.fwd {
		t.Fatalf("take returned %d pushes, not a, b, c in order", len(got))
	}
	if p.holds() || p.retry() != nil {
		t.Fatal("take left pushes or a retry")
	}
	// Forwarded again, still no owner, just before the limit: parked.
	if n := p.park(got, t0.Add(parkLimit-time.Millisecond)); n != 0 {
		t.Fatalf("parked %v after the first park: %d failed, want 0", parkLimit-time.Millisecond, n)
	}
	got = p.take()
	// At the limit (counted from the first park): all failed.
	if n := p.park(got, t0.Add(parkLimit)); n != 3 {
		t.Fatalf("at parkLimit %d failed, want 3", n)
	}
	for _, r := range []pushRequest{a, b, c} {
		select {
		case res := <-r.reply:
			if res.Code == 0 {
				t.Fatal("an expired parked push was answered with success")
			}
		default:
			t.Fatal("an expired parked push got no answer")
		}
	}
	if p.holds() {
		t.Fatal("expired pushes still parked")
	}
	// A new period starts afresh: parked at t1, not failed though t1 is
	// long after t0.
	t1 := t0.Add(time.Hour)
	if n := p.park([]pushRequest{parkedReq(4)}, t1); n != 0 {
		t.Fatalf("a new park period failed %d at once", n)
	}
	p.take()
	if n := p.park(nil, t1.Add(time.Second)); n != 0 || p.holds() {
		t.Fatal("a forward that left nothing did not end the park period")
	}
	if n := p.park([]pushRequest{parkedReq(5)}, t1.Add(parkLimit+time.Second)); n != 0 {
		t.Fatal("the park period did not restart after a forward left nothing")
	}
	if n := p.fail("shutting down"); n != 1 || p.holds() {
		t.Fatalf("fail answered %d, holds %v", n, p.holds())
	}
}
