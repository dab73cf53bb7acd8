package server

import (
	"fmt"
	"net"
	"runtime"
	"testing"
	"time"

	"pgregory.net/rapid"
)

func udp(ip string) net.Addr { return &net.UDPAddr{IP: net.ParseIP(ip), Port: 4242} }

// TestFailureLimiterBudget: an address may fail burst checks, then is
// refused until it earns another; successes cost nothing; checks running
// at once count against the budget; other addresses are not affected.
func TestFailureLimiterBudget(t *testing.T) {
	f := newFailureLimiter(time.Hour, 3, 100)
	a, b := udp("192.0.2.1"), udp("192.0.2.2")
	for i := range 5 {
		done, ok := f.take(a)
		if !ok {
			t.Fatalf("success %d refused", i)
		}
		done(true)
	}
	for i := range 3 {
		done, ok := f.take(a)
		if !ok {
			t.Fatalf("failure %d of a budget of 3 refused", i)
		}
		done(false)
		done(false) // a second call is ignored
	}
	if _, ok := f.take(a); ok {
		t.Fatal("a fourth check admitted past a budget of 3")
	}
	if _, ok := f.take(&net.UDPAddr{IP: net.ParseIP("192.0.2.1"), Port: 9}); ok {
		t.Fatal("another port of the same address has a budget of its own")
	}
	// Checks running at once: at most the budget is admitted.
	var dones []func(bool)
	for {
		done, ok := f.take(b)
		if !ok {
			break
		}
		dones = append(dones, done)
		if len(dones) > 10 {
			t.Fatal("concurrent checks admitted past the budget")
		}
	}
	if len(dones) != 3 {
		t.Fatalf("%d concurrent checks admitted, want 3", len(dones))
	}
	dones[0](true) // one succeeded: its slot is free again
	if _, ok := f.take(b); !ok {
		t.Fatal("a finished successful check did not free its slot")
	}
}

// TestFailureLimiterRefills: a budget refills with time.
func TestFailureLimiterRefills(t *testing.T) {
	f := newFailureLimiter(20*time.Millisecond, 1, 10)
	a := udp("192.0.2.7")
	done, ok := f.take(a)
	if !ok {
		t.Fatal("first check refused")
	}
	done(false)
	if _, ok := f.take(a); ok {
		t.Fatal("admitted with no budget left")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if done, ok := f.take(a); ok {
			done(true)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the budget never refilled")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFailureLimiterKeys: IPv6 addresses of one /64 share a budget.
func TestFailureLimiterKeys(t *testing.T) {
	if k1, k2 := limiterKey(udp("2001:db8::1")), limiterKey(udp("2001:db8::ffff:1")); k1 != k2 {
		t.Fatalf("one /64, two keys: %s %s", k1, k2)
	}
	if k1, k2 := limiterKey(udp("2001:db8:0:1::1")), limiterKey(udp("2001:db8:0:2::1")); k1 == k2 {
		t.Fatalf("two /64s, one key: %s", k1)
	}
	if k := limiterKey(udp("::ffff:192.0.2.1")); k != "192.0.2.1" {
		t.Fatalf("a mapped IPv4 address: %s", k)
	}
	if k := limiterKey(nil); k != "" {
		t.Fatalf("no address: %q", k)
	}
}

// TestFailureLimiterBounded: an attacker spraying addresses does not grow
// the limiter past its bound, in entries or in heap; the addresses seen
// most recently are the ones kept.
func TestFailureLimiterBounded(t *testing.T) {
	const max = 1000
	f := newFailureLimiter(time.Second, 10, max)
	spray := func(n, from int) {
		for i := range n {
			ip := net.IPv4(10, byte((from+i)>>16), byte((from+i)>>8), byte(from+i))
			done, ok := f.take(&net.UDPAddr{IP: ip})
			if ok {
				done(false)
			}
		}
	}
	spray(max, 0)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	spray(100*max, max)
	runtime.GC()
	runtime.ReadMemStats(&after)
	if n := f.size(); n != max {
		t.Fatalf("the limiter remembers %d addresses, bound %d", n, max)
	}
	// 100 times the bound in new addresses: the heap holds no more than
	// the bound's worth (a few hundred bytes an entry), not 100 times it.
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap grew by %d bytes over %d new addresses (bound %d)", grew, 100*max, max)
	if grew > 1<<20 {
		t.Fatalf("heap grew by %d bytes spraying addresses past the bound", grew)
	}
	// The most recent address is remembered with its failure.
	n := 101*max - 1
	last := net.IPv4(10, byte(n>>16), byte(n>>8), byte(n))
	f.mu.Lock()
	e, ok := f.m[last.String()]
	f.mu.Unlock()
	if !ok {
		t.Fatal("the most recent address was evicted")
	}
	if tok := e.Value.(*limiterEntry).lim.Tokens(); tok > 9.5 {
		t.Fatalf("its failure was forgotten: %v tokens", tok)
	}
}

// TestFailureLimiterModel: any sequence of checks starting and ending,
// successfully or not, from a few addresses, with no time passing: an
// address never has more checks admitted at once than its budget, never
// more failures than its budget, and is refused only when those two
// together reach it.
func TestFailureLimiterModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		burst := rapid.IntRange(1, 5).Draw(t, "burst")
		f := newFailureLimiter(time.Hour, burst, 100)
		type running struct {
			addr int
			done func(bool)
		}
		var open []running
		failed := map[int]int{}
		inflight := map[int]int{}
		t.Repeat(map[string]func(*rapid.T){
			"take": func(t *rapid.T) {
				a := rapid.IntRange(0, 2).Draw(t, "addr")
				done, ok := f.take(udp(fmt.Sprintf("192.0.2.%d", a+1)))
				want := failed[a]+inflight[a] < burst
				if ok != want {
					t.Fatalf("addr %d: %d failed, %d running, budget %d: admitted %v", a, failed[a], inflight[a], burst, ok)
				}
				if ok {
					open = append(open, running{a, done})
					inflight[a]++
				}
			},
			"finish": func(t *rapid.T) {
				if len(open) == 0 {
					t.Skip("nothing running")
				}
				i := rapid.IntRange(0, len(open)-1).Draw(t, "which")
				ok := rapid.Bool().Draw(t, "ok")
				r := open[i]
				open = append(open[:i], open[i+1:]...)
				r.done(ok)
				inflight[r.addr]--
				if !ok {
					failed[r.addr]++
				}
			},
		})
	})
}
