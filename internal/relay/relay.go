// Package relay is a userspace TCP relay for tests: it forwards every
// connection it accepts to one target, and can cut them all (a network
// partition between its clients and the target) and heal again. The
// multi-node tests put one in front of each route between two NATS nodes
// (docs/CLUSTER.md, "Failure and partition behaviour"); internal/faultnet
// does the same for UDP with loss and delay.
package relay

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// maxTagBytes is how much of a client's first bytes Options.Tag sees at
// most: a NATS route's first INFO fits with room to spare.
const maxTagBytes = 64 << 10

// Options configure a Relay.
type Options struct {
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Tag, if set, names a connection from the first bytes its client
	// sent: it is called with the growing prefix (up to 64 KiB) until it
	// returns a non-empty tag. Block then cuts one client's connections
	// among all that the relay carries (NATSRouteName tags NATS routes by
	// the server that opened them).
	Tag func(prefix []byte) string
}

// dialTimeout bounds the dial to the target for one accepted connection: a
// target that does not answer is as good as down.
const dialTimeout = 2 * time.Second

// Relay forwards TCP connections from its listener to a target. Its
// methods are safe for concurrent use.
//
// Goroutines: one accepts; each connection has one per direction. Close
// stops them all and waits.
//
// Lock order: mu is a leaf, never held across a socket call other than a
// Close.
type Relay struct {
	ln     net.Listener
	target string
	log    *slog.Logger
	tagger func([]byte) string

	mu      sync.Mutex // guards cut, closed, blocked, links and each link's tag
	cut     bool
	closed  bool
	blocked map[string]bool
	links   map[*link]struct{}
	wg      sync.WaitGroup
}

// link is one relayed connection: the client's side and the target's.
type link struct {
	down, up net.Conn
	tag      string // "" until Options.Tag names it
}

// abort closes both sides at once, with a reset rather than a FIN where the
// socket allows it, as a broken network would leave them.
func (l *link) abort() {
	for _, c := range []net.Conn{l.down, l.up} {
		if c == nil {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
}

// Listen starts a relay on addr ("127.0.0.1:0" picks a port) to target
// ("host:port"). The target may be down: a connection accepted meanwhile
// is closed once its dial fails.
func Listen(addr, target string, opts Options) (*Relay, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("relay: listen %s: %w", addr, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	r := &Relay{ln: ln, target: target, log: log, tagger: opts.Tag, blocked: map[string]bool{}, links: map[*link]struct{}{}}
	r.wg.Add(1)
	go r.accept()
	return r, nil
}

// Addr is the address clients connect to.
func (r *Relay) Addr() string { return r.ln.Addr().String() }

// Target is the address the relay forwards to.
func (r *Relay) Target() string { return r.target }

// Cut partitions the relay's clients from the target: every relayed
// connection is reset on both sides, and each connection accepted until
// Heal is reset at once.
func (r *Relay) Cut() {
	r.mu.Lock()
	r.cut = true
	links := r.links
	r.links = map[*link]struct{}{}
	r.mu.Unlock()
	for l := range links {
		l.abort()
	}
}

// Heal ends a Cut: connections accepted from now on are relayed again.
func (r *Relay) Heal() {
	r.mu.Lock()
	r.cut = false
	r.mu.Unlock()
}

// Block cuts the connections tagged tag (see Options.Tag): those relayed
// are reset on both sides, and each new one is reset as soon as it is
// tagged, until Unblock.
func (r *Relay) Block(tag string) {
	r.mu.Lock()
	r.blocked[tag] = true
	var cut []*link
	for l := range r.links {
		if l.tag == tag {
			cut = append(cut, l)
			delete(r.links, l)
		}
	}
	r.mu.Unlock()
	for _, l := range cut {
		l.abort()
	}
}

// Unblock ends a Block of tag.
func (r *Relay) Unblock(tag string) {
	r.mu.Lock()
	delete(r.blocked, tag)
	r.mu.Unlock()
}

// Links is the number of connections being relayed.
func (r *Relay) Links() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.links)
}

// UpstreamAddrs are the local addresses of the relay's connections to the
// target, so that a test can tell a relayed connection to the target from
// one that went around the relay.
func (r *Relay) UpstreamAddrs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for l := range r.links {
		out = append(out, l.up.LocalAddr().String())
	}
	return out
}

// Close stops the relay: it closes the listener and every connection, and
// returns once every goroutine has ended.
func (r *Relay) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	links := r.links
	r.links = map[*link]struct{}{}
	r.mu.Unlock()
	err := r.ln.Close()
	for l := range links {
		l.abort()
	}
	r.wg.Wait()
	return err
}

func (r *Relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			r.mu.Lock()
			closed := r.closed
			r.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return
			}
			r.log.Debug("relay: accept", "err", err)
			continue
		}
		r.wg.Add(1)
		go r.serve(c)
	}
}

// serve relays one accepted connection until either side ends it or the
// relay cuts it.
func (r *Relay) serve(down net.Conn) {
	defer r.wg.Done()
	l := &link{down: down}
	if r.refusing() {
		l.abort()
		return
	}
	up, err := net.DialTimeout("tcp", r.target, dialTimeout)
	if err != nil {
		r.log.Debug("relay: dial target", "target", r.target, "err", err)
		l.abort()
		return
	}
	l.up = up
	r.mu.Lock()
	if r.cut || r.closed {
		r.mu.Unlock()
		l.abort()
		return
	}
	r.links[l] = struct{}{}
	r.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() {
		r.forwardUp(l)
		done <- struct{}{}
	}()
	go func() {
		io.Copy(down, up)
		done <- struct{}{}
	}()
	<-done // one direction ended: end both
	r.mu.Lock()
	delete(r.links, l)
	r.mu.Unlock()
	l.abort()
	<-done
}

// forwardUp copies the client's bytes to the target, tagging the link from
// its first bytes if the relay has a tagger, and stops as soon as the
// link's tag is blocked.
func (r *Relay) forwardUp(l *link) {
	if r.tagger == nil {
		io.Copy(l.up, l.down)
		return
	}
	var prefix []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := l.down.Read(buf)
		if n > 0 {
			if len(prefix) < maxTagBytes && r.tagOf(l) == "" {
				prefix = append(prefix, buf[:min(n, maxTagBytes-len(prefix))]...)
				if tag := r.tagger(prefix); tag != "" && !r.setTag(l, tag) {
					return // blocked: the caller aborts the link
				}
			}
			if _, werr := l.up.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// tagOf returns l's tag.
func (r *Relay) tagOf(l *link) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return l.tag
}

// setTag tags l and reports whether it may go on (its tag is not blocked).
func (r *Relay) setTag(l *link, tag string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	l.tag = tag
	return !r.blocked[tag]
}

// NATSRouteName is an Options.Tag for a relay in front of NATS route
// ports: the name of the server that opened the route, from the INFO it
// sends after its CONNECT ("server_name"), or "" while the prefix does not
// hold it yet.
func NATSRouteName(prefix []byte) string {
	const key = `"server_name":"`
	i := bytes.Index(prefix, []byte(key))
	if i < 0 {
		return ""
	}
	rest := prefix[i+len(key):]
	j := bytes.IndexByte(rest, '"')
	if j <= 0 {
		return ""
	}
	return string(rest[:j])
}

func (r *Relay) refusing() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cut || r.closed
}
