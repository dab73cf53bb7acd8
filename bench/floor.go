package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// The floors: what the machine allows for the work the end-to-end numbers
// measure, measured in the same run with the same TLS and QUIC settings, so
// that each of our numbers is read against what it cannot beat.

// cpuTime is the process's user and system CPU time so far. Server and
// clients of a bench share the process, so a difference of two is the CPU of
// both; the bare broadcast's clients do the same reading work as ours, so
// the comparison of the two is fair.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// bareServer is a QUIC listener with the server's TLS and QUIC
// configuration and nothing of ours: the floor of the transport.
type bareServer struct {
	ln          *quic.Listener
	tr          *quic.Transport
	udp         net.PacketConn
	fingerprint string
}

func listenBare(dir string) (*bareServer, error) {
	cert, _, err := protocol.LoadOrCreateCertificate(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), []string{"127.0.0.1"})
	if err != nil {
		return nil, err
	}
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	tr := &quic.Transport{Conn: udp}
	ln, err := tr.Listen(protocol.ServerTLS(cert), protocol.QUICConfig())
	if err != nil {
		tr.Close()
		udp.Close()
		return nil, err
	}
	return &bareServer{ln: ln, tr: tr, udp: udp, fingerprint: protocol.Fingerprint(cert.Certificate[0])}, nil
}

func (b *bareServer) close() {
	b.ln.Close()
	b.tr.Close()
	b.udp.Close()
}

// dialBare opens a connection and a stream to b and announces the stream
// with one byte, so that the server's AcceptStream sees it.
func (b *bareServer) dialBare(ctx context.Context, conf *tls.Config) (*quic.Conn, *quic.Stream, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(dctx, b.udp.LocalAddr().String(), conf, protocol.QUICConfig())
	if err != nil {
		return nil, nil, err
	}
	s, err := conn.OpenStreamSync(dctx)
	if err == nil {
		_, err = s.Write([]byte{0})
	}
	if err != nil {
		conn.CloseWithError(0, "")
		return nil, nil, err
	}
	return conn, s, nil
}

// acceptBare accepts one connection and its stream, and reads the byte
// that announced it.
func (b *bareServer) acceptBare(ctx context.Context) (*quic.Conn, *quic.Stream, error) {
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := b.ln.Accept(actx)
	if err != nil {
		return nil, nil, err
	}
	s, err := conn.AcceptStream(actx)
	if err == nil {
		_, err = io.ReadFull(s, make([]byte, 1))
	}
	if err != nil {
		conn.CloseWithError(0, "")
		return nil, nil, err
	}
	return conn, s, nil
}

// frameBody is a length-prefixed frame without its length.
func frameBody(frame []byte) []byte {
	n, k := binary.Uvarint(frame)
	if k <= 0 || uint64(len(frame)-k) != n {
		return nil
	}
	return frame[k:]
}

// ConfirmFloor is the floor of Mutate to confirmed: the server's fsync of
// the commit plus one loopback QUIC round trip, each measured here.
type ConfirmFloor struct {
	Fsync, RoundTrip time.Duration // medians
}

// Total is the floor itself.
func (f ConfirmFloor) Total() time.Duration { return f.Fsync + f.RoundTrip }

// RunConfirmFloor measures one fsync of a small write into a file in dir
// (what a commit with synchronous=FULL costs at least) and one round trip of
// 100 bytes on a QUIC stream over loopback, samples times each.
func RunConfirmFloor(ctx context.Context, dir string, samples int) (ConfirmFloor, error) {
	f, err := os.Create(filepath.Join(dir, "fsync-floor"))
	if err != nil {
		return ConfirmFloor{}, err
	}
	defer f.Close()
	page := make([]byte, 4096)
	var syncs []time.Duration
	for i := range samples {
		start := time.Now()
		if _, err := f.WriteAt(page, int64(i%64)*4096); err != nil {
			return ConfirmFloor{}, err
		}
		if err := f.Sync(); err != nil {
			return ConfirmFloor{}, err
		}
		syncs = append(syncs, time.Since(start))
	}
	srv, err := listenBare(dir)
	if err != nil {
		return ConfirmFloor{}, err
	}
	defer srv.close()
	conf, err := protocol.ClientTLS(srv.fingerprint, "", "")
	if err != nil {
		return ConfirmFloor{}, err
	}
	cc, cs, err := srv.dialBare(ctx, conf)
	if err != nil {
		return ConfirmFloor{}, err
	}
	defer cc.CloseWithError(0, "")
	sc, ss, err := srv.acceptBare(ctx)
	if err != nil {
		return ConfirmFloor{}, err
	}
	defer sc.CloseWithError(0, "")
	echoed := make(chan error, 1)
	go func() {
		buf := make([]byte, 100)
		for {
			if _, err := io.ReadFull(ss, buf); err != nil {
				echoed <- err
				return
			}
			if _, err := ss.Write(buf); err != nil {
				echoed <- err
				return
			}
		}
	}()
	buf := make([]byte, 100)
	var rtts []time.Duration
	for range samples {
		start := time.Now()
		if _, err := cs.Write(buf); err != nil {
			return ConfirmFloor{}, err
		}
		if _, err := io.ReadFull(cs, buf); err != nil {
			return ConfirmFloor{}, err
		}
		rtts = append(rtts, time.Since(start))
	}
	return ConfirmFloor{Fsync: percentiles(syncs).P50, RoundTrip: percentiles(rtts).P50}, nil
}
