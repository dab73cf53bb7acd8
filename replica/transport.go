package replica

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// Remote says where a replica syncs and how it proves who it is and who the
// server is. A replica opened with a Remote runs a sync loop until Close.
type Remote struct {
	// Addr is the server's UDP address, "host:port". It is resolved again
	// on every connection attempt, so a name that moves is followed.
	Addr string
	// Alternates are more nodes of the same service (a cluster's other
	// gateways, docs/CLUSTER.md), "host:port" each, tried in order after
	// Addr. The sync loop stays on a node that works and moves to the next
	// one (wrapping round to Addr) when a node cannot be reached, does not
	// answer Hello within the handshake timeout, or refuses in a way that
	// retrying may cure (CodeShuttingDown, CodeBusy, CodeInternal). A fatal
	// refusal from any node is fatal: the nodes share the credentials.
	// Every node must present a certificate that Fingerprint or CAFile
	// accepts: in a cluster, sign the nodes' certificates with one CA, or
	// give every node the same key. Status.Node says which one is in use.
	Alternates []string
	// DeadAfter is how long a connection may hear nothing from its node
	// before it counts as dead and the replica moves on (QUIC's idle
	// timeout; the replica sends a keep-alive every quarter of it). 0:
	// 20 s with one node, 5 s with Alternates, so that a replica of a node
	// that was killed (it sends nothing, not even a close) fails over
	// within the cluster's 5 s (docs/CLUSTER.md) rather than after 20 s.
	// The price is a keep-alive packet each way every 1.25 s per idle
	// connection.
	DeadAfter time.Duration
	// Database is the server's name for the database this replica mirrors.
	Database string
	// Credential is the secret the server knows the database's clients by:
	// a static one. For credentials that expire (a JWT), set Token instead;
	// setting both is an Open error.
	Credential string
	// Token, if set, is called for the credential before every connection
	// attempt, so that each session presents a fresh token. It runs on the
	// sync goroutine, with no replica lock held; ctx ends when the replica
	// closes, and bounds the call to a connection attempt's timeout. An
	// error is retried with the loop's backoff (Status.LastError shows
	// it), unless it wraps ErrNoToken, which stops sync for good. When the
	// server ends a session because its token expired or was revoked
	// (CodeCredentialExpired, CodeCredentialRevoked), the replica calls
	// Token again at once and reconnects: nothing pending is lost or
	// applied twice, and the app sees no error. A token the server then
	// refuses for good (CodeUnauthorized) stops sync with the server's
	// reason, as a wrong Credential does.
	Token func(ctx context.Context) (string, error)

	// Fingerprint pins the server's certificate ("sha256:<64 hex>", as
	// `sqlrebase serve` prints it). Give it or CAFile, never neither:
	// there is no mode that trusts any server.
	Fingerprint string
	// CAFile is a PEM bundle of the CAs that sign the server's certificate
	// for ServerName (which defaults to the host of Addr).
	CAFile     string
	ServerName string

	// Transport, if set, carries this replica's session over a connection
	// shared with the other replicas of the process that use it. Nil: the
	// replica makes a Transport of its own and closes it at Close.
	Transport *Transport

	// OnSnapshotProgress, if set, is called as a snapshot arrives with the
	// pages received so far and the total. It runs on the sync goroutine
	// and must not block.
	OnSnapshotProgress func(done, total uint32)

	// MaxMessage is the largest message this replica takes from the server
	// (0: 64 MiB, at least 1 MiB). The server plans every message to it,
	// and sends a version larger than one message in parts.
	MaxMessage uint32
	// MaxVersionBytes is the largest version, in bytes of pages, this
	// replica holds in memory to apply it (0: 1 GiB, at least 1 MiB). The
	// server ends the session with a fatal "version too large" error
	// rather than send a larger one.
	MaxVersionBytes uint64
}

// receiveLimits are what the replica states in its Hello.
func (rm *Remote) receiveLimits() protocol.ReceiveLimits {
	return protocol.ReceiveLimits{MaxMessage: rm.MaxMessage, MaxVersionBytes: rm.MaxVersionBytes}.WithDefaults()
}

// validate checks what a Remote must hold before anything is dialed, so
// that a misconfiguration fails Open instead of a retry loop.
func (rm *Remote) validate() error {
	switch {
	case rm.Addr == "":
		return errors.New("replica: Remote.Addr is required (Alternates only add to it)")
	case rm.Database == "":
		return errors.New("replica: Remote.Database is required")
	case rm.Credential != "" && rm.Token != nil:
		return errors.New("replica: set Remote.Credential (a static secret) or Remote.Token (a token source), not both")
	case rm.Fingerprint == "" && rm.CAFile == "":
		return errors.New("replica: Remote needs the server's certificate fingerprint (Fingerprint, sha256:...) or a CA file (CAFile); there is no insecure mode")
	}
	if _, _, err := net.SplitHostPort(rm.Addr); err != nil {
		return fmt.Errorf("replica: Remote.Addr %q: %w", rm.Addr, err)
	}
	for i, a := range rm.Alternates {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("replica: Remote.Alternates[%d] %q: %w", i, a, err)
		}
	}
	if err := rm.receiveLimits().Check(); err != nil {
		return fmt.Errorf("replica: Remote.MaxMessage or MaxVersionBytes: %w", err)
	}
	for _, a := range rm.nodes() {
		if _, err := rm.tlsConfig(a); err != nil {
			return fmt.Errorf("replica: %w", err)
		}
	}
	return nil
}

// nodes are the addresses the sync loop dials, in order: Addr, then
// Alternates.
func (rm *Remote) nodes() []string {
	return append([]string{rm.Addr}, rm.Alternates...)
}

// credential is the credential for the next Hello: Token's answer, or the
// static Credential.
func (rm *Remote) credential(ctx context.Context) (string, error) {
	if rm.Token == nil {
		return rm.Credential, nil
	}
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	tok, err := rm.Token(ctx)
	if err != nil {
		return "", fmt.Errorf("%w: %w", errTokenSource, err)
	}
	return tok, nil
}

// tlsConfig builds the client TLS configuration for the Remote's node at
// addr: without a ServerName, a CA-signed certificate is checked for addr's
// host.
func (rm *Remote) tlsConfig(addr string) (*tls.Config, error) {
	name := rm.ServerName
	if name == "" && rm.CAFile != "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		name = host
	}
	return protocol.ClientTLS(rm.Fingerprint, rm.CAFile, name)
}

// peerKey identifies a connection that replicas may share: the same address
// and the same way of trusting the server.
func (rm *Remote) peerKey(addr string) string {
	return addr + "\x00" + rm.Fingerprint + "\x00" + rm.CAFile + "\x00" + rm.ServerName + "\x00" + rm.deadAfter().String()
}

// Idle timeouts of a replica's connection (Remote.DeadAfter).
const (
	deadAfterAlone      = 20 * time.Second // QUIC's usual, and the server's own
	deadAfterAlternates = 5 * time.Second
)

// silenceMargin is what silenceLimit allows beyond a keep-alive period
// for the PING's round trip and a loss or two of it (each retransmitted
// after a probe timeout, tens of milliseconds on a LAN).
const silenceMargin = time.Second

// keepAliveFor is the keep-alive period of a connection that counts its
// node dead after deadAfter of silence: a quarter of it, so that three
// PINGs in a row may be lost, and at most QUIC's usual 5 s.
func keepAliveFor(deadAfter time.Duration) time.Duration {
	return min(protocol.QUICConfig().KeepAlivePeriod, deadAfter/4)
}

// silenceLimit is how long a session that waits for an ack lets its
// connection receive nothing at all before it counts the node dead
// (errNodeSilent): quic-go sends a PING once nothing has arrived for the
// keep-alive period, and a live node acknowledges it within a round trip,
// whatever its application does; a node that was killed sends nothing.
// The idle timeout (deadAfter) waits four keep-alive periods, for an idle
// replica that loses nothing by waiting; one that waits for an ack moves
// on after one and silenceMargin (2.25 s with Alternates, not 5 s), and
// costs no packet more than the keep-alive already sends.
func silenceLimit(deadAfter time.Duration) time.Duration {
	return keepAliveFor(deadAfter) + silenceMargin
}

// deadAfter is DeadAfter or its default.
func (rm *Remote) deadAfter() time.Duration {
	switch {
	case rm.DeadAfter > 0:
		return rm.DeadAfter
	case len(rm.Alternates) > 0:
		return deadAfterAlternates
	}
	return deadAfterAlone
}

// TransportOptions configure a Transport.
type TransportOptions struct {
	// PacketConn is the UDP socket to use, for instance a wrapper that adds
	// latency or loss in tests and demos. Nil: a new UDP socket on an
	// ephemeral port, closed with the Transport. A PacketConn given here is
	// the caller's: Close stops using it but does not close it.
	PacketConn net.PacketConn
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// HandshakeTimeout bounds a connection attempt's QUIC handshake and the
	// wait for the server's Welcome (default 5 s). An attempt on a server
	// that died half way waits this long before the next one; raise it only
	// for links slower than about 2 s each way.
	HandshakeTimeout time.Duration
}

// Transport owns one QUIC endpoint (one UDP socket) and at most one QUIC
// connection per server, which the replicas using it share: each replica's
// session is a stream of its own on that connection (docs/PROTOCOL.md: one
// connection per process, one stream per database). Its methods are safe
// for concurrent use.
type Transport struct {
	opts TransportOptions
	log  *slog.Logger

	mu     sync.Mutex
	qt     *quic.Transport // created at the first dial
	own    net.PacketConn  // the socket we created, if any
	peers  map[string]*peer
	closed bool
}

// defaultHandshakeTimeout is quic-go's own default.
const defaultHandshakeTimeout = 5 * time.Second

// handshakeTimeout is HandshakeTimeout or its default.
func (t *Transport) handshakeTimeout() time.Duration {
	if t.opts.HandshakeTimeout > 0 {
		return t.opts.HandshakeTimeout
	}
	return defaultHandshakeTimeout
}

// ErrTransportClosed is returned by a closed Transport.
var ErrTransportClosed = errors.New("replica: transport closed")

// NewTransport returns a Transport. It opens no socket until a replica
// first connects.
func NewTransport(opts TransportOptions) *Transport {
	t := &Transport{opts: opts, log: opts.Logger, peers: map[string]*peer{}}
	if t.log == nil {
		t.log = slog.Default()
	}
	return t
}

// Close closes every connection and the socket the Transport made. Close
// the replicas that use it first; their sessions otherwise fail and retry
// until they are closed.
func (t *Transport) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	peers := t.peers
	t.peers = map[string]*peer{}
	qt, own := t.qt, t.own
	t.mu.Unlock()
	for _, p := range peers {
		p.close()
	}
	var errs []error
	if qt != nil {
		errs = append(errs, qt.Close())
	}
	if own != nil {
		if err := own.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// endpoint returns the QUIC transport, creating it (and its socket) at the
// first call.
func (t *Transport) endpoint() (*quic.Transport, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrTransportClosed
	}
	if t.qt != nil {
		return t.qt, nil
	}
	pc := t.opts.PacketConn
	if pc == nil {
		udp, err := net.ListenUDP("udp", nil)
		if err != nil {
			return nil, fmt.Errorf("open UDP socket: %w", err)
		}
		pc, t.own = udp, udp
	}
	t.qt = &quic.Transport{Conn: pc}
	return t.qt, nil
}

// acquire returns the shared peer for rm's node at addr, counting one more
// user; the caller calls release when it is done with it (at Close of its
// replica).
func (t *Transport) acquire(rm *Remote, addr string) (*peer, error) {
	conf, err := rm.tlsConfig(addr)
	if err != nil {
		return nil, err
	}
	key := rm.peerKey(addr)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrTransportClosed
	}
	p := t.peers[key]
	if p == nil {
		p = &peer{t: t, key: key, addr: addr, tls: conf, deadAfter: rm.deadAfter(), dialing: make(chan struct{}, 1)}
		t.peers[key] = p
	}
	p.users++
	return p, nil
}

// release drops one user of p; the last one closes its connection.
func (t *Transport) release(p *peer) {
	t.mu.Lock()
	p.users--
	last := p.users == 0
	if last && t.peers[p.key] == p {
		delete(t.peers, p.key)
	}
	t.mu.Unlock()
	if last {
		p.close()
	}
}

// peer is one server as seen from a Transport: its address, how to trust
// it, and the current connection, if any, which its users share.
type peer struct {
	t     *Transport
	key   string
	addr  string
	tls   *tls.Config
	users int // guarded by t.mu
	// deadAfter is the connection's idle timeout (Remote.DeadAfter).
	deadAfter time.Duration

	// dialing is a lock that a waiter can give up on (ctx): one dial at a
	// time, and the others then use its connection.
	dialing chan struct{}
	mu      sync.Mutex
	conn    *quic.Conn
	closed  bool
}

// connection returns a live connection to the peer, dialing one if there is
// none or the last one died.
func (p *peer) connection(ctx context.Context) (*quic.Conn, error) {
	select {
	case p.dialing <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-p.dialing }()
	p.mu.Lock()
	c, closed := p.conn, p.closed
	p.mu.Unlock()
	if closed {
		return nil, ErrTransportClosed
	}
	if c != nil && c.Context().Err() == nil {
		return c, nil
	}
	qt, err := p.t.endpoint()
	if err != nil {
		return nil, err
	}
	addr, err := net.ResolveUDPAddr("udp", p.addr)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", p.addr, err)
	}
	cfg := protocol.QUICConfig()
	cfg.HandshakeIdleTimeout = p.t.handshakeTimeout()
	// The smaller of the two sides' idle timeouts holds: the server's is
	// 20 s, so a shorter one here is what this connection gets.
	cfg.MaxIdleTimeout = p.deadAfter
	cfg.KeepAlivePeriod = keepAliveFor(p.deadAfter)
	c, err = qt.Dial(ctx, addr, p.tls, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", p.addr, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		c.CloseWithError(0, "closed")
		return nil, ErrTransportClosed
	}
	p.conn = c
	p.mu.Unlock()
	p.t.log.Debug("sqlrebase: connected", "server", p.addr)
	return c, nil
}

// openStream opens a session stream on the shared connection, and
// returns the connection too (see drop).
func (p *peer) openStream(ctx context.Context) (*quic.Conn, *quic.Stream, error) {
	c, err := p.connection(ctx)
	if err != nil {
		return nil, nil, err
	}
	s, err := c.OpenStreamSync(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("open stream to %s: %w", p.addr, err)
	}
	return c, s, nil
}

// drop closes c if it is still the peer's connection, so that the next
// session dials afresh. A session calls it when the server said it is
// shutting down or stopped answering: a server that stops without closing
// its connections leaves them looking alive until the idle timeout, and a
// stream opened on one would wait that long for an answer.
func (p *peer) drop(c *quic.Conn) {
	p.mu.Lock()
	if p.conn != c {
		p.mu.Unlock()
		return
	}
	p.conn = nil
	p.mu.Unlock()
	c.CloseWithError(0, "server went away")
}

func (p *peer) close() {
	p.mu.Lock()
	c := p.conn
	p.conn, p.closed = nil, true
	p.mu.Unlock()
	if c != nil {
		c.CloseWithError(0, "client closed")
	}
}
