package faultnet

import (
	"container/heap"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Config configures a Relay.
type Config struct {
	// Listen is the address clients send to (default "127.0.0.1:0").
	Listen string
	// Target is the server's UDP address, "host:port". It may have no
	// listener for a while (a server restarting): packets to it are lost
	// until it is back.
	Target string
	// Seed keys every fault decision.
	Seed uint64
	// Profile is the initial fault profile (SetProfile changes it).
	Profile Profile
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Stats counts what the relay did, per direction (index 0: Up, 1: Down).
type Stats struct {
	Received, Sent, Lost, Duplicated, Partitioned, Overflow [2]uint64
	// Clients is the number of client addresses seen.
	Clients int
}

// Relay forwards UDP between clients and one server, applying a fault
// profile. It keeps one upstream socket per client address, so the server
// sees each client as a peer of its own. Its methods are safe for concurrent
// use.
//
// Goroutines: one reads from clients, one per client reads from the server,
// one delivers delayed packets. Close stops them all and waits.
//
// Lock order: mu, then qmu; neither is held across a socket call.
type Relay struct {
	log    *slog.Logger
	seed   uint64
	target *net.UDPAddr
	front  *net.UDPConn
	start  time.Time

	profile atomic.Pointer[Profile]

	mu      sync.Mutex // guards flows, closed
	flows   map[string]*flow
	nflows  int
	closed  bool
	stopped chan struct{}
	wg      sync.WaitGroup

	qmu   sync.Mutex // guards queue
	queue delayQueue
	wake  chan struct{} // a packet was queued (buffered, 1)

	stats struct {
		received, sent, lost, duplicated, partitioned, overflow [2]atomic.Uint64
	}
}

// flow is one client address and the upstream socket the relay speaks to
// the server from on its behalf.
type flow struct {
	client int
	addr   *net.UDPAddr
	up     *net.UDPConn
	upIdx  uint64 // packets sent up; only the front reader touches it
}

// Listen starts a relay.
func Listen(cfg Config) (*Relay, error) {
	if err := cfg.Profile.Validate(); err != nil {
		return nil, err
	}
	target, err := net.ResolveUDPAddr("udp", cfg.Target)
	if err != nil {
		return nil, fmt.Errorf("faultnet: target %q: %w", cfg.Target, err)
	}
	listen := cfg.Listen
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	la, err := net.ResolveUDPAddr("udp", listen)
	if err != nil {
		return nil, fmt.Errorf("faultnet: listen %q: %w", listen, err)
	}
	front, err := net.ListenUDP("udp", la)
	if err != nil {
		return nil, fmt.Errorf("faultnet: %w", err)
	}
	r := &Relay{
		log: cfg.Logger, seed: cfg.Seed, target: target, front: front, start: time.Now(),
		flows: map[string]*flow{}, stopped: make(chan struct{}), wake: make(chan struct{}, 1),
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	p := cfg.Profile
	r.profile.Store(&p)
	r.wg.Add(2)
	go r.readFront()
	go r.deliver()
	return r, nil
}

// Addr is the address clients send to.
func (r *Relay) Addr() string { return r.front.LocalAddr().String() }

// Elapsed is the time since the relay started: the clock of Partition.
func (r *Relay) Elapsed() time.Duration { return time.Since(r.start) }

// SetProfile replaces the fault profile for the packets that follow.
// Packets already waiting out a delay keep it.
func (r *Relay) SetProfile(p Profile) error {
	if err := p.Validate(); err != nil {
		return err
	}
	r.profile.Store(&p)
	return nil
}

// Profile returns the current fault profile.
func (r *Relay) Profile() Profile { return *r.profile.Load() }

// Stats returns the counts so far.
func (r *Relay) Stats() Stats {
	var s Stats
	for i := 0; i < 2; i++ {
		s.Received[i] = r.stats.received[i].Load()
		s.Sent[i] = r.stats.sent[i].Load()
		s.Lost[i] = r.stats.lost[i].Load()
		s.Duplicated[i] = r.stats.duplicated[i].Load()
		s.Partitioned[i] = r.stats.partitioned[i].Load()
		s.Overflow[i] = r.stats.overflow[i].Load()
	}
	r.mu.Lock()
	s.Clients = r.nflows
	r.mu.Unlock()
	return s
}

// Close stops the relay: it closes every socket, drops the packets still
// delayed, and returns once every goroutine has ended.
func (r *Relay) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	close(r.stopped)
	errs := []error{r.front.Close()}
	for _, f := range r.flows {
		errs = append(errs, f.up.Close())
	}
	r.mu.Unlock()
	r.wg.Wait()
	return errors.Join(errs...)
}

// readFront reads the clients' packets and sends them up.
func (r *Relay) readFront() {
	defer r.wg.Done()
	buf := make([]byte, maxPacket)
	for {
		n, addr, err := r.front.ReadFromUDP(buf)
		if err != nil {
			if r.isClosed() {
				return
			}
			r.log.Debug("faultnet: read from clients", "err", err)
			continue
		}
		f, err := r.flowFor(addr)
		if err != nil {
			r.log.Debug("faultnet: no flow", "client", addr, "err", err)
			continue
		}
		pkt := Packet{Dir: Up, Client: f.client, Index: f.upIdx, At: r.Elapsed()}
		f.upIdx++
		r.forward(pkt, buf[:n], f.up, r.target)
	}
}

// readUp reads the server's packets for one client and sends them down.
func (r *Relay) readUp(f *flow) {
	defer r.wg.Done()
	buf := make([]byte, maxPacket)
	var idx uint64
	for {
		n, from, err := f.up.ReadFromUDP(buf)
		if err != nil {
			if r.isClosed() {
				return
			}
			// An unconnected socket reports no ICMP errors, so this is
			// rare; keep serving the flow.
			r.log.Debug("faultnet: read from server", "err", err)
			continue
		}
		if !from.IP.Equal(r.target.IP) || from.Port != r.target.Port {
			continue // not the server: a stray datagram
		}
		pkt := Packet{Dir: Down, Client: f.client, Index: idx, At: r.Elapsed()}
		idx++
		r.forward(pkt, buf[:n], r.front, f.addr)
	}
}

// forward applies Decide to one packet and sends or queues its copies.
func (r *Relay) forward(pkt Packet, b []byte, conn *net.UDPConn, to *net.UDPAddr) {
	d := dirIndex(pkt.Dir)
	r.stats.received[d].Add(1)
	v := Decide(r.seed, *r.profile.Load(), pkt)
	switch {
	case v.Partitioned:
		r.stats.partitioned[d].Add(1)
		return
	case v.Copies == 0:
		r.stats.lost[d].Add(1)
		return
	case v.Copies > 1:
		r.stats.duplicated[d].Add(1)
	}
	var payload []byte // copied once, when a copy has to wait
	for i := 0; i < v.Copies; i++ {
		if v.Delays[i] <= 0 {
			r.send(conn, to, b, d)
			continue
		}
		if payload == nil {
			payload = append([]byte(nil), b...)
		}
		r.enqueue(&delayed{at: time.Now().Add(v.Delays[i]), conn: conn, to: to, b: payload, dir: d})
	}
}

func (r *Relay) send(conn *net.UDPConn, to *net.UDPAddr, b []byte, d int) {
	if _, err := conn.WriteToUDP(b, to); err != nil {
		if !r.isClosed() {
			r.log.Debug("faultnet: write", "to", to, "err", err)
		}
		return
	}
	r.stats.sent[d].Add(1)
}

func (r *Relay) enqueue(p *delayed) {
	r.qmu.Lock()
	if r.queue.Len() >= MaxQueued {
		r.qmu.Unlock()
		r.stats.overflow[p.dir].Add(1)
		return
	}
	heap.Push(&r.queue, p)
	r.qmu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// deliver sends the delayed packets when they are due.
func (r *Relay) deliver() {
	defer r.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		var due []*delayed
		wait := time.Hour
		r.qmu.Lock()
		now := time.Now()
		for r.queue.Len() > 0 {
			next := r.queue[0]
			if next.at.After(now) {
				wait = next.at.Sub(now)
				break
			}
			due = append(due, heap.Pop(&r.queue).(*delayed))
		}
		r.qmu.Unlock()
		for _, p := range due {
			r.send(p.conn, p.to, p.b, p.dir)
		}
		if len(due) > 0 {
			continue // sending took time: look again before sleeping
		}
		timer.Reset(wait)
		select {
		case <-r.stopped:
			return
		case <-r.wake:
		case <-timer.C:
		}
	}
}

// flowFor returns the flow of a client address, opening its upstream
// socket the first time.
func (r *Relay) flowFor(addr *net.UDPAddr) (*flow, error) {
	key := addr.String()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	if f := r.flows[key]; f != nil {
		return f, nil
	}
	if r.nflows >= MaxClients {
		return nil, fmt.Errorf("faultnet: more than %d clients", MaxClients)
	}
	// Unconnected, so that a server not listening (restarting) causes no
	// ICMP errors on reads, and bound to the target's loopback address.
	up, err := net.ListenUDP("udp", &net.UDPAddr{IP: r.front.LocalAddr().(*net.UDPAddr).IP})
	if err != nil {
		return nil, fmt.Errorf("faultnet: upstream socket: %w", err)
	}
	r.nflows++
	f := &flow{client: r.nflows, addr: addr, up: up}
	r.flows[key] = f
	r.wg.Add(1)
	go r.readUp(f)
	return f, nil
}

func (r *Relay) isClosed() bool {
	select {
	case <-r.stopped:
		return true
	default:
		return false
	}
}

func dirIndex(d Direction) int {
	if d == Down {
		return 1
	}
	return 0
}

// delayed is a packet copy waiting out its delay.
type delayed struct {
	at   time.Time
	conn *net.UDPConn
	to   *net.UDPAddr
	b    []byte
	dir  int
}

// delayQueue is a min-heap of delayed packets by due time.
type delayQueue []*delayed

func (q delayQueue) Len() int           { return len(q) }
func (q delayQueue) Less(i, j int) bool { return q[i].at.Before(q[j].at) }
func (q delayQueue) Swap(i, j int)      { q[i], q[j] = q[j], q[i] }
func (q *delayQueue) Push(x any)        { *q = append(*q, x.(*delayed)) }
func (q *delayQueue) Pop() any {
	old := *q
	n := len(old)
	p := old[n-1]
	old[n-1] = nil
	*q = old[:n-1]
	return p
}
