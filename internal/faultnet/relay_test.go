package faultnet

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// echo is a UDP server that answers every datagram with "<payload>|<sender
// address>", so that tests see which upstream socket the relay used.
type echo struct {
	conn *net.UDPConn
	done chan struct{}
}

func startEcho(t *testing.T, addr string) *echo {
	t.Helper()
	la, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.ListenUDP("udp", la)
	if err != nil {
		t.Fatal(err)
	}
	e := &echo{conn: c, done: make(chan struct{})}
	go func() {
		defer close(e.done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			c.WriteToUDP([]byte(string(buf[:n])+"|"+from.String()), from)
		}
	}()
	t.Cleanup(e.close)
	return e
}

func (e *echo) close() { e.conn.Close(); <-e.done }

func (e *echo) addr() string { return e.conn.LocalAddr().String() }

// client is a UDP socket talking to the relay.
type client struct {
	t    *testing.T
	conn *net.UDPConn
	to   *net.UDPAddr
}

func newClient(t *testing.T, relay string) *client {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	to, err := net.ResolveUDPAddr("udp", relay)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, conn: c, to: to}
}

func (c *client) send(msg string) {
	c.t.Helper()
	if _, err := c.conn.WriteToUDP([]byte(msg), c.to); err != nil {
		c.t.Fatal(err)
	}
}

// recv returns the replies that arrive within wait: a bounded wait, and the
// only way to see that a packet did not arrive.
func (c *client) recv(wait time.Duration) []string {
	var got []string
	buf := make([]byte, 2048)
	deadline := time.Now().Add(wait)
	for {
		c.conn.SetReadDeadline(deadline)
		n, _, err := c.conn.ReadFromUDP(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return got
			}
			c.t.Fatal(err)
		}
		got = append(got, string(buf[:n]))
	}
}

// recvN waits for n replies, at most wait.
func (c *client) recvN(n int, wait time.Duration) []string {
	c.t.Helper()
	var got []string
	buf := make([]byte, 2048)
	deadline := time.Now().Add(wait)
	for len(got) < n {
		c.conn.SetReadDeadline(deadline)
		m, _, err := c.conn.ReadFromUDP(buf)
		if err != nil {
			c.t.Fatalf("after %d of %d replies: %v", len(got), n, err)
		}
		got = append(got, string(buf[:m]))
	}
	return got
}

func startRelay(t *testing.T, target string, p Profile) *Relay {
	t.Helper()
	r, err := Listen(Config{Target: target, Seed: 1, Profile: p})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestRelayForwardsBothWaysOneUpstreamPerClient(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	r := startRelay(t, e.addr(), Profile{})
	a, b := newClient(t, r.Addr()), newClient(t, r.Addr())
	ups := map[*client]map[string]bool{a: {}, b: {}}
	for i := 0; i < 20; i++ {
		for _, c := range []*client{a, b} {
			c.send(fmt.Sprint(i))
			got := c.recvN(1, 5*time.Second)[0]
			msg, from, _ := strings.Cut(got, "|")
			if msg != fmt.Sprint(i) {
				t.Fatalf("sent %d, got back %q", i, got)
			}
			ups[c][from] = true
		}
	}
	if len(ups[a]) != 1 || len(ups[b]) != 1 {
		t.Fatalf("a client's packets reached the server from several addresses: %v", ups)
	}
	for fa := range ups[a] {
		if ups[b][fa] {
			t.Fatalf("two clients share the upstream address %s", fa)
		}
	}
	// The relay counts a packet as sent after its write returns, so the
	// echo's last reply can reach the client just before the count moves
	// (CI saw Sent [39 40] once): wait, boundedly, for the counts to settle.
	want := func(s Stats) bool {
		return s.Clients == 2 && s.Received == [2]uint64{40, 40} && s.Sent == [2]uint64{40, 40}
	}
	deadline := time.Now().Add(5 * time.Second)
	for s := r.Stats(); !want(s); s = r.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, want 2 clients, 40 packets each way", s)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRelayLossAndDuplication(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	r := startRelay(t, e.addr(), Profile{Loss: 1})
	c := newClient(t, r.Addr())
	for i := 0; i < 10; i++ {
		c.send("x")
	}
	if got := c.recv(300 * time.Millisecond); len(got) != 0 {
		t.Fatalf("total loss let %d through", len(got))
	}
	if s := r.Stats(); s.Lost[0] != 10 {
		t.Fatalf("stats %+v, want 10 lost up", s)
	}

	if err := r.SetProfile(Profile{Duplicate: 1}); err != nil {
		t.Fatal(err)
	}
	c.send("y") // two copies up, two echoes, each sent down twice
	got := c.recvN(4, 5*time.Second)
	if extra := c.recv(200 * time.Millisecond); len(extra) != 0 {
		t.Fatalf("more than 4 copies: %v %v", got, extra)
	}
	if s := r.Stats(); s.Duplicated != [2]uint64{1, 2} {
		t.Fatalf("stats %+v, want 1 duplicated up, 2 down", s)
	}
}

func TestRelayDelay(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	const d = 60 * time.Millisecond
	r := startRelay(t, e.addr(), Profile{Delay: d, Jitter: 20 * time.Millisecond})
	c := newClient(t, r.Addr())
	for i := 0; i < 5; i++ {
		start := time.Now()
		c.send("x")
		c.recvN(1, 5*time.Second)
		if rtt := time.Since(start); rtt < 2*d {
			t.Fatalf("round trip %v, below the two delays of %v", rtt, d)
		}
	}
}

func TestRelayPartition(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	r := startRelay(t, e.addr(), Profile{})
	a, b := newClient(t, r.Addr()), newClient(t, r.Addr())
	a.send("hello") // a is client 1, b client 2
	a.recvN(1, 5*time.Second)
	b.send("hello")
	b.recvN(1, 5*time.Second)

	// Cut the server's packets to a only: a's requests still reach the
	// server (the echo answers), but no answer reaches a.
	if err := r.SetProfile(Profile{Partitions: []Partition{{Until: time.Hour, Dir: Down, Client: 1}}}); err != nil {
		t.Fatal(err)
	}
	a.send("cut")
	b.send("open")
	b.recvN(1, 5*time.Second)
	if got := a.recv(300 * time.Millisecond); len(got) != 0 {
		t.Fatalf("partitioned client got %v", got)
	}
	s := r.Stats()
	if s.Partitioned != [2]uint64{0, 1} || s.Received[0] != 4 {
		t.Fatalf("stats %+v, want one packet partitioned down and all 4 up received", s)
	}

	// A partition in the past has healed.
	if err := r.SetProfile(Profile{Partitions: []Partition{{Until: r.Elapsed(), Dir: Both}}}); err != nil {
		t.Fatal(err)
	}
	a.send("healed")
	if got := a.recvN(1, 5*time.Second); !strings.HasPrefix(got[0], "healed|") {
		t.Fatalf("after healing: %v", got)
	}
}

// TestRelayServerRestarts: with no server listening, packets are lost; once
// one listens on the same port again, the same flows work.
func TestRelayServerRestarts(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	addr := e.addr()
	r := startRelay(t, addr, Profile{})
	c := newClient(t, r.Addr())
	c.send("1")
	c.recvN(1, 5*time.Second)
	e.close()
	for i := 0; i < 5; i++ {
		c.send("down")
	}
	if got := c.recv(200 * time.Millisecond); len(got) != 0 {
		t.Fatalf("no server, yet %v", got)
	}
	startEcho(t, addr)
	c.send("2")
	if got := c.recvN(1, 5*time.Second); !strings.HasPrefix(got[0], "2|") {
		t.Fatalf("after the restart: %v", got)
	}
}

func TestRelayRefusesBadProfile(t *testing.T) {
	if _, err := Listen(Config{Target: "127.0.0.1:1", Profile: Profile{Loss: 2}}); !errors.Is(err, ErrProfile) {
		t.Fatalf("Listen: %v, want ErrProfile", err)
	}
	r := startRelay(t, "127.0.0.1:1", Profile{})
	if err := r.SetProfile(Profile{Delay: -1}); !errors.Is(err, ErrProfile) {
		t.Fatalf("SetProfile: %v, want ErrProfile", err)
	}
	if p := r.Profile(); p.Delay != 0 || p.Loss != 0 || len(p.Partitions) != 0 {
		t.Fatalf("a refused profile was applied: %+v", r.Profile())
	}
}

// TestRelayCloseStopsEverything: Close, with packets still delayed and
// several flows open, returns and leaves no goroutine behind.
func TestRelayCloseStopsEverything(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	before := runtime.NumGoroutine()
	r, err := Listen(Config{Target: e.addr(), Profile: Profile{Delay: 5 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		c := newClient(t, r.Addr())
		c.send("held")
	}
	waitFor(t, func() bool { return r.Stats().Clients == 3 })
	done := make(chan error, 1)
	go func() { done <- r.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Close hangs:\n%s", goroutines())
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitFor(t, func() bool { return runtime.NumGoroutine() <= before })
}

// TestRelayConcurrentUse runs clients, profile changes and Stats at once,
// for the race detector.
func TestRelayConcurrentUse(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	r := startRelay(t, e.addr(), Profile{Loss: 0.1, Duplicate: 0.1, Reorder: 0.2, Jitter: time.Millisecond, ReorderDelay: 3 * time.Millisecond})
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		c := newClient(t, r.Addr())
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				c.conn.WriteToUDP([]byte("x"), c.to)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for j := 0; j < 50; j++ {
			r.SetProfile(Profile{Loss: float64(j%3) / 10})
			r.Stats()
		}
	}()
	wg.Wait()
	waitFor(t, func() bool { s := r.Stats(); return s.Received[0] == 200 })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met in 10 s:\n%s", goroutines())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func goroutines() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}
