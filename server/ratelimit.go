package server

import (
	"container/list"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Defaults of the failed-credential limiter.
const (
	// defaultAuthFailureBurst is how many credential checks an address may
	// fail in a row before it is refused at once (10).
	defaultAuthFailureBurst = 10
	// defaultAuthFailureEvery is how often an address earns one more
	// failure (1 s). A legitimate client that mistypes stays well under
	// it; an attacker guessing gets one PBKDF2 run a second per address.
	defaultAuthFailureEvery = time.Second
	// defaultAuthLimiterAddrs bounds the addresses the limiter remembers
	// (10,000, about 2 MB). The least recently seen is forgotten first, so
	// an attacker spraying addresses costs bounded memory; each forgotten
	// address starts again with a full budget, which is what spraying buys
	// anyway.
	defaultAuthLimiterAddrs = 10_000
)

// failureLimiter rate-limits failed credential checks per client address.
// Every check that would cost the server work (a PBKDF2 run, a call to the
// app's authenticator) is admitted only if its address's failure budget
// (a rate.Limiter's tokens) covers it and every check of that address still
// running; a failed check spends a token, a successful one spends none.
// An address over its budget is refused before any work is done, so at
// most burst checks from one address run at once however many arrive
// together. (A rate.Reservation cannot be given back once it has taken
// effect, hence the count of checks running.)
//
// mu is a leaf, held only for map, list and count updates: never while a
// check runs.
type failureLimiter struct {
	every time.Duration
	burst int
	max   int

	mu  sync.Mutex
	lru *list.List               // of *limiterEntry, most recently seen first
	m   map[string]*list.Element // key → element of lru
}

type limiterEntry struct {
	key      string
	lim      *rate.Limiter // its tokens are the failures the address may still make
	inflight int           // checks admitted and not yet done (guarded by mu)
}

func newFailureLimiter(every time.Duration, burst, max int) *failureLimiter {
	if every <= 0 {
		every = defaultAuthFailureEvery
	}
	if burst <= 0 {
		burst = defaultAuthFailureBurst
	}
	if max <= 0 {
		max = defaultAuthLimiterAddrs
	}
	return &failureLimiter{every: every, burst: burst, max: max, lru: list.New(), m: map[string]*list.Element{}}
}

// limiterKey is the address an attacker cannot cheaply multiply: an IPv4
// address, or an IPv6 address's /64 (one host commonly holds a whole /64).
func limiterKey(addr net.Addr) string {
	var ip net.IP
	switch a := addr.(type) {
	case *net.UDPAddr:
		ip = a.IP
	case *net.TCPAddr:
		ip = a.IP
	case nil:
		return ""
	default:
		host, _, err := net.SplitHostPort(a.String())
		if err != nil {
			return a.String()
		}
		ip = net.ParseIP(host)
		if ip == nil {
			return host
		}
	}
	if v4 := ip.To4(); v4 != nil {
		return v4.String()
	}
	return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
}

// entryLocked returns key's entry, remembering it as the most recently
// seen and forgetting the least recently seen beyond max. Called with mu
// held.
func (f *failureLimiter) entryLocked(key string) *limiterEntry {
	if e, ok := f.m[key]; ok {
		f.lru.MoveToFront(e)
		return e.Value.(*limiterEntry)
	}
	e := &limiterEntry{key: key, lim: rate.NewLimiter(rate.Every(f.every), f.burst)}
	f.m[key] = f.lru.PushFront(e)
	for f.lru.Len() > f.max {
		old := f.lru.Back()
		f.lru.Remove(old)
		delete(f.m, old.Value.(*limiterEntry).key)
	}
	return e
}

// take admits one check from addr. false: the address is over its failure
// budget; refuse it without checking. Otherwise the caller calls done
// once, with whether the check succeeded.
func (f *failureLimiter) take(addr net.Addr) (done func(ok bool), allowed bool) {
	key := limiterKey(addr)
	f.mu.Lock()
	defer f.mu.Unlock()
	e := f.entryLocked(key)
	if e.lim.TokensAt(time.Now())-float64(e.inflight) < 1 {
		return nil, false
	}
	e.inflight++
	var once sync.Once
	return func(ok bool) {
		once.Do(func() {
			f.mu.Lock()
			defer f.mu.Unlock()
			e.inflight--
			if !ok {
				e.lim.AllowN(time.Now(), 1)
			}
		})
	}, true
}

// size is how many addresses the limiter remembers.
func (f *failureLimiter) size() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.m)
}
