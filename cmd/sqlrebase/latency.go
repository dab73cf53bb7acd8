package main

import (
	"net"
	"os"
	"sync"
	"time"
)

// latencyConn is a UDP socket whose packets take an extra delay each way,
// as on a long link: what the demo uses to give each replica its seed
// latency inside the QUIC transport, rather than by sleeping in the app.
// Packets keep their order; the delay is the same for all, so a FIFO is a
// timer queue.
type latencyConn struct {
	net.PacketConn
	delay time.Duration

	out chan packet // waiting to be sent
	in  chan packet // received, waiting to be delivered

	mu       sync.Mutex
	deadline time.Time
	moved    chan struct{} // closed when the deadline changes, to wake ReadFrom
	closed   chan struct{}
	once     sync.Once
}

type packet struct {
	due  time.Time
	data []byte
	addr net.Addr
	err  error
}

// newLatencyConn wraps c; it owns c from then on.
func newLatencyConn(c net.PacketConn, delay time.Duration) *latencyConn {
	l := &latencyConn{PacketConn: c, delay: delay, out: make(chan packet, 4096), in: make(chan packet, 4096), closed: make(chan struct{}), moved: make(chan struct{})}
	go l.sender()
	go l.receiver()
	return l
}

func (l *latencyConn) sender() {
	for {
		select {
		case p := <-l.out:
			if !sleepUntil(p.due, l.closed) {
				return
			}
			l.PacketConn.WriteTo(p.data, p.addr)
		case <-l.closed:
			return
		}
	}
}

func (l *latencyConn) receiver() {
	for {
		buf := make([]byte, 65536)
		n, addr, err := l.PacketConn.ReadFrom(buf)
		p := packet{due: time.Now().Add(l.delay), data: buf[:n], addr: addr, err: err}
		select {
		case l.in <- p:
		case <-l.closed:
			return
		}
		if err != nil {
			return
		}
	}
}

func sleepUntil(t time.Time, stop <-chan struct{}) bool {
	d := time.Until(t)
	if d <= 0 {
		return true
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-stop:
		return false
	}
}

// WriteTo queues the packet; it leaves after the delay.
func (l *latencyConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	select {
	case <-l.closed:
		return 0, net.ErrClosed
	default:
	}
	p := packet{due: time.Now().Add(l.delay), data: append([]byte(nil), b...), addr: addr}
	select {
	case l.out <- p:
	default:
		// A full queue drops the packet, as a congested link would; QUIC
		// retransmits.
	}
	return len(b), nil
}

// ReadFrom returns the next packet once its delay has passed.
func (l *latencyConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		l.mu.Lock()
		deadline, moved := l.deadline, l.moved
		l.mu.Unlock()
		var timeout <-chan time.Time
		if !deadline.IsZero() {
			d := time.Until(deadline)
			if d <= 0 {
				return 0, nil, os.ErrDeadlineExceeded
			}
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case p := <-l.in:
			if p.err != nil {
				return 0, nil, p.err
			}
			if !sleepUntil(p.due, l.closed) {
				return 0, nil, net.ErrClosed
			}
			return copy(b, p.data), p.addr, nil
		case <-timeout:
			return 0, nil, os.ErrDeadlineExceeded
		case <-moved:
			// The deadline changed: look at it again.
		case <-l.closed:
			return 0, nil, net.ErrClosed
		}
	}
}

// SetReadDeadline bounds ReadFrom, including one already waiting (quic-go
// sets a deadline in the past to stop its reader).
func (l *latencyConn) SetReadDeadline(t time.Time) error {
	l.mu.Lock()
	l.deadline = t
	close(l.moved)
	l.moved = make(chan struct{})
	l.mu.Unlock()
	return nil
}

// SetDeadline sets the read deadline; writes never block.
func (l *latencyConn) SetDeadline(t time.Time) error { return l.SetReadDeadline(t) }

// Close stops both directions and closes the socket.
func (l *latencyConn) Close() error {
	var err error
	l.once.Do(func() {
		close(l.closed)
		err = l.PacketConn.Close()
	})
	return err
}

// SetReadBuffer and SetWriteBuffer pass quic-go's socket buffer sizing on to
// the real UDP socket. Without them quic-go cannot size the buffers of a
// wrapped socket and logs its "Not a *net.UDPConn?" warning on every run.
func (l *latencyConn) SetReadBuffer(n int) error {
	if c, ok := l.PacketConn.(interface{ SetReadBuffer(int) error }); ok {
		return c.SetReadBuffer(n)
	}
	return nil
}

// SetWriteBuffer: see SetReadBuffer.
func (l *latencyConn) SetWriteBuffer(n int) error {
	if c, ok := l.PacketConn.(interface{ SetWriteBuffer(int) error }); ok {
		return c.SetWriteBuffer(n)
	}
	return nil
}
