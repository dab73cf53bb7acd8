package server

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/wal"
)

// TestNextDeadline: every write starts with at least the write timeout
// before the armed deadline and at most the timeout plus the slack, and a
// sender writing every millisecond re-arms it about once per slack, not
// once per write.
func TestNextDeadline(t *testing.T) {
	const timeout = 10 * time.Second
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if d, ok := nextDeadline(start, time.Time{}, timeout); !ok || d != start.Add(timeout+deadlineSlack) {
		t.Fatalf("first write: %v %v, want a new deadline %v", d, ok, start.Add(timeout+deadlineSlack))
	}
	for seed := range uint64(50) {
		rng := rand.New(rand.NewPCG(seed, 1))
		now, armed, sets, writes := start, time.Time{}, 0, 0
		for now.Before(start.Add(time.Minute)) {
			d, ok := nextDeadline(now, armed, timeout)
			if left := d.Sub(now); left < timeout || left > timeout+deadlineSlack {
				t.Fatalf("seed %d: a write at %v gets %v, want %v to %v", seed, now.Sub(start), left, timeout, timeout+deadlineSlack)
			}
			if ok {
				sets++
			} else if d != armed {
				t.Fatalf("seed %d: kept deadline %v is not the armed %v", seed, d, armed)
			}
			armed = d
			writes++
			now = now.Add(time.Duration(rng.Int64N(int64(2 * time.Millisecond))))
		}
		if max := int(time.Minute/deadlineSlack) + 1; sets > max {
			t.Fatalf("seed %d: %d deadlines armed for %d writes in a minute, want at most %d", seed, sets, writes, max)
		}
	}
}

// TestSlowClientWriteTimeout: a client that reads nothing, behind a queue
// that never overflows, is cut off when its sender's write stays blocked
// for the write timeout (shortened here), with the reason as the stream's
// reset code.
func TestSlowClientWriteTimeout(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.Metrics = reg; c.writeTimeout = 300 * time.Millisecond })
	slow, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "slow", Credential: "s3cret"})
	welcome(t, m)
	a := srv.Authority("demo")
	// 40 incompressible versions of 64 KiB: more than QUIC's windows
	// take while nothing is read, far less than the queue's bounds.
	for i := 0; i < 40; i++ {
		if _, err := a.Exec(context.Background(), func(tx mutators.Tx) error {
			_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES (randomblob(65536), 1)`)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the blocked write cut off", func() bool {
		n, _ := scrape(t, reg, metricSlow, "reason", "write")
		return n == 1
	})
	if n, _ := scrape(t, reg, metricSlow, "reason", "queue"); n != 0 {
		t.Fatalf("queue cut-offs %v, want 0: the queue bound was not what cut it off", n)
	}
	for {
		slow.stream.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := slow.r.Read()
		var reset *quic.StreamError
		if errors.As(err, &reset) {
			if reset.ErrorCode != quic.StreamErrorCode(protocol.CodeSlowClient) {
				t.Fatalf("reset with code %d, want CodeSlowClient", reset.ErrorCode)
			}
			break
		}
		if err != nil {
			t.Fatalf("the slow client's stream ended without the reason: %v", err)
		}
	}
}

// TestOfferWake: a version queued for a session whose ack is coming does
// not wake its sender, the ack does, and a cut-off always does.
func TestOfferWake(t *testing.T) {
	srv, _ := testServer(t, t.TempDir(), func(c *Config) { c.SessionQueue = 2 })
	s := &session{srv: srv, wake: make(chan struct{}, 1), done: make(chan struct{})}
	woken := func() bool {
		select {
		case <-s.wake:
			return true
		default:
			return false
		}
	}
	if !s.offerWake(item{version: 1, rec: []byte{1}}, false) || woken() {
		t.Fatal("a quiet offer woke the sender, or was refused")
	}
	if !s.offer(item{ack: &protocol.Ack{LastMutationID: 1, Version: 1}}) || !woken() {
		t.Fatal("the ack did not wake the sender")
	}
	if len(s.queue) != 2 || s.queue[0].version != 1 || s.queue[1].ack == nil {
		t.Fatalf("queue %+v, want the version then the ack", s.queue)
	}
	if s.offerWake(item{version: 2, rec: []byte{1}}, false) || !woken() {
		t.Fatal("the cut-off of a full queue did not wake the sender to send the reason")
	}
	if s.closing == nil || s.closing.Code != protocol.CodeSlowClient {
		t.Fatalf("closing %v, want CodeSlowClient", s.closing)
	}
}

// TestPushersWokenFirst: while the writer runs a batch, the version it
// commits is queued for every subscriber, but only the pushers are woken
// (by their acks); the others are woken by wakeLater right after, and an
// Exec outside a batch wakes everyone at once. A lost wake would leave the
// other subscriber's version queued and unsent.
func TestPushersWokenFirst(t *testing.T) {
	ctx := context.Background()
	srv, _ := testServer(t, t.TempDir(), nil)
	d, err := openDatabase(ctx, "first", t.TempDir(), &srv.cfg, srv.log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.auth.Close(); d.clog.close() })
	newSession := func() *session {
		return &session{srv: srv, wake: make(chan struct{}, 1), done: make(chan struct{})}
	}
	woken := func(s *session) bool {
		select {
		case <-s.wake:
			return true
		default:
			return false
		}
	}
	pusher, other := newSession(), newSession()
	d.auth.mu.Lock()
	d.subs[pusher], d.subs[other] = struct{}{}, struct{}{}
	d.auth.mu.Unlock()
	bump := func() uint64 {
		ps, err := d.auth.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES ('x', 1) ON CONFLICT(name) DO UPDATE SET count = count + 1`)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return ps.Version
	}

	// A batch: the writer's window, with pusher in the batch.
	pusher.inBatch.Store(true)
	d.pushersFirst.Store(true)
	v := bump()
	pusher.inBatch.Store(false)
	if woken(pusher) || woken(other) {
		t.Fatal("a subscriber was woken by the batch's commit, before the pusher's ack")
	}
	pusher.offer(item{ack: &protocol.Ack{LastMutationID: 1, Version: v}})
	if !woken(pusher) || woken(other) {
		t.Fatal("the ack did not wake the pusher alone")
	}
	d.wakeLater()
	if !woken(other) {
		t.Fatal("wakeLater did not wake the other subscriber: its version would wait unsent")
	}
	if len(other.queue) != 1 || other.queue[0].version != v || len(pusher.queue) != 2 || pusher.queue[0].version != v {
		t.Fatalf("queues: other %+v, pusher %+v; want the version in both, before the pusher's ack", other.queue, pusher.queue)
	}
	if d.pushersFirst.Load() || len(d.later) != 0 {
		t.Fatal("wakeLater left the window open or kept sessions")
	}

	// Outside a batch (an Exec), every subscriber is woken at once.
	bump()
	if !woken(pusher) || !woken(other) {
		t.Fatal("a version outside a batch did not wake every subscriber")
	}
}

// quicPair is a QUIC connection on loopback with the server's settings and
// one stream: the server's end and the client's.
func quicPair(t *testing.T) (server, client *quic.Stream) {
	t.Helper()
	cert, _, err := protocol.LoadOrCreateCertificate(filepath.Join(t.TempDir(), "cert.pem"), filepath.Join(t.TempDir(), "key.pem"), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", protocol.ServerTLS(cert), protocol.QUICConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	conn := dial(t, ln.Addr().String(), protocol.Fingerprint(cert.Certificate[0]))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	client, err = conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write([]byte{0}); err != nil { // announce the stream
		t.Fatal(err)
	}
	sc, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sc.CloseWithError(0, "") })
	if server, err = sc.AcceptStream(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return server, client
}

// TestDirectWrite: while a session's sender is idle, an offer writes the
// queue to the stream itself, without waking the sender (one goroutine hop
// fewer per subscriber per version), skipping versions the sender already
// sent (a catch-up's); once the stream would block (a client that stopped
// reading), the queue stays for the sender, which is woken, and whose
// write deadline is what cuts such a client off.
func TestDirectWrite(t *testing.T) {
	ctx := context.Background()
	srv, _ := testServer(t, t.TempDir(), nil)
	d, err := openDatabase(ctx, "direct", t.TempDir(), &srv.cfg, srv.log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.auth.Close(); d.clog.close() })
	stream, client := quicPair(t)
	s := &session{srv: srv, stream: stream, recv: protocol.DefaultReceiveLimits, wake: make(chan struct{}, 1), done: make(chan struct{})}
	woken := func() bool {
		select {
		case <-s.wake:
			return true
		default:
			return false
		}
	}
	d.auth.mu.Lock()
	d.subs[s] = struct{}{}
	d.auth.mu.Unlock()
	bump := func(blob int) uint64 {
		ps, err := d.auth.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES (randomblob(?), 1)`, blob)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return ps.Version
	}
	r := protocol.NewReader(client, protocol.DefaultLimits)
	next := func() uint64 {
		t.Helper()
		client.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		vs, ok := m.(*protocol.Versions)
		if !ok || len(vs.Versions) != 1 {
			t.Fatalf("read %T %+v, want one version", m, m)
		}
		return vs.Versions[0].Version
	}

	// Not idle (the sender is writing, or not started): wake it.
	v := bump(10)
	if !woken() || len(s.queue) != 1 {
		t.Fatalf("a busy sender: woken? queue %d; want woken and the version queued", len(s.queue))
	}
	s.mu.Lock()
	s.queue, s.queueBytes = nil, 0
	s.idle, s.sent = true, v // as the sender leaves it after writing v
	s.mu.Unlock()

	// Idle: written here, in order, nobody woken.
	a, b := bump(10), bump(10)
	if woken() || len(s.queue) != 0 {
		t.Fatalf("an idle sender: woken, or %d left queued; want both written directly", len(s.queue))
	}
	if got := next(); got != a {
		t.Fatalf("read version %d, want %d", got, a)
	}
	if got := next(); got != b {
		t.Fatalf("read version %d, want %d", got, b)
	}
	// A version the sender sent already (catch-up) is not sent again.
	s.mu.Lock()
	s.queue = append(s.queue, item{version: b, rec: []byte{1}})
	s.flushLocked()
	s.mu.Unlock()
	c := bump(10)
	if got := next(); got != c {
		t.Fatalf("read version %d, want %d: version %d went out twice", got, c, b)
	}

	// A client that stopped reading: the stream fills up, the queue stays
	// and the sender is woken.
	for i := 0; ; i++ {
		if i == 500 {
			t.Fatal("500 versions of 16 KiB went out unread without the stream blocking")
		}
		bump(16 << 10)
		if woken() {
			break
		}
	}
	if len(s.queue) == 0 {
		t.Fatal("the sender was woken with nothing queued for it")
	}
}

// oneVersionRec is an encoded one-page version record, for the planning
// tests.
func oneVersionRec(t testing.TB) []byte {
	t.Helper()
	enc := protocol.NewEncoder()
	defer enc.Close()
	before := make([]byte, wal.DefaultPageSize)
	after := make([]byte, wal.DefaultPageSize)
	after[100] = 1
	ev, err := enc.Version(&wal.PageSet{Version: 2, PageSize: wal.DefaultPageSize, DBSize: 1, Pages: []wal.Page{{Pgno: 1, Data: after}}}, 1,
		func(uint32) []byte { return before })
	if err != nil {
		t.Fatal(err)
	}
	return ev.AppendBinary(nil)
}

// TestPlanDirectOneVersion: the direct write's short way for a queue of
// one version writes what the sender's planning would.
func TestPlanDirectOneVersion(t *testing.T) {
	rec := oneVersionRec(t)
	for _, l := range []protocol.ReceiveLimits{protocol.DefaultReceiveLimits, {MaxMessage: uint32(len(rec)) + 2, MaxVersions: 1, MaxVersionBytes: 1 << 20}} {
		s := &session{recv: l, queue: []item{{version: 2, rec: rec}}}
		got, sent, ok := s.planDirect(nil)
		var want []byte
		for _, f := range protocol.PlanFrames([]protocol.Item{{Version: 2, Rec: rec}}, l) {
			want = f.Append(want)
		}
		if !ok || sent != 2 || !bytes.Equal(got, want) {
			t.Fatalf("limits %+v: planned %x (sent %d, %v), want %x", l, got, sent, ok, want)
		}
	}
}

// BenchmarkPlanDirect is the planning of one version for a direct write:
// what each idle subscriber costs per version besides the write itself.
func BenchmarkPlanDirect(b *testing.B) {
	rec := oneVersionRec(b)
	s := &session{recv: protocol.DefaultReceiveLimits}
	var buf []byte
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.queue = append(s.queue[:0], item{version: uint64(i) + 1, rec: rec})
		buf, _, _ = s.planDirect(buf[:0])
	}
}
