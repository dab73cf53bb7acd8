package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// item is one thing due to a session: an encoded version or an ack.
type item struct {
	version uint64
	rec     []byte
	ack     *protocol.Ack
}

// session is one database session: one QUIC stream of one client. A reader
// goroutine (run) takes the client's messages; a sender goroutine owns every
// write to the stream, so that Welcome, catch-up, live versions, acks and a
// final Error go out in order.
type session struct {
	srv    *Server
	stream *quic.Stream
	remote string
	addr   net.Addr // the client's address, for the authenticator and the failure limiter (nil in tests)
	log    *slog.Logger

	db       *database
	release  func() // gives back the hold on db that admit took
	clientID string
	// identity is who the session speaks for, as the authenticator
	// established it at admission; set before the session subscribes and
	// never changed after, so readers need no lock.
	identity Identity
	expiry   *time.Timer            // ends the session when identity.Expires passes (nil: never)
	graceEnd *time.Timer            // ends it when the rotated-out secret it presented stops being accepted (nil: never)
	recv     protocol.ReceiveLimits // what the client said it can receive: every frame is planned to it
	inflight atomic.Int64           // mutations pushed and not yet acknowledged
	inBatch  atomic.Bool            // some of its mutations are in the batch the writer is running

	// The sender's own: the write deadline armed on the stream (see
	// nextDeadline), and the counter of bytes sent.
	deadline  time.Time
	sentBytes prometheus.Counter

	// mu guards the queue and what goes with it. Lock order: the
	// authority's mu (onCommit offers under it), then mu, then the QUIC
	// stream's own locks (a direct write, see flushLocked); nothing is
	// taken after it but those.
	mu         sync.Mutex
	queue      []item
	queueBytes int
	closing    *protocol.Error // set once: the sender sends it and ends the session
	// idle is set while the sender waits in its live loop with everything
	// before written: whoever holds mu may then write the queue to the
	// stream itself, if the stream takes it without blocking.
	idle bool
	// sent is the newest version written, handed between the sender
	// (which keeps its own while it runs) and the direct writes while it
	// is idle: versions up to it (a catch-up's) are skipped.
	sent uint64
	dbuf []byte // the direct writes' buffer, reused (guarded by mu)
	wake chan struct{}
	done chan struct{} // closed when the sender has finished
}

func newSession(srv *Server, stream *quic.Stream, remote string) *session {
	return &session{
		srv: srv, stream: stream, remote: remote,
		log:  srv.log.With("remote", remote, "stream", stream.StreamID()),
		wake: make(chan struct{}, 1), done: make(chan struct{}),
	}
}

// offer queues an item without ever blocking: a client too slow to keep its
// queue under the bounds is cut off instead of holding up the broadcast.
// It returns false if the session is closing.
func (s *session) offer(it item) bool { return s.offerWake(it, true) }

// offerWake is offer that wakes the sender only if wake: the caller
// promises an offer that wakes it soon (the writer's ack of a batch for
// the version that batch made). A cut-off always wakes it.
func (s *session) offerWake(it item, wake bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing != nil {
		return false
	}
	// One item alone is always taken, however large: a version bigger
	// than the byte bound is legal, and travels in parts.
	if len(s.queue) >= s.srv.cfg.SessionQueue || (len(s.queue) > 0 && s.queueBytes+len(it.rec) > s.srv.cfg.SessionQueueBytes) {
		s.srv.cfg.metrics.slow.WithLabelValues(s.srv.cfg.metrics.lv(s.dbName(), "queue")...).Inc()
		s.closing = &protocol.Error{Code: protocol.CodeSlowClient, Message: fmt.Sprintf("more than %d versions or %d bytes queued; reconnect to catch up", s.srv.cfg.SessionQueue, s.srv.cfg.SessionQueueBytes)}
		s.queue, s.queueBytes = nil, 0
		s.wakeSender()
		return false
	}
	s.queue = append(s.queue, it)
	s.queueBytes += len(it.rec)
	if wake {
		s.flushLocked()
	}
	return true
}

// fail ends the session with an Error to the client (the first one wins).
func (s *session) fail(code protocol.Code, msg string) {
	s.mu.Lock()
	if s.closing == nil {
		s.closing = &protocol.Error{Code: code, Message: msg}
	}
	s.mu.Unlock()
	s.wakeSender()
}

// signal sends what is queued: at once, from the caller's goroutine, if
// the sender is idle and the stream takes it without blocking, else by
// waking the sender.
func (s *session) signal() {
	s.mu.Lock()
	s.flushLocked()
	s.mu.Unlock()
}

// wakeSender wakes the sender goroutine.
func (s *session) wakeSender() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// directFlushBytes bounds a direct write (flushLocked): more than this
// queued is the sender's to write, in writes of flushBytes with deadlines.
const directFlushBytes = 64 << 10

// flushLocked writes the queue to the stream from the calling goroutine,
// if the sender is idle (nothing of its own in flight, so order holds) and
// the stream takes all of it now (quic.Stream.TryWriteAll: within flow
// control, never blocking); anything else wakes the sender, which writes
// it as before, under its deadline. A broadcast to N subscribers so costs
// N direct writes from one goroutine, as bare quic-go's loop does, instead
// of N goroutine wakes, each followed by the same write; and a pusher's
// ack and version go out from the writer, one hop sooner. The slow-client
// rules are unchanged: a client whose stream would block gets its queue
// written by the sender, whose write deadline cuts it off.
func (s *session) flushLocked() {
	if !s.idle || s.closing != nil || len(s.queue) == 0 {
		s.wakeSender()
		return
	}
	buf, sent, ok := s.planDirect(s.dbuf[:0])
	if ok {
		ok = s.stream.TryWriteAll(buf) == nil
	}
	if !ok {
		// Would block, or too large, or the stream failed: the sender
		// finds out and does what it does.
		s.wakeSender()
		return
	}
	s.sent = sent
	if s.sentBytes != nil {
		s.sentBytes.Add(float64(len(buf)))
	}
	clear(s.queue)
	s.queue, s.queueBytes = s.queue[:0], 0
	if cap(buf) <= directFlushBytes {
		s.dbuf = buf[:0]
	}
}

// planDirect appends the queue's frames to buf, planned to the client's
// limits as send plans them, and returns the newest version among them (or
// s.sent); false if the queue holds anything send would
// refuse or split (a version too large for the client) or more than
// directFlushBytes: that is the sender's.
func (s *session) planDirect(buf []byte) ([]byte, uint64, bool) {
	if len(s.queue) == 1 && s.queue[0].ack == nil && s.queue[0].version > s.sent {
		// The broadcast's case, once per subscriber per version: one
		// version, in one Versions message if it fits one (PlanFrames'
		// plan for it), without the items and frames it allocates
		// (BenchmarkPlanDirect).
		it := s.queue[0]
		h, err := protocol.ReadRecordHeader(it.rec)
		if err != nil || h.PageBytes > s.recv.MaxVersionBytes || uint64(len(it.rec)) > s.recv.MaxRecord() {
			return buf, 0, false
		}
		if uint64(len(it.rec))+2 <= uint64(s.recv.MaxMessage) && len(it.rec) <= directFlushBytes {
			return protocol.AppendVersionsFrame(buf, it.rec), it.version, true
		}
	}
	items := make([]protocol.Item, 0, len(s.queue))
	sent := s.sent
	for _, it := range s.queue {
		switch {
		case it.ack != nil:
			items = append(items, protocol.Item{Msg: it.ack})
			continue
		case it.version <= sent:
			continue // already in the snapshot or the catch-up
		}
		if h, err := protocol.ReadRecordHeader(it.rec); err != nil || h.PageBytes > s.recv.MaxVersionBytes || uint64(len(it.rec)) > s.recv.MaxRecord() {
			return buf, 0, false
		}
		items = append(items, protocol.Item{Version: it.version, Rec: it.rec})
		sent = it.version
	}
	for _, f := range protocol.PlanFrames(items, s.recv) {
		buf = f.Append(buf)
		if len(buf) > directFlushBytes {
			return buf, 0, false
		}
	}
	return buf, sent, true
}

// helloTimeout bounds how long a stream may stay open without a Hello.
const helloTimeout = 10 * time.Second

// writeTimeout bounds one write to a client; a client that reads nothing
// for that long is cut off.
const writeTimeout = 10 * time.Second

// deadlineSlack is how much longer than the write timeout the sender arms
// the stream's write deadline, so that it re-arms it at most once per
// deadlineSlack while writing, not once per write: one SetWriteDeadline
// per version per subscriber was a fifth of the sender's CPU in a profile
// of the fan-out to 100 subscribers. A blocked write is so cut off after
// between the write timeout and it plus the slack.
const deadlineSlack = time.Second

// nextDeadline decides the write deadline for a write starting at now,
// with armed the deadline already on the stream: armed itself while it
// leaves at least timeout for the write (false: nothing to set), else a
// new one, timeout plus deadlineSlack from now.
func nextDeadline(now, armed time.Time, timeout time.Duration) (time.Time, bool) {
	if armed.Sub(now) >= timeout {
		return armed, false
	}
	return now.Add(timeout + deadlineSlack), true
}

// run serves the session until the stream ends.
func (s *session) run(ctx context.Context) {
	defer s.stream.Close()
	r := protocol.NewReader(s.stream, s.srv.cfg.Limits)
	s.stream.SetReadDeadline(time.Now().Add(helloTimeout))
	m, err := r.Read()
	if err != nil {
		s.refuse(codeOf(err), fmt.Sprintf("reading hello: %v", err))
		return
	}
	hello, ok := m.(*protocol.Hello)
	if !ok {
		s.refuse(protocol.CodeUnexpected, fmt.Sprintf("the first message must be a hello, got type %d", m.Type()))
		return
	}
	if r.Legacy() {
		// Protocol 3's framing: refuse in the framing that client reads.
		s.refuseLegacy(hello)
		return
	}
	s.stream.SetReadDeadline(time.Time{})
	c, err := s.admit(ctx, hello)
	if err != nil {
		var pe *protocol.RemoteError
		if errors.As(err, &pe) {
			// A flood past its failure budget would flood the log too.
			level := slog.LevelInfo
			if pe.Code == protocol.CodeRateLimited {
				level = slog.LevelDebug
			}
			s.log.Log(ctx, level, "refused hello", "db", hello.Database, "client", hello.ClientID, "code", pe.Code, "reason", pe.Message)
			s.refuse(pe.Code, pe.Message)
		} else {
			s.log.Error("hello", "err", err)
			s.refuse(protocol.CodeInternal, "the server could not open the session")
		}
		return
	}
	defer s.release() // after the unsubscribe below: the database may then close when idle
	defer s.stopExpiry()
	s.log = s.log.With("db", s.db.name, "client", s.clientID)
	s.log.Debug("session open", "version", hello.Version, "server", c.welcome.Version, "snapshot", c.welcome.Snapshot)
	open := s.srv.cfg.metrics.sessions.WithLabelValues(s.srv.cfg.metrics.lv(s.db.name)...)
	open.Inc()
	go s.sender(ctx, c)
	defer func() {
		open.Dec()
		s.db.unsubscribe(s)
		<-s.done
	}()
	for {
		m, err := r.Read()
		if err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				s.fail(protocol.CodeShuttingDown, "session ended")
				return
			}
			var se *quic.StreamError
			var ae *quic.ApplicationError
			var ie *quic.IdleTimeoutError
			if errors.As(err, &se) || errors.As(err, &ae) || errors.As(err, &ie) {
				s.fail(protocol.CodeShuttingDown, "session ended")
				return
			}
			s.log.Info("bad message; closing the session", "err", err)
			s.fail(codeOf(err), err.Error())
			return
		}
		push, ok := m.(*protocol.Push)
		if !ok {
			s.fail(protocol.CodeUnexpected, fmt.Sprintf("message type %d is not valid after the hello", m.Type()))
			return
		}
		if len(push.Mutations) == 0 {
			continue
		}
		if n := s.inflight.Add(int64(len(push.Mutations))); n > int64(s.srv.cfg.MaxInFlight) {
			s.fail(protocol.CodeTooManyPending, fmt.Sprintf("%d mutations in flight, limit %d: wait for acks", n, s.srv.cfg.MaxInFlight))
			return
		}
		if err := s.db.push(ctx, pushRequest{s: s, mutations: push.Mutations}); err != nil {
			s.fail(protocol.CodeShuttingDown, "the server is shutting down")
			return
		}
	}
}

// admit checks a hello and subscribes the session. Refusals are
// *protocol.RemoteError.
func (s *session) admit(ctx context.Context, h *protocol.Hello) (catchUp, error) {
	if h.Protocol < protocol.MinVersion || h.Protocol > protocol.Version {
		return catchUp{}, &protocol.RemoteError{Code: protocol.CodeProtocolVersion, Message: fmt.Sprintf("client speaks protocol %d; this server speaks %d to %d", h.Protocol, protocol.MinVersion, protocol.Version)}
	}
	if min := s.srv.cfg.MinAppVersion; h.AppVersion < min {
		return catchUp{}, &protocol.RemoteError{Code: protocol.CodeUpgradeRequired, Message: fmt.Sprintf("app version %d is older than the oldest this server accepts (%d): upgrade the app", h.AppVersion, min)}
	}
	recv := h.Receive.WithDefaults()
	if err := recv.Check(); err != nil {
		return catchUp{}, &protocol.RemoteError{Code: protocol.CodeLimits, Message: err.Error()}
	}
	s.recv = recv
	if h.ClientID == "" || len(h.ClientID) > 128 {
		return catchUp{}, &protocol.RemoteError{Code: protocol.CodeMalformed, Message: "client id must be 1 to 128 bytes"}
	}
	db, err := s.srv.admitDatabase(ctx, h, s.addr)
	if err != nil {
		return catchUp{}, err
	}
	s.release = db.release
	s.db, s.clientID, s.identity = db.d, h.ClientID, db.identity
	if err := s.db.waitFollowerReady(ctx, h.Version); err != nil {
		s.release()
		return catchUp{}, err
	}
	c, err := s.db.subscribe(ctx, s, h.Version, h.Checksum)
	if err != nil {
		s.release()
		return c, err
	}
	// A revocation ends the sessions it finds subscribed after it has
	// recorded itself; one that recorded itself after this session's
	// check but before its subscription would miss it, so check again
	// now that the session is findable. The session then ends at once,
	// through its sender, like any other it finds.
	if why := db.access.revokedReason(s.identity); why != "" {
		s.fail(protocol.CodeCredentialRevoked, why)
	}
	if exp := s.identity.Expires; !exp.IsZero() {
		s.expiry = time.AfterFunc(time.Until(exp), func() {
			s.fail(protocol.CodeCredentialExpired, "credential expired; reconnect with a fresh one")
		})
	}
	// A secret rotated out but still in its grace: the session ends when
	// the grace does (after a restart no rotation's own timer is left).
	if end := db.access.graceEnd(s.identity); !end.IsZero() {
		s.graceEnd = time.AfterFunc(time.Until(end), func() {
			s.fail(protocol.CodeCredentialRevoked, fmt.Sprintf("secret %s was rotated; reconnect with the new one", s.identity.Credential))
		})
	}
	return c, nil
}

// stopExpiry stops the expiry and grace timers, when the session ends.
func (s *session) stopExpiry() {
	if s.expiry != nil {
		s.expiry.Stop()
	}
	if s.graceEnd != nil {
		s.graceEnd.Stop()
	}
}

// refuse sends an Error before any session exists, and ends the stream.
func (s *session) refuse(code protocol.Code, msg string) {
	s.srv.cfg.metrics.refused(code)
	s.stream.SetWriteDeadline(time.Now().Add(time.Second))
	protocol.WriteMessage(s.stream, &protocol.Error{Code: code, Message: msg})
	// Done reading too: a stream whose receive side is left open is never
	// released, so a client refused on 256 streams of one connection (the
	// stream limit) could open no more, and the server kept them all.
	s.stream.CancelRead(0)
	close(s.done)
}

// refuseLegacy refuses a Hello that came in protocol 3's framing (a client
// of protocol 3 or older) with CodeProtocolVersion, fatal, written in that
// framing so that the client reads it, and ends the stream.
func (s *session) refuseLegacy(h *protocol.Hello) {
	code := protocol.CodeProtocolVersion
	s.srv.cfg.metrics.refused(code)
	s.log.Info("refused hello", "db", h.Database, "client", h.ClientID, "code", code, "protocol", h.Protocol)
	s.stream.SetWriteDeadline(time.Now().Add(time.Second))
	protocol.WriteLegacyMessage(s.stream, &protocol.Error{Code: code, Message: fmt.Sprintf("client speaks protocol %d; this server speaks %d to %d", h.Protocol, protocol.MinVersion, protocol.Version)})
	close(s.done)
}

// codeOf maps a decoding error to the code the client is told.
func codeOf(err error) protocol.Code {
	if errors.Is(err, protocol.ErrTooLarge) {
		return protocol.CodeTooLarge
	}
	return protocol.CodeMalformed
}

// sender writes everything due to the client, in order: Welcome, the
// catch-up, then live versions and acks. What is due goes through
// protocol.PlanFrames, so that every message is within the client's limits
// and a version larger than one message goes in parts.
func (s *session) sender(ctx context.Context, c catchUp) {
	defer close(s.done)
	defer s.stream.CancelRead(0)
	s.sentBytes = s.srv.cfg.metrics.sent.WithLabelValues(s.srv.cfg.metrics.lv(s.dbName())...)
	buf := protocol.AppendFrame(nil, &c.welcome)
	var sent uint64 // the newest version sent
	if c.welcome.Snapshot {
		var err error
		if sent, buf, err = s.sendSnapshot(ctx, buf); err != nil {
			s.log.Info("snapshot", "err", err)
			s.fail(protocol.CodeInternal, "snapshot failed: "+err.Error())
			s.finish()
			return
		}
		s.srv.cfg.metrics.snapshots.WithLabelValues(s.srv.cfg.metrics.lv(s.db.name)...).Inc()
		// A bootstrap that began earlier pins the main file at its
		// version, and OpenSnapshot shares that pin: the snapshot may be
		// older than the Welcome. The versions between come from the log.
		c.to = c.welcome.Version
	} else {
		sent = c.from - 1
	}
	for sent < c.to {
		recs, err := s.db.readLog(sent+1, c.to, 512)
		if err != nil {
			s.fail(protocol.CodeSlowClient, "the change log moved on during catch-up; reconnect")
			break
		}
		items := make([]protocol.Item, len(recs))
		for i, rec := range recs {
			items[i] = protocol.Item{Version: sent + 1 + uint64(i), Rec: rec}
		}
		sent += uint64(len(recs))
		var ok bool
		if buf, ok = s.send(buf, items); !ok {
			s.finish()
			return
		}
	}
	if len(buf) > 0 && !s.write(buf) {
		s.finish()
		return
	}
	var items []protocol.Item // reused: everything due at one wake, in one write
	for {
		// Everything before is written: offers may write the queue
		// themselves (flushLocked) until this sender wakes.
		s.mu.Lock()
		s.idle, s.sent = true, sent
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-ctx.Done():
			s.fail(protocol.CodeShuttingDown, "the server is shutting down")
		}
		s.mu.Lock()
		s.idle, sent = false, s.sent
		queued, closing := s.queue, s.closing
		s.queue, s.queueBytes = nil, 0
		s.mu.Unlock()
		items = items[:0]
		for _, it := range queued {
			switch {
			case it.ack != nil:
				items = append(items, protocol.Item{Msg: it.ack})
			case it.version <= sent:
				// Already in the snapshot or the catch-up.
			default:
				items = append(items, protocol.Item{Version: it.version, Rec: it.rec})
				sent = it.version
			}
		}
		if closing != nil {
			items = append(items, protocol.Item{Msg: closing})
		}
		var ok bool
		buf, ok = s.send(buf[:0], items)
		if ok && len(buf) > 0 {
			ok = s.write(buf)
		}
		if !ok || closing != nil {
			s.finish()
			return
		}
	}
}

// flushBytes is how much the sender gathers before a write: small frames
// share a write (one packet where several writes would cost one each), a
// large plan goes out in writes of about this size, each with its own
// deadline.
const flushBytes = 1 << 20

// send plans items to the client's limits and writes them, keeping under
// flushBytes unwritten at the end in buf (returned) for the caller to
// write or add to. A version larger than the client can hold ends the
// session with CodeVersionTooLarge in its place. false: the session is
// over.
func (s *session) send(buf []byte, items []protocol.Item) ([]byte, bool) {
	closed := false
	for i, it := range items {
		if it.Rec == nil {
			continue
		}
		if h, err := protocol.ReadRecordHeader(it.Rec); err != nil || h.PageBytes > s.recv.MaxVersionBytes || uint64(len(it.Rec)) > s.recv.MaxRecord() {
			n := h.PageBytes
			msg := fmt.Sprintf("version %d has %d bytes of pages (%d encoded); this client holds at most %d: raise its limit (Remote.MaxVersionBytes)", it.Version, n, len(it.Rec), s.recv.MaxVersionBytes)
			s.log.Warn("version too large for the client", "version", it.Version, "bytes", n, "limit", s.recv.MaxVersionBytes)
			items = append(items[:i:i], protocol.Item{Msg: &protocol.Error{Code: protocol.CodeVersionTooLarge, Message: msg}})
			closed = true
			break
		}
	}
	frames := protocol.PlanFrames(items, s.recv)
	for i := range frames {
		buf = frames[i].Append(buf)
		if len(buf) >= flushBytes {
			if !s.write(buf) {
				return buf[:0], false
			}
			buf = buf[:0]
		}
	}
	if closed {
		if len(buf) > 0 {
			s.write(buf)
		}
		s.fail(protocol.CodeVersionTooLarge, "")
		return buf[:0], false
	}
	return buf, true
}

// sendSnapshot streams the database image in chunks, after what buf holds,
// and returns the snapshot's version. A chunk is at most 256 pages and
// always fits in one of the client's messages.
func (s *session) sendSnapshot(ctx context.Context, buf []byte) (uint64, []byte, error) {
	snap, err := s.db.openSnapshot(ctx)
	if err != nil {
		return 0, nil, err
	}
	defer snap.Close()
	enc := protocol.NewEncoder()
	defer enc.Close()
	chunkPages := uint32(min(256, max(1, (int(s.recv.MaxMessage)-256)/int(snap.PageSize))))
	for first := uint32(1); first <= snap.DBSize; first += chunkPages {
		n := min(chunkPages, snap.DBSize-first+1)
		raw, err := snap.ReadPages(first, n)
		if err != nil {
			return 0, nil, err
		}
		chunk, err := enc.SnapshotChunk(snap.Version, snap.PageSize, snap.DBSize, snap.Checksum, first, raw)
		if err != nil {
			return 0, nil, err
		}
		buf = protocol.AppendFrame(buf, chunk)
		if !s.write(buf) {
			return 0, nil, errors.New("client went away")
		}
		buf = buf[:0]
	}
	return snap.Version, buf, nil
}

// write writes buf to the stream under a deadline at least the write
// timeout away (re-armed only when closer, see nextDeadline); false means
// the session is over.
func (s *session) write(buf []byte) bool {
	if d, ok := nextDeadline(time.Now(), s.deadline, s.srv.cfg.writeTimeout); ok {
		s.deadline = d
		s.stream.SetWriteDeadline(d)
	}
	n, err := s.stream.Write(buf)
	if s.sentBytes != nil {
		s.sentBytes.Add(float64(n))
	}
	if err != nil {
		if isTimeout(err) { // a client that went away was not slow
			s.srv.cfg.metrics.slow.WithLabelValues(s.srv.cfg.metrics.lv(s.dbName(), "write")...).Inc()
		}
		s.log.Debug("write", "err", err)
		// Part of a message may have gone out, so no Error message can
		// follow it: reset the stream with the reason as its error code.
		s.stream.CancelWrite(quic.StreamErrorCode(protocol.CodeSlowClient))
		s.fail(protocol.CodeSlowClient, "write failed")
		return false
	}
	return true
}

// finish ends the stream from the sender's side.
func (s *session) finish() {
	s.mu.Lock()
	s.queue = nil
	if s.closing == nil {
		s.closing = &protocol.Error{Code: protocol.CodeShuttingDown}
	}
	s.mu.Unlock()
	s.stream.Close()
}
