package replica

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// The sync loop: one goroutine per replica opened with a Remote. It connects
// (sharing the Transport's connection), says Hello, catches up, pushes the
// pending mutations and keeps pushing as Mutate makes new ones, and rebases
// on whatever versions have arrived, all of them at once. It reconnects with
// exponential backoff and jitter after any error except a fatal refusal
// (unauthorized, unknown database, protocol version, a server certificate
// that fails verification), which it reports and then stops on. A session
// the server ends because its credential expired or was revoked is followed
// by an immediate reconnect, with a fresh credential from Remote.Token.
// A Remote with Alternates names several nodes: nodeCursor (failover.go)
// picks the one each attempt dials. Offline, it keeps retrying, and Mutate
// never waits for it.

// ErrNoRemote is returned by the network-waiting methods of a replica opened
// without Options.Remote.
var ErrNoRemote = errors.New("replica: no Remote configured")

// ErrHistoryAhead means the server has processed mutation ids of this client
// that this replica never issued: its files are older than the server's
// record of it (restored from a backup, or copied). Its new mutations would
// reuse those ids, and the server would skip them as duplicates, so the loop
// stops instead. Open a fresh replica (new files) to go on.
var ErrHistoryAhead = errors.New("replica: the server has processed mutations this replica never made (are its files restored from a backup?)")

// ErrServerBehind means the server's history ends before this replica's
// version: the server lost versions it once sent (restored from an older
// backup). Its snapshot would take the replica back, and the versions the
// replica's pending mutations were made on are gone, so the loop stops
// instead of retrying. Pending mutations stay queued.
var ErrServerBehind = errors.New("replica: the server's history is behind this replica")

// ErrUpgradeRequired means the server refuses this app build
// (Options.AppVersion is below its MinAppVersion): the app must be
// upgraded. The loop stops; pending mutations stay queued, and the
// upgraded build, opening the same files, pushes them.
var ErrUpgradeRequired = errors.New("replica: the server requires a newer app version")

// ErrClientCollected means the server no longer has a record of this
// client although it settled some of its mutations: the record was
// collected after the client was away longer than the server keeps it
// (server.Config.ClientTTL). The server cannot tell which of its pending
// mutations it applied, so the loop stops rather than push them again
// under ids it would take as new. The pending mutations stay queued
// (Pending lists them): the app opens a fresh replica (new files) and
// may issue them again there.
var ErrClientCollected = errors.New("replica: the server collected this client's record (away too long); open a fresh replica")

// ErrNoToken is what a Remote.Token source returns (wrapped) to say that
// no token will come (the user signed out, the refresh token was
// revoked): the sync loop stops, as on a fatal refusal, instead of
// retrying. Pending mutations stay queued.
var ErrNoToken = errors.New("replica: the token source has no token")

// errTokenSource prefixes a token source's failures, so that Status says
// where the error came from.
var errTokenSource = errors.New("replica: token source")

// Timeouts of one session.
const (
	// connectTimeout bounds a dial and the stream opening; QUIC's own
	// handshake timeout is shorter, this only guards the whole.
	connectTimeout = 30 * time.Second
	// stableSession is how long a welcomed session must last for the next
	// reconnect to start again from the shortest backoff; a server that
	// welcomes and then fails at once is retried ever more slowly.
	stableSession = 5 * time.Second
	// inboxSize is how many messages the stream reader may read ahead of
	// the sync goroutine. Past it, QUIC flow control holds the server back.
	inboxSize = 256
)

// netState is the sync loop's part of a Replica.
type netState struct {
	remote    Remote
	transport *Transport
	ownTrans  bool
	peers     []*peer       // one per node of the Remote (Addr, then Alternates)
	node      int           // index in peers of the node in use; the sync goroutine's
	wake      chan struct{} // Mutate's "there is something to push", capacity 1
	cancel    context.CancelFunc
	done      chan struct{} // closed when the loop goroutine returns

	mu             sync.Mutex
	connected      bool   // a session is welcomed and running
	lastErr        error  // what ended the last session or attempt; nil while connected
	fatal          error  // a refusal that stopped the loop for good
	welcomeVersion uint64 // the server's version in the current session's Welcome
	serverVersion  uint64 // the newest server version heard of
	nodeAddr       string // the node of the current session, or of the last one welcomed
	changed        chan struct{}
}

// fatalSignal is a replica's fatal sync error, once set. Handles watch it
// so that Wait returns the refusal instead of waiting forever.
type fatalSignal struct {
	once sync.Once
	ch   chan struct{}
	err  error
}

func newFatalSignal() *fatalSignal { return &fatalSignal{ch: make(chan struct{})} }

func (f *fatalSignal) set(err error) {
	f.once.Do(func() {
		f.err = err
		close(f.ch)
	})
}

// done is closed once the error is set; nil (never ready) for a nil signal.
func (f *fatalSignal) done() <-chan struct{} {
	if f == nil {
		return nil
	}
	return f.ch
}

// startSync validates nothing (Open did) and starts the loop.
func (r *Replica) startSync() error {
	rm := *r.opts.Remote
	n := &netState{remote: rm, transport: rm.Transport, wake: make(chan struct{}, 1), done: make(chan struct{}), changed: make(chan struct{})}
	if n.transport == nil {
		n.transport = NewTransport(TransportOptions{Logger: r.log})
		n.ownTrans = true
	}
	for _, addr := range rm.nodes() {
		p, err := n.transport.acquire(&rm, addr)
		if err != nil {
			for _, p := range n.peers {
				n.transport.release(p)
			}
			if n.ownTrans {
				n.transport.Close()
			}
			return fmt.Errorf("sync: %w", err)
		}
		n.peers = append(n.peers, p)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	r.net = n
	go r.syncLoop(ctx)
	return nil
}

// stopSync stops the loop and waits for it, then lets go of the connection.
func (r *Replica) stopSync() {
	n := r.net
	if n == nil {
		return
	}
	n.cancel()
	<-n.done
	for _, p := range n.peers {
		n.transport.release(p)
	}
	if n.ownTrans {
		n.transport.Close()
	}
	n.mu.Lock()
	n.connected = false
	n.broadcastLocked()
	n.mu.Unlock()
}

// kick tells the loop that Mutate queued something. It never blocks.
func (n *netState) kick() {
	if n == nil {
		return
	}
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

func (n *netState) broadcastLocked() {
	close(n.changed)
	n.changed = make(chan struct{})
}

func (n *netState) update(fn func()) {
	n.mu.Lock()
	fn()
	n.broadcastLocked()
	n.mu.Unlock()
}

// addr is the address of the node in use (or last tried).
func (n *netState) addr() string { return n.peers[n.node].addr }

func (r *Replica) syncLoop(ctx context.Context) {
	n := r.net
	defer close(n.done)
	attempt := 0
	var cur nodeCursor
	for {
		start := time.Now()
		n.node = cur.Cur
		// Files a failed write poisoned (a full disk) are repaired before
		// the next session, retried with the loop's backoff until it works.
		var welcomed, moveOn bool
		err := r.Repair(ctx)
		if err != nil {
			r.log.Warn("sqlrebase: repair failed, will retry", "err", err)
		} else {
			welcomed, err = r.session(ctx)
			moveOn = moveOnError(err, welcomed)
		}
		if ctx.Err() != nil {
			n.update(func() { n.connected = false })
			return
		}
		if fatalSyncError(err) {
			r.log.Error("sqlrebase: sync stopped", "server", n.addr(), "database", n.remote.Database, "err", err)
			n.update(func() { n.connected, n.lastErr, n.fatal = false, err, err })
			r.fatal.set(err)
			return
		}
		if welcomed {
			r.log.Info("sqlrebase: disconnected", "server", n.addr(), "database", n.remote.Database, "err", err)
		} else {
			r.log.Debug("sqlrebase: connection attempt failed", "server", n.addr(), "database", n.remote.Database, "err", err)
		}
		n.update(func() { n.connected, n.lastErr = false, err })
		attempt = nextAttempt(attempt, welcomed, time.Since(start), credentialEnded(err))
		var now bool
		if cur, now = cur.next(len(n.peers), welcomed, moveOn); now {
			r.log.Info("sqlrebase: trying the next node", "from", n.addr(), "to", n.peers[cur.Cur].addr, "database", n.remote.Database, "err", err)
			continue
		}
		t := time.NewTimer(backoff(attempt, backoffMin, backoffMax, rand.Float64()))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// fatalSyncError reports whether err is a refusal that the same attempt
// would meet again: retrying cannot help, the configuration must change.
func fatalSyncError(err error) bool {
	var re *protocol.RemoteError
	if errors.As(err, &re) {
		return re.Code.Fatal()
	}
	var cv *tls.CertificateVerificationError
	return errors.Is(err, protocol.ErrFingerprint) || errors.Is(err, ErrNoToken) || errors.Is(err, ErrHistoryAhead) || errors.Is(err, ErrServerBehind) || errors.Is(err, ErrClientCollected) || errors.As(err, &cv)
}

// inbox is the session's view of the stream reader: messages in order,
// then the error that ended the stream. The reader sends every message
// before its error, so a message still buffered when the error arrives is
// handed out first.
type inbox struct {
	msgs chan protocol.Message
	errc chan error
	err  error
}

// poll returns a waiting message without blocking: ok false when none is.
// After the reader failed it returns its error once nothing is left.
func (in *inbox) poll() (m protocol.Message, ok bool, err error) {
	select {
	case m := <-in.msgs:
		return m, true, nil
	default:
	}
	if in.err != nil {
		return nil, false, in.err
	}
	return nil, false, nil
}

// readLoop reads messages until the stream fails or ctx ends.
func readLoop(ctx context.Context, s io.Reader, in *inbox, limits protocol.Limits) {
	rd := protocol.NewReader(s, limits)
	for {
		m, err := rd.Read()
		if err != nil {
			// A server that had to cut a message short resets the stream
			// with the reason as its code: say it as the Error would.
			var reset *quic.StreamError
			if errors.As(err, &reset) && reset.Remote {
				err = fmt.Errorf("%w (stream reset)", &protocol.RemoteError{Code: protocol.Code(reset.ErrorCode)})
			}
			in.errc <- err
			return
		}
		if rd.Legacy() {
			// Protocol 3's framing: a server of protocol 3 or older,
			// which read our Hello's uvarint length as a huge uint32
			// and said so. It cannot serve this client: fatal.
			m = &protocol.Error{Code: protocol.CodeProtocolVersion, Message: fmt.Sprintf("the server speaks protocol 3 or older (it answered %v); this client speaks %d", describe(m), protocol.Version)}
		}
		select {
		case in.msgs <- m:
		case <-ctx.Done():
			return
		}
	}
}

// describe is a message as a refusal quotes it.
func describe(m protocol.Message) string {
	if e, ok := m.(*protocol.Error); ok {
		return e.Err().Error()
	}
	return fmt.Sprintf("a message of type %d", m.Type())
}

// session runs one connection's session until it fails or ctx ends.
// welcomed says whether the server accepted the Hello.
func (r *Replica) session(ctx context.Context) (welcomed bool, err error) {
	n := r.net
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The credential first, with no stream open: a token source may take
	// a round trip of its own, and the server allows a Hello 10 s.
	cred, err := n.remote.credential(sctx)
	if err != nil {
		return false, err
	}

	dctx, dcancel := context.WithTimeout(sctx, connectTimeout)
	conn, s, err := n.peers[n.node].openStream(dctx)
	dcancel()
	if err != nil {
		return false, err
	}
	defer func() {
		if serverGone(err) {
			n.peers[n.node].drop(conn)
		}
	}()
	// Closing the replica cancels both directions of the stream, which
	// unblocks a Write that flow control holds on a server gone quiet.
	stop := context.AfterFunc(sctx, func() { cancelStream(s) })
	in := &inbox{msgs: make(chan protocol.Message, inboxSize), errc: make(chan error, 1)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		readLoop(sctx, countingReader{s, &r.stats.received}, in, r.decodeLimits())
	}()
	// However the session ends, the stream is cancelled and its reader
	// has returned before we do: no goroutine outlives a session.
	defer func() {
		cancel()
		if stop() {
			cancelStream(s)
		}
		wg.Wait()
	}()

	r.writeMu.Lock()
	hello := &protocol.Hello{
		Protocol: protocol.Version, Database: n.remote.Database, ClientID: r.queue.ClientID(),
		Credential: cred, Version: r.files.Version(), Checksum: r.files.Checksum(),
		Receive: n.remote.receiveLimits(), AppVersion: r.opts.AppVersion,
	}
	r.writeMu.Unlock()
	if err := protocol.WriteMessage(countingWriter{s, &r.stats.sent}, hello); err != nil {
		return false, fmt.Errorf("send hello to %s: %w", n.addr(), err)
	}

	// The answer to Hello is one more round trip of the link: wait for it as
	// long as for the QUIC handshake. A server that died after the
	// handshake sends no stateless reset to a client that only waits, so
	// this, not the 20 s idle timeout, is when the replica tries again.
	w, err := awaitWelcome(sctx, in, n.transport.handshakeTimeout())
	if err != nil {
		if re := (*protocol.RemoteError)(nil); errors.As(err, &re) && re.Code == protocol.CodeUpgradeRequired {
			return false, fmt.Errorf("%w: %w", ErrUpgradeRequired, err)
		}
		return false, err
	}
	r.writeMu.Lock()
	issued, settled := r.queue.NextID()-1, r.queue.settled()
	r.writeMu.Unlock()
	if w.LastMutationID > issued {
		return false, fmt.Errorf("%w: server at mutation %d of client %s, this replica issued %d", ErrHistoryAhead, w.LastMutationID, hello.ClientID, issued)
	}
	if serverBehind(hello.Version, w.Version) {
		return false, fmt.Errorf("%w (version %d < %d): was it restored from a backup?", ErrServerBehind, w.Version, hello.Version)
	}
	if err := checkWelcome(w.LastMutationID, settled); err != nil {
		return false, fmt.Errorf("client %s: %w", hello.ClientID, err)
	}
	sess := &session{r: r, s: s, in: in, cur: pushCursor{Pushed: w.LastMutationID, Acked: w.LastMutationID}, lim: newPushLimits(w), snapshot: w.Snapshot,
		asm:  protocol.NewReassembler(n.remote.receiveLimits().MaxRecord()),
		conn: conn, silence: silenceLimit(n.peers[n.node].deadAfter)}
	r.stats.sessions.Add(1)
	n.update(func() {
		n.connected, n.lastErr = true, nil
		n.nodeAddr = n.addr()
		n.welcomeVersion = w.Version
		n.serverVersion = max(n.serverVersion, w.Version)
	})
	r.log.Debug("sqlrebase: welcomed", "server", n.addr(), "database", n.remote.Database,
		"server_version", w.Version, "last_mutation_id", w.LastMutationID, "snapshot", w.Snapshot)
	defer func() {
		// A snapshot cut short, or not installed, goes with its session.
		sess.snap.discard()
		sess.ready.discard()
	}()
	return true, sess.run(sctx)
}

// checkWelcome reports ErrClientCollected if the server's last mutation
// id of this client (welcomed) is below what the replica knows it settled:
// the server forgot the client. Ids only grow on the server, so a lower
// one is never a race, only a lost record.
func checkWelcome(welcomed, settled uint64) error {
	if welcomed < settled {
		return fmt.Errorf("%w: server at mutation %d, this replica saw %d settled", ErrClientCollected, welcomed, settled)
	}
	return nil
}

// serverBehind reports whether a server welcoming at version server can
// only be one that lost history this replica holds (at version have): the
// server never goes back on a version it sent.
func serverBehind(have, server uint64) bool { return server < have }

// decodeLimits are the limits the replica reads the server's messages and
// decodes versions with: the defaults widened to what its Hello states.
func (r *Replica) decodeLimits() protocol.Limits {
	rl := protocol.DefaultReceiveLimits
	if r.net != nil {
		rl = r.net.remote.receiveLimits()
	}
	return rl.Decoding(protocol.DefaultLimits)
}

// serverGone reports whether a session's error means the server's end of
// the connection is gone, not just this session.
func serverGone(err error) bool {
	var re *protocol.RemoteError
	if errors.As(err, &re) {
		return re.Code == protocol.CodeShuttingDown
	}
	return errors.Is(err, errNoWelcome) || errors.Is(err, errNodeSilent)
}

// errNoWelcome is a Hello left unanswered.
var errNoWelcome = errors.New("replica: no answer to hello")

// errNodeSilent ends a session whose connection received nothing at all
// for silenceLimit while its pushes waited for their ack: the node is gone
// (see silenceLimit), and the next attempt goes to another node.
var errNodeSilent = errors.New("replica: the node went silent while pushes waited for their ack")

// streamClosed is the QUIC stream error code of a session the replica ends
// (it is closing, or it gave up on the session after an error).
const streamClosed quic.StreamErrorCode = 0

func cancelStream(s *quic.Stream) {
	s.CancelRead(streamClosed)
	s.CancelWrite(streamClosed)
}

// awaitWelcome reads the answer to Hello.
func awaitWelcome(ctx context.Context, in *inbox, timeout time.Duration) (*protocol.Welcome, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	var m protocol.Message
	select {
	case m = <-in.msgs:
	case err := <-in.errc:
		// A refusal is an Error then the end of the stream: the message
		// may be in the buffer already.
		in.err = err
		var ok bool
		if m, ok, _ = in.poll(); !ok {
			return nil, fmt.Errorf("waiting for welcome: %w", err)
		}
	case <-t.C:
		return nil, fmt.Errorf("%w within %v", errNoWelcome, timeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	switch m := m.(type) {
	case *protocol.Welcome:
		return m, nil
	case *protocol.Error:
		return nil, m.Err()
	default:
		return nil, fmt.Errorf("%w: %T before welcome", errUnexpected, m)
	}
}

// errUnexpected is a message that is not valid at that point of a session.
var errUnexpected = errors.New("replica: unexpected message from the server")

// session is the state of one welcomed session.
type session struct {
	r   *Replica
	s   *quic.Stream
	in  *inbox
	cur pushCursor
	lim pushLimits

	snapshot bool                      // the Welcome announced a snapshot that has not fully arrived
	snap     *snapBuffer               // the snapshot so far
	ready    *snapBuffer               // a whole snapshot, waiting to be installed
	versions []protocol.EncodedVersion // arrived, not yet applied
	out      chan []byte               // a push buffer for the writer goroutine (capacity 1)
	wrote    chan error                // the writer's result for it (capacity 1)
	writing  bool                      // a push buffer is with the writer: wbuf is not ours
	asm      *protocol.Reassembler     // the parts of a version too large for one message
	wbuf     []byte
	// pushErr is a push the server refused by cancelling the stream's
	// read side (pushRefused); pushGrace fires when the session stops
	// waiting for the server's reason.
	pushErr   error
	pushGrace <-chan time.Time
	// conn is the session's connection, whose packet count watch follows
	// while pushes wait for their ack: a node that sends nothing for
	// silence is counted dead (errNodeSilent).
	conn    *quic.Conn
	watch   silenceWatch
	silence time.Duration
}

// silenceCheck is how often a session that waits for an ack looks at its
// connection's packet count.
const silenceCheck = 250 * time.Millisecond

// stopSendingGrace is how long a session whose push the server refused
// (it cancelled its read side, as it does when it ends a session) goes on
// reading for the server's Error message, which it wrote before: the
// Error is the reason (a fatal one, such as a version too large for this
// client), while the push's own error only says the stream was cancelled,
// and taken alone made the replica reconnect forever
// (TestSyncVersionTooLarge failed so in one run of thirty).
const stopSendingGrace = 2 * time.Second

// pushRefused takes a push's write error: a cancel by the server is kept
// (no more pushes on this session, and the loop reads on for the
// server's reason until stopSendingGrace), anything else ends the
// session.
func (ss *session) pushRefused(err error) error {
	var se *quic.StreamError
	if errors.As(err, &se) && se.Remote {
		if ss.pushErr == nil {
			ss.pushErr = err
			ss.pushGrace = time.After(stopSendingGrace)
		}
		return nil
	}
	return fmt.Errorf("push to %s: %w", ss.r.net.addr(), err)
}

// snapBuffer collects a snapshot's chunks in a file next to the replica
// (PATH-snapshot), so that a large database never has to fit in memory.
type snapBuffer struct {
	first protocol.SnapshotChunk // header fields every chunk must repeat
	next  uint64                 // the page the next chunk must start at (64 bits: no wrap at the last page)
	f     *os.File
}

// image is the complete snapshot, to install.
func (b *snapBuffer) image() vfs.SnapshotImage {
	return vfs.SnapshotImage{Src: b.f, Version: b.first.Version, PageSize: b.first.PageSize, Pages: b.first.DBSize, Checksum: b.first.Checksum}
}

// discard closes and removes the file.
func (b *snapBuffer) discard() {
	if b != nil && b.f != nil {
		b.f.Close()
		os.Remove(b.f.Name())
		b.f = nil
	}
}

// run drives the session. Pushes are written by a goroutine of their own,
// so that the loop goes on reading while a write waits for the server's
// flow control: a server that reads pushes no faster than its writer runs
// them, while its sender waits for us to read, would otherwise hold both
// ends until its write deadline cut us off. One write is in flight at a
// time; planPush bounds what it holds.
func (ss *session) run(ctx context.Context) error {
	ss.out, ss.wrote = make(chan []byte, 1), make(chan error, 1)
	wctx, wcancel := context.WithCancel(ctx)
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		ss.writeLoop(wctx)
	}()
	defer func() {
		wcancel()
		cancelStream(ss.s) // unblocks a write in flight
		<-wdone
	}()
	if err := ss.push(); err != nil {
		return err
	}
	tick := time.NewTicker(silenceCheck)
	defer tick.Stop()
	for {
		// While pushes wait for their ack, watch for a node gone silent.
		var silent <-chan time.Time
		if ss.cur.inFlight() > 0 && ss.conn != nil {
			silent = tick.C
		} else {
			ss.watch = silenceWatch{}
		}
		// Once the reader has failed, only its buffered messages are left:
		// take them without waiting.
		if ss.in.err == nil {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case now := <-silent:
				var dead bool
				if ss.watch, dead = ss.watch.look(ss.conn.ConnectionStats().PacketsReceived, now, ss.silence); dead {
					return fmt.Errorf("%w: nothing from %s for %v", errNodeSilent, ss.r.net.addr(), now.Sub(ss.watch.Since).Round(time.Millisecond))
				}
			case <-ss.r.net.wake:
			case err := <-ss.wrote:
				ss.writing = false
				if cap(ss.wbuf) > 4<<20 {
					ss.wbuf = nil // do not keep a large buffer for the life of the session
				}
				if err != nil {
					if err := ss.pushRefused(err); err != nil {
						return err
					}
				}
			case <-ss.pushGrace:
				return fmt.Errorf("push to %s: %w", ss.r.net.addr(), ss.pushErr)
			case m := <-ss.in.msgs:
				if err := ss.handle(m); err != nil {
					return err
				}
			case err := <-ss.in.errc:
				ss.in.err = err
			}
		}
		// Take everything that has arrived, then rebase once.
		for {
			m, ok, err := ss.in.poll()
			if err != nil {
				return ss.closed(err)
			}
			if !ok {
				break
			}
			if err := ss.handle(m); err != nil {
				return err
			}
			if len(ss.versions)+ss.readyCount() >= maxRebaseBatch {
				break
			}
		}
		if ss.rebaseDue() {
			if err := ss.rebase(ctx); err != nil {
				return err
			}
		}
		if err := ss.push(); err != nil {
			return err
		}
	}
}

func (ss *session) readyCount() int {
	if ss.ready != nil {
		return 1
	}
	return 0
}

// closed explains the end of the stream.
func (ss *session) closed(err error) error {
	return fmt.Errorf("connection to %s lost: %w", ss.r.net.addr(), err)
}

// handle takes one message of a welcomed session.
func (ss *session) handle(m protocol.Message) error {
	n := ss.r.net
	if _, part := m.(*protocol.VersionPart); !part && ss.asm.Pending() {
		return fmt.Errorf("%w: %T between the parts of a version", errUnexpected, m)
	}
	switch m := m.(type) {
	case *protocol.VersionPart:
		if ss.snapshot {
			return fmt.Errorf("%w: a version part before the snapshot was complete", errUnexpected)
		}
		if ss.asm == nil {
			ss.asm = protocol.NewReassembler(ss.r.net.remote.receiveLimits().MaxRecord())
		}
		rec, err := ss.asm.Add(m)
		if err != nil || rec == nil {
			return err
		}
		lim := ss.r.decodeLimits()
		lim.MaxMessage = int(min(ss.r.net.remote.receiveLimits().MaxRecord(), uint64(^uint(0)>>1)))
		ev, err := protocol.DecodeEncodedVersion(rec, lim)
		if err != nil {
			return fmt.Errorf("version %d in parts: %w", m.Version, err)
		}
		if ev.Version != m.Version {
			return fmt.Errorf("%w: parts of version %d hold version %d", protocol.ErrMalformed, m.Version, ev.Version)
		}
		ss.versions = append(ss.versions, ev)
		n.update(func() { n.serverVersion = max(n.serverVersion, ev.Version) })
	case *protocol.Versions:
		if ss.snapshot {
			return fmt.Errorf("%w: versions before the snapshot was complete", errUnexpected)
		}
		if len(m.Versions) > 0 {
			ss.versions = append(ss.versions, m.Versions...)
			last := m.Versions[len(m.Versions)-1].Version
			n.update(func() { n.serverVersion = max(n.serverVersion, last) })
		}
	case *protocol.SnapshotChunk:
		return ss.chunk(m)
	case *protocol.Ack:
		ss.cur = ss.cur.ack(m.LastMutationID)
		n.update(func() { n.serverVersion = max(n.serverVersion, m.Version) })
	case *protocol.Error:
		return m.Err()
	default:
		return fmt.Errorf("%w: %T", errUnexpected, m)
	}
	return nil
}

// chunk adds a snapshot chunk. Chunks come in page order, all of one image.
func (ss *session) chunk(c *protocol.SnapshotChunk) error {
	if !ss.snapshot {
		return fmt.Errorf("%w: snapshot chunk without a snapshot announced", errUnexpected)
	}
	if ss.snap == nil {
		if c.First != 1 {
			return fmt.Errorf("%w: snapshot starts at page %d", protocol.ErrMalformed, c.First)
		}
		f, err := os.OpenFile(ss.r.path+"-snapshot", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fmt.Errorf("snapshot of version %d: %w", c.Version, err)
		}
		ss.snap = &snapBuffer{first: *c, next: 1, f: f}
		ss.snap.first.Payload = nil
	}
	f := &ss.snap.first
	if c.Version != f.Version || c.PageSize != f.PageSize || c.DBSize != f.DBSize || c.Checksum != f.Checksum {
		return fmt.Errorf("%w: snapshot chunk of version %d/%d pages does not match the snapshot's first chunk (version %d/%d pages)",
			protocol.ErrMalformed, c.Version, c.DBSize, f.Version, f.DBSize)
	}
	if uint64(c.First) != ss.snap.next {
		return fmt.Errorf("%w: snapshot chunk at page %d, want %d", protocol.ErrMalformed, c.First, ss.snap.next)
	}
	raw, err := c.Pages(protocol.DefaultLimits)
	if err != nil {
		return fmt.Errorf("snapshot of version %d: %w", c.Version, err)
	}
	if _, err := ss.snap.f.WriteAt(raw, int64(c.First-1)*int64(c.PageSize)); err != nil {
		return fmt.Errorf("snapshot of version %d: %w", c.Version, err)
	}
	ss.snap.next += uint64(c.Count)
	done := ss.snap.next - 1 // at most DBSize: the decoder checked First+Count-1 <= DBSize
	if cb := ss.r.net.remote.OnSnapshotProgress; cb != nil {
		cb(uint32(done), f.DBSize)
	}
	if done < uint64(f.DBSize) {
		return nil
	}
	// Complete. Its pages are checked against its checksum when installed.
	ss.ready, ss.snap, ss.snapshot = ss.snap, nil, false
	return nil
}

// rebase applies the snapshot and the versions collected, in one rebase.
func (ss *session) rebase(ctx context.Context) error {
	ready, evs := ss.ready, ss.versions
	ss.ready, ss.versions = nil, nil
	if ready != nil {
		// The snapshot first, as a rebase of its own; the versions after
		// it are deltas against its pages, which are then the main file's.
		err := ss.r.installRemoteSnapshot(ctx, ready.image())
		if err == nil {
			ss.r.stats.snapshots.Add(1)
		}
		if errors.Is(err, vfs.ErrPoisoned) && ss.r.files.Poisoned() != nil {
			// The copy failed part-way: Repair copies the image again,
			// so its file stays until then.
			ss.r.repairSnap.Swap(ready).discard()
		} else {
			ready.discard()
		}
		if err != nil {
			return err
		}
	}
	if len(evs) > 0 {
		if err := ss.r.rebaseRemote(ctx, evs); err != nil {
			return err
		}
		ss.r.stats.versions.Add(uint64(len(evs)))
	}
	n := ss.r.net
	n.update(func() {})
	return nil
}

// push sends as many pending mutations as the limits allow, in Push
// messages of one write.
func (ss *session) push() error {
	if ss.writing || ss.pushErr != nil {
		// The write in flight ends with a wake of run, which pushes on;
		// or the server refused pushes on this session.
		return nil
	}
	ss.wbuf = ss.wbuf[:0]
	for {
		base, muts := ss.r.queue.after(ss.cur.Pushed, ss.lim.MaxBatch)
		// Ids the replica has settled were processed by the server: no
		// need to push them, whatever this session heard so far.
		ss.cur = ss.cur.ack(base)
		for len(muts) > 0 && muts[0].ID <= ss.cur.Pushed {
			muts = muts[1:]
		}
		items := make([]pushable, len(muts))
		for i, m := range muts {
			items[i] = pushable{ID: m.ID, Size: len(m.Name) + len(m.Args)}
		}
		k := planPush(items, ss.cur, ss.lim)
		if k == 0 {
			break
		}
		p := &protocol.Push{Mutations: make([]protocol.Mutation, k)}
		for i, m := range muts[:k] {
			p.Mutations[i] = protocol.Mutation{ID: m.ID, Name: m.Name, Args: m.Args}
		}
		ss.wbuf = protocol.AppendFrame(ss.wbuf, p)
		ss.cur.Pushed = muts[k-1].ID
		if len(ss.wbuf) >= 1<<20 {
			break // write what we have; the next wake-up or message pushes on
		}
	}
	if len(ss.wbuf) == 0 {
		return nil
	}
	if ss.out == nil {
		// Not running (a test drives the session by hand): write here.
		k, err := ss.s.Write(ss.wbuf)
		ss.r.stats.sent.Add(uint64(k))
		if err != nil {
			return fmt.Errorf("push to %s: %w", ss.r.net.addr(), err)
		}
		return nil
	}
	if len(ss.wbuf) <= directPushBytes {
		// Queued at once if the stream's flow control has room (it has,
		// but for a server that stopped reading): one goroutine hop
		// fewer on the way to the server than handing it to the writer.
		err := ss.s.TryWriteAll(ss.wbuf)
		if err == nil {
			ss.r.stats.sent.Add(uint64(len(ss.wbuf)))
			return nil
		}
		if !errors.Is(err, quic.ErrWouldBlock) {
			return ss.pushRefused(err)
		}
	}
	ss.writing = true
	ss.out <- ss.wbuf // never blocks: the writer holds nothing else
	return nil
}

// directPushBytes is the largest push the session loop writes itself, when
// the stream takes it without blocking (quic.Stream.TryWriteAll); larger
// ones, and any the stream cannot take now, go to the writer goroutine.
// Handing a push to the writer was one of the goroutine hops between
// Mutate and the server (bench/README.md, "Mutate to confirmed").
const directPushBytes = 64 << 10

// writeLoop writes the push buffers run hands it, one at a time, and
// reports each write's result.
func (ss *session) writeLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-ss.out:
			k, err := ss.s.Write(b)
			ss.r.stats.sent.Add(uint64(k))
			ss.wrote <- err // never blocks: one write in flight at a time
			if err != nil {
				return
			}
		}
	}
}

// after returns the queue's settled base and up to max pending mutations
// with ids above id, in order. Pending ids are consecutive, so it finds the
// start by arithmetic rather than by copying the whole queue, which may be
// long after a time offline.
func (q *queue) after(id uint64, limit int) (base uint64, out []queuedMutation) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.pending) == 0 {
		return q.base, nil
	}
	start := 0
	if first := q.pending[0].ID; id >= first {
		if id-first >= uint64(len(q.pending)) {
			return q.base, nil
		}
		start = int(id - first + 1)
	}
	end := min(len(q.pending), start+limit)
	// A queue file that cannot be read pushes nothing now; the replay
	// reports (and hides the state on) the same failure.
	out, _ = q.withArgs(start, end)
	return q.base, out
}

// rebaseRemote decodes versions that arrived against the replica's pages
// and rebases on them, all at once. Nothing changes if the versions do not
// decode or check out.
func (r *Replica) rebaseRemote(ctx context.Context, evs []protocol.EncodedVersion) error {
	// Waiting for readers gives up when the replica closes; once the gate
	// is closed the rebase runs to the end, since stopping between the drop
	// and the replay would hide the pending mutations until the next one.
	return r.rebase(ctx, context.WithoutCancel(ctx), func(ctx context.Context) error {
		// Decoded under the writer lock, before the drop: the base of a
		// delta is the confirmed state, and a version that does not decode
		// changes nothing.
		sets, err := r.decodeVersions(evs)
		if err != nil {
			return err
		}
		if err := r.files.Rebase(ctx, sets...); err != nil {
			return err
		}
		r.live.notePages(sets) // which tables changed, for Watch
		return nil
	})
}

// installRemoteSnapshot installs a complete snapshot image as a rebase:
// the pending state is dropped, the image copied in, acknowledgements
// settled from it and the rest replayed on top.
func (r *Replica) installRemoteSnapshot(ctx context.Context, img vfs.SnapshotImage) error {
	return r.rebase(ctx, context.WithoutCancel(ctx), func(ctx context.Context) error {
		return r.files.InstallSnapshot(ctx, img)
	})
}

// decodeVersions turns encoded versions into page sets. Each one that is a
// delta against the version before is decoded against the newest image of
// each page: from the versions of this batch before it (or the snapshot),
// else from the main file. A record carries no pre checksum (protocol 4):
// each set's is the checksum of the version it applies to, the replica's
// own (proved when it applied it) or the set's before it in the batch, so
// that the apply's check holds by construction and the post checksum is
// what proves the result.
func (r *Replica) decodeVersions(evs []protocol.EncodedVersion) ([]*wal.PageSet, error) {
	var sets []*wal.PageSet
	newest := map[uint32][]byte{}
	version, dbSize, sum := r.files.Version(), r.files.Pages(), r.files.Checksum()
	before := func(pgno uint32) ([]byte, error) {
		if p, ok := newest[pgno]; ok {
			return p, nil
		}
		if pgno == 0 || pgno > r.files.Pages() {
			return nil, fmt.Errorf("no image of page %d", pgno)
		}
		return r.files.BasePage(pgno)
	}
	for i := range evs {
		ev := &evs[i]
		if ev.Version != version+1 {
			return nil, fmt.Errorf("%w: server sent version %d, the replica is at %d", protocol.ErrMalformed, ev.Version, version)
		}
		if ev.NeedsBase() && ev.BaseDBSize != dbSize {
			return nil, fmt.Errorf("%w: version %d is a delta against a database of %d pages, the replica has %d", protocol.ErrMalformed, ev.Version, ev.BaseDBSize, dbSize)
		}
		if r.dec == nil {
			r.dec = protocol.NewDecoder(r.decodeLimits())
		}
		ps, err := r.dec.Version(ev, before)
		if err != nil {
			return nil, err
		}
		ps.PreChecksum = sum
		sets = append(sets, ps)
		for _, p := range ps.Pages {
			newest[p.Pgno] = p.Data
		}
		version, dbSize, sum = ps.Version, ps.DBSize, ps.PostChecksum
	}
	return sets, nil
}

// nextAttempt is the backoff attempt after a session: back to the start
// after a session that was welcomed and lasted, or that the server ended
// because its credential expired or was revoked (renew: the next attempt
// brings a fresh token, so it goes at once, however short the token's
// life); one step further otherwise, also for a Hello refused as expired,
// so that a token source that keeps handing out stale tokens is retried
// ever more slowly.
func nextAttempt(attempt int, welcomed bool, lasted time.Duration, renew bool) int {
	if welcomed && (lasted >= stableSession || renew) {
		return 0
	}
	if attempt < 64 {
		attempt++
	}
	return attempt
}

// credentialEnded reports whether err is the server ending a session
// because its credential expired or was revoked: not fatal, and the
// replica reconnects at once with a fresh credential.
func credentialEnded(err error) bool {
	var re *protocol.RemoteError
	return errors.As(err, &re) && (re.Code == protocol.CodeCredentialExpired || re.Code == protocol.CodeCredentialRevoked)
}

// WaitConnected waits until the replica has a session with the server (the
// server accepted its Hello). It returns at once with the error of a fatal
// refusal (a wrong credential, an unknown database, a server certificate
// that does not verify), ErrClosed, or ctx's error.
func (r *Replica) WaitConnected(ctx context.Context) error {
	return r.waitNet(ctx, func(v netView) bool { return v.connected })
}

// Sync waits until the replica is in sync with the server as of the call:
// connected, caught up to at least the version the server had when the
// session began, and every mutation made before the call settled (applied
// or rejected: see each Handle for which). Errors are those of
// WaitConnected. Without a connection it waits for one: offline, only ctx
// ends it.
func (r *Replica) Sync(ctx context.Context) error {
	last := r.queue.NextID() - 1
	return r.waitNet(ctx, func(v netView) bool {
		if !v.connected {
			return false
		}
		target := v.welcomeVersion
		r.writeMu.Lock()
		defer r.writeMu.Unlock()
		if r.closed.Load() {
			return false
		}
		// Settled: nothing made up to last is still pending. (Pending ids
		// follow the settled base without a gap.)
		return r.files.Version() >= target && r.queue.settled() >= last
	})
}

// netView is what a wait condition sees of the sync state.
type netView struct {
	connected      bool
	welcomeVersion uint64
}

// waitNet waits until cond holds, re-checking after every change of the
// sync state (each welcome, disconnect and rebase of the loop).
func (r *Replica) waitNet(ctx context.Context, cond func(netView) bool) error {
	n := r.net
	if n == nil {
		return ErrNoRemote
	}
	for {
		if r.closed.Load() {
			return ErrClosed
		}
		n.mu.Lock()
		fatal, ch := n.fatal, n.changed
		view := netView{connected: n.connected, welcomeVersion: n.welcomeVersion}
		n.mu.Unlock()
		if fatal != nil {
			return fatal
		}
		// cond runs without n.mu: it may take the writer's lock, which is
		// never held while n.mu is taken (Status takes them in turn).
		if cond(view) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// netStatus fills the network fields of a Status.
func (r *Replica) netStatus(st *Status) {
	n := r.net
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	st.Connected, st.LastError, st.ServerVersion = n.connected, n.lastErr, n.serverVersion
	st.Node = n.nodeAddr
}
