package replica

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

// End-to-end tests of the sync loop against the real server over loopback
// QUIC.

const testDB, testSecret = "demo", "secret"

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// testServer is a running server and what a replica needs to reach it.
type testServer struct {
	t    testing.TB
	dir  string
	reg  *mutators.Registry
	cfg  server.Config
	srv  *server.Server
	addr string
	fp   string
}

// startServer opens a server on dir (a new temporary one if empty), adds
// the demo database, and listens on addr ("127.0.0.1:0" for any port).
func startServer(t testing.TB, reg *mutators.Registry, dir, addr string, tweak func(*server.Config)) *testServer {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	cfg := server.Config{Dir: dir, Mutators: reg, Setup: demoSetup, Logger: quietLog}
	if tweak != nil {
		tweak(&cfg)
	}
	ctx := context.Background()
	srv, err := server.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddDatabase(ctx, testDB, testSecret); err != nil {
		srv.Close()
		t.Fatal(err)
	}
	bound, err := srv.Listen(ctx, addr)
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	ts := &testServer{t: t, dir: dir, reg: reg, cfg: cfg, srv: srv, addr: bound, fp: srv.Fingerprint()}
	t.Cleanup(func() { ts.srv.Close() })
	return ts
}

// restart closes the server and opens it again on the same directory and
// port, as a server process restarting would.
func (ts *testServer) restart() {
	ts.t.Helper()
	if err := ts.srv.Close(); err != nil {
		ts.t.Fatal(err)
	}
	ctx := context.Background()
	srv, err := server.Open(ctx, ts.cfg)
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.srv = srv
	if _, err := srv.Listen(ctx, ts.addr); err != nil {
		ts.t.Fatal(err)
	}
}

func (ts *testServer) remote() *Remote {
	return &Remote{Addr: ts.addr, Database: testDB, Credential: testSecret, Fingerprint: ts.fp}
}

// openSynced opens a replica syncing with rm.
func openSynced(t testing.TB, path string, reg *mutators.Registry, rm *Remote) *Replica {
	t.Helper()
	r, err := Open(context.Background(), path, Options{Mutators: reg, Remote: rm, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func waitCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// converged waits until every replica is at the server's version with no
// pending mutation, then checks invariant 1 (checksums) and the rows.
func converged(t testing.TB, ts *testServer, rs ...*Replica) {
	t.Helper()
	ctx := waitCtx(t, 60*time.Second)
	auth := ts.srv.Authority(testDB)
	for {
		done := true
		v := auth.Version()
		for _, r := range rs {
			if err := r.Sync(ctx); err != nil {
				t.Fatalf("sync %s: %v (status %+v)", r.ClientID(), err, r.Status())
			}
			if st := r.Status(); st.Version != v || st.Pending != 0 {
				done = false
			}
		}
		if done && auth.Version() == v {
			break
		}
		select {
		case <-ctx.Done():
			for _, r := range rs {
				t.Logf("%s: %+v", r.ClientID(), r.Status())
			}
			t.Fatalf("replicas did not reach server version %d", auth.Version())
		case <-time.After(10 * time.Millisecond):
		}
	}
	want := categories(t, authQuery{auth})
	for _, r := range rs {
		st := r.Status()
		if st.Checksum != auth.Checksum() {
			t.Fatalf("replica %s at version %d: checksum %016x, server %016x", st.ClientID, st.Version, st.Checksum, auth.Checksum())
		}
		if got := categories(t, r.DB()); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("replica %s: %v, server %v", st.ClientID, got, want)
		}
	}
}

func isDone(h *Handle) bool {
	select {
	case <-h.Done():
		return true
	default:
		return false
	}
}

func incr(name string, by int) json.RawMessage { return mutators.CategoryArgs(name, int64(by)) }

// authQuery lets categories read the server's database.
type authQuery struct{ a *server.Authority }

func (q authQuery) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	return q.a.Query(ctx, query, args...)
}

// goroutines waits for the goroutine count to come back to at most base
// (some of quic-go's and database/sql's wind down asynchronously).
func checkGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= base {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines left, %d before:\n%s", n, base, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSyncConverges: several replicas, some sharing one connection, mutate
// concurrently; they all end at the server's version, byte for byte, and
// the server ran every mutation once.
func TestSyncConverges(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	shared := NewTransport(TransportOptions{Logger: quietLog})
	defer shared.Close()
	dir := t.TempDir()
	var rs []*Replica
	for i := range 4 {
		rm := ts.remote()
		if i < 3 {
			rm.Transport = shared // three share one connection, one has its own
		}
		rs = append(rs, openSynced(t, filepath.Join(dir, fmt.Sprintf("r%d.db", i)), reg, rm))
	}
	per := 25
	if testing.Short() {
		per = 8
	}
	ctx := waitCtx(t, 60*time.Second)
	var wg sync.WaitGroup
	handles := make([][]*Handle, len(rs))
	for i, r := range rs {
		wg.Go(func() {
			for j := range per {
				h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr([]string{"Food", "Rent", "Fun"}[j%3], i+1))
				if err != nil {
					t.Error(err)
					return
				}
				handles[i] = append(handles[i], h)
			}
		})
	}
	wg.Wait()
	for i := range rs {
		for _, h := range handles[i] {
			if err := h.Wait(ctx); err != nil {
				t.Fatalf("replica %d mutation %d: %v", i, h.ID, err)
			}
		}
	}
	converged(t, ts, rs...)
	got := categories(t, authQuery{ts.srv.Authority(testDB)})
	total := int64(0)
	for _, c := range got {
		total += c
	}
	if want := int64(per * (1 + 2 + 3 + 4)); total != want {
		t.Fatalf("server counts %v sum to %d, want %d (a mutation lost or run twice)", got, total, want)
	}
	for _, r := range rs {
		if st := r.Status(); !st.Connected || st.LastError != nil || st.ServerVersion != st.Version {
			t.Fatalf("status %+v", st)
		}
	}
	shared.mu.Lock()
	n := len(shared.peers)
	shared.mu.Unlock()
	if n != 1 {
		t.Fatalf("shared transport has %d connections, want 1", n)
	}
}

// splitRegistries returns a client registry whose "flaky" mutator inserts a
// row and a server registry whose "flaky" fails: the optimistic effect is
// there until the server's rejection arrives.
func splitRegistries(t testing.TB) (client, srv *mutators.Registry) {
	client, srv = testRegistry(t), testRegistry(t)
	client.MustRegister("flaky", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES('Flaky', 1)`)
		return err
	})
	srv.MustRegister("flaky", func(ctx context.Context, tx mutators.Tx, args json.RawMessage) error {
		return errors.New("flaky is refused on the server")
	})
	return client, srv
}

// TestSyncRejection: a mutation the server rejects settles with the server's
// message, leaves the queue, its optimistic effect goes, and the mutations
// after it are applied.
func TestSyncRejection(t *testing.T) {
	creg, sreg := splitRegistries(t)
	ts := startServer(t, sreg, "", "127.0.0.1:0", nil)
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), creg, ts.remote())
	ctx := waitCtx(t, 30*time.Second)
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	h1 := mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	h2 := mustMutate(t, r, "flaky", json.RawMessage(`null`))
	// The optimistic row is there until the rejection arrives (unless it
	// already has: loopback is fast).
	if _, ok := categories(t, r.DB())["Flaky"]; !ok && !isDone(h2) {
		t.Fatal("the optimistic row is missing")
	}
	h3 := mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 2))
	if err := h1.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	var rej *RejectedError
	if err := h2.Wait(ctx); !errors.As(err, &rej) || !strings.Contains(rej.Message, "flaky is refused on the server") || rej.ID != h2.ID {
		t.Fatalf("rejected mutation: %v", err)
	}
	if err := h3.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r)
	got := categories(t, r.DB())
	if _, ok := got["Flaky"]; ok || got["Food"] != 3 {
		t.Fatalf("after the rejection: %v", got)
	}
	if r.Handle(h2.ID) != nil || r.Status().Pending != 0 {
		t.Fatalf("rejected mutation still pending: %+v", r.Status())
	}
}

// freeUDPAddr returns a loopback UDP address nobody listens on now.
func freeUDPAddr(t testing.TB) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := c.LocalAddr().String()
	c.Close()
	return addr
}

// TestSyncOfflineThenOnline: a replica whose server is not there yet works
// offline for many mutations, then pushes them all once the server comes.
func TestSyncOfflineThenOnline(t *testing.T) {
	reg := testRegistry(t)
	addr := freeUDPAddr(t)
	// The server's certificate is made at Open: open it first, listen later.
	dir := t.TempDir()
	ctx := context.Background()
	cfg := server.Config{Dir: dir, Mutators: reg, Setup: demoSetup, Logger: quietLog}
	srv, err := server.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddDatabase(ctx, testDB, testSecret); err != nil {
		t.Fatal(err)
	}
	ts := &testServer{t: t, dir: dir, reg: reg, cfg: cfg, srv: srv, addr: addr, fp: srv.Fingerprint()}
	t.Cleanup(func() { ts.srv.Close() })

	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, ts.remote())
	n := 300
	if testing.Short() {
		n = 60
	}
	for i := range n {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", i%5+1))
	}
	// Offline: a Sync only ends with its context, and the status says why.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if err := r.Sync(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("offline sync: %v", err)
	}
	if st := r.Status(); st.Connected || st.Pending != n || st.Version != 0 {
		t.Fatalf("offline status: %+v", st)
	}
	if !testing.Short() {
		// A dial to nobody fails at QUIC's handshake timeout (5 s).
		deadline := time.Now().Add(20 * time.Second)
		for r.Status().LastError == nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if st := r.Status(); st.LastError == nil || st.Connected {
			t.Fatalf("offline status: %+v", st)
		}
		t.Logf("offline: %v", r.Status().LastError)
	}
	if _, err := srv.Listen(ctx, addr); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r)
	if got, want := categories(t, r.DB())["Food"], int64(3*n); got != want {
		t.Fatalf("Food = %d, want %d", got, want)
	}
}

// TestSyncServerRestart: the server goes away and comes back on the same
// directory and port; the replica reconnects by itself, and what it made
// meanwhile reaches the server once.
func TestSyncServerRestart(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, ts.remote())
	ctx := waitCtx(t, 60*time.Second)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	converged(t, ts, r)

	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", i+1))
	}
	// The replica notices the server is gone (QUIC closes the connection).
	for r.Status().Connected {
		if ctx.Err() != nil {
			t.Fatal("still connected to a closed server")
		}
		time.Sleep(10 * time.Millisecond)
	}
	srv, err := server.Open(context.Background(), ts.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ts.srv = srv
	if _, err := srv.Listen(context.Background(), ts.addr); err != nil {
		t.Fatal(err)
	}
	converged(t, ts, r)
	if got := categories(t, r.DB())["Food"]; got != 1+20*21/2 {
		t.Fatalf("Food = %d", got)
	}
}

// TestSyncConnectionKills cuts the shared connection again and again while
// two replicas mutate: every session ends abruptly, pushes are repeated from
// the server's last id, and each mutation is still applied exactly once.
func TestSyncConnectionKills(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	tr := NewTransport(TransportOptions{Logger: quietLog})
	defer tr.Close()
	dir := t.TempDir()
	var rs []*Replica
	for i := range 2 {
		rm := ts.remote()
		rm.Transport = tr
		rs = append(rs, openSynced(t, filepath.Join(dir, fmt.Sprintf("r%d.db", i)), reg, rm))
	}
	ctx := waitCtx(t, 60*time.Second)
	for _, r := range rs {
		if err := r.WaitConnected(ctx); err != nil {
			t.Fatal(err)
		}
	}
	rounds := 15
	if testing.Short() {
		rounds = 5
	}
	var kills atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(30 * time.Millisecond):
			}
			tr.mu.Lock()
			for _, p := range tr.peers {
				p.mu.Lock()
				if p.conn != nil {
					p.conn.CloseWithError(1, "test kills the connection")
					kills.Add(1)
				}
				p.mu.Unlock()
			}
			tr.mu.Unlock()
		}
	})
	for i := range rounds {
		for j, r := range rs {
			for k := range 5 {
				mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr(fmt.Sprintf("c%d", k), 1+i+j))
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	converged(t, ts, rs...)
	want := int64(0)
	for i := range rounds {
		want += int64(1+i) + int64(2+i)
	}
	for k, c := range categories(t, authQuery{ts.srv.Authority(testDB)}) {
		if c != want {
			t.Fatalf("%s = %d, want %d (kills: %d)", k, c, want, kills.Load())
		}
	}
	if kills.Load() == 0 {
		t.Fatal("no connection was killed")
	}
}

// TestSyncRefusals: a wrong credential, an unknown database, a wrong
// certificate pin: each is a clear error from WaitConnected, Sync and a
// handle's Wait, stays in Status().LastError, stops the retries, and
// changes nothing locally.
func TestSyncRefusals(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	other := "sha256:" + strings.Repeat("ab", 32)
	cases := []struct {
		name  string
		edit  func(*Remote)
		check func(error) bool
	}{
		{"wrong credential", func(rm *Remote) { rm.Credential = "wrong" }, func(err error) bool {
			var re *protocol.RemoteError
			return errors.As(err, &re) && re.Code == protocol.CodeUnauthorized
		}},
		{"unknown database", func(rm *Remote) { rm.Database = "nope" }, func(err error) bool {
			var re *protocol.RemoteError
			return errors.As(err, &re) && re.Code == protocol.CodeUnknownDatabase
		}},
		{"wrong fingerprint", func(rm *Remote) { rm.Fingerprint = other }, func(err error) bool {
			return errors.Is(err, protocol.ErrFingerprint)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rm := ts.remote()
			c.edit(rm)
			r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
			h := mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
			ctx := waitCtx(t, 30*time.Second)
			err := r.WaitConnected(ctx)
			if err == nil || !c.check(err) {
				t.Fatalf("WaitConnected: %v", err)
			}
			t.Logf("refusal: %v", err)
			if err := r.Sync(ctx); !c.check(err) {
				t.Fatalf("Sync: %v", err)
			}
			if err := h.Wait(ctx); !c.check(err) {
				t.Fatalf("Handle.Wait: %v", err)
			}
			st := r.Status()
			if st.Connected || !c.check(st.LastError) || st.Version != 0 || st.Pending != 1 {
				t.Fatalf("status: %+v", st)
			}
			if got := categories(t, r.DB())["Food"]; got != 1 {
				t.Fatalf("optimistic state changed: Food = %d", got)
			}
		})
	}
}

// TestOpenRemoteValidation: there is no insecure mode, and a Remote that
// cannot work fails Open rather than a retry loop.
func TestOpenRemoteValidation(t *testing.T) {
	reg := testRegistry(t)
	for _, rm := range []*Remote{
		{Addr: "127.0.0.1:1", Database: "d"},
		{Addr: "127.0.0.1:1", Database: "d", Fingerprint: "sha256:xyz"},
		{Addr: "127.0.0.1:1", Database: "d", CAFile: filepath.Join(t.TempDir(), "none.pem")},
		{Addr: "nohost", Database: "d", Fingerprint: "sha256:" + strings.Repeat("00", 32)},
		{Database: "d", Fingerprint: "sha256:" + strings.Repeat("00", 32)},
		{Addr: "127.0.0.1:1", Fingerprint: "sha256:" + strings.Repeat("00", 32)},
		{Addr: "127.0.0.1:1", Database: "d", Fingerprint: "sha256:" + strings.Repeat("00", 32), Credential: "s",
			Token: func(context.Context) (string, error) { return "t", nil }},
	} {
		r, err := Open(context.Background(), filepath.Join(t.TempDir(), "r.db"), Options{Mutators: reg, Remote: rm})
		if err == nil {
			r.Close()
			t.Fatalf("Open with %+v succeeded", rm)
		}
		t.Logf("%v", err)
	}
	// Without a Remote, the network waits say so.
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	if err := r.Sync(context.Background()); !errors.Is(err, ErrNoRemote) {
		t.Fatalf("Sync without remote: %v", err)
	}
}

// TestSyncSnapshotBootstrap: a replica further behind than the server's
// change log reaches catches up with a snapshot, reports its progress, and
// then follows live versions.
func TestSyncSnapshotBootstrap(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) {
		c.Retention = server.Retention{Versions: 5}
		c.SegmentVersions = 5
	})
	dir := t.TempDir()
	// A starts, syncs, and goes away.
	a := openSynced(t, filepath.Join(dir, "a.db"), reg, ts.remote())
	converged(t, ts, a)
	a.Close()
	// B makes enough versions to push A's version out of the change log;
	// big rows so that the database has pages to ship.
	b := openSynced(t, filepath.Join(dir, "b.db"), reg, ts.remote())
	for i := range 40 {
		h := mustMutate(t, b, "exec", execArgs(fmt.Sprintf("INSERT INTO Categories(name, count) VALUES('%s', %d)", strings.Repeat(fmt.Sprint(i), 500), i)))
		if err := h.Wait(waitCtx(t, 30*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	converged(t, ts, b)
	var mu sync.Mutex
	var progress []uint32
	var total uint32
	rm := ts.remote()
	rm.OnSnapshotProgress = func(done, tot uint32) {
		mu.Lock()
		progress = append(progress, done)
		total = tot
		mu.Unlock()
	}
	a = openSynced(t, filepath.Join(dir, "a.db"), reg, rm)
	mustMutate(t, a, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 7))
	converged(t, ts, a, b)
	mu.Lock()
	defer mu.Unlock()
	if len(progress) == 0 || progress[len(progress)-1] != total || total < 5 {
		t.Fatalf("snapshot progress %v of %d", progress, total)
	}
	if got := categories(t, a.DB())["Food"]; got != 7 {
		t.Fatalf("Food = %d", got)
	}
	if st := a.Stats(); st.SnapshotsInstalled != 1 {
		t.Fatalf("Stats().SnapshotsInstalled = %d, want 1", st.SnapshotsInstalled)
	}
}

// TestSyncNoGoroutineLeak: opening and closing synced replicas, connected
// or not, leaves no goroutine behind.
func TestSyncNoGoroutineLeak(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	dir := t.TempDir()
	// Warm up what starts once per process (database/sql, quic-go).
	w := openSynced(t, filepath.Join(dir, "warm.db"), reg, ts.remote())
	converged(t, ts, w)
	w.Close()
	time.Sleep(50 * time.Millisecond)
	base := runtime.NumGoroutine()
	for i := range 3 {
		rm := ts.remote()
		if i == 2 {
			rm.Addr = freeUDPAddr(t) // never connects: closed mid-backoff
		}
		r, err := Open(context.Background(), filepath.Join(dir, fmt.Sprintf("r%d.db", i)), Options{Mutators: reg, Remote: rm, Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
		if i < 2 {
			if err := r.Sync(waitCtx(t, 30*time.Second)); err != nil {
				t.Fatal(err)
			}
		} else {
			time.Sleep(200 * time.Millisecond)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r.Sync(context.Background()); !errors.Is(err, ErrClosed) {
			t.Fatalf("Sync after Close: %v", err)
		}
	}
	checkGoroutines(t, base)
}

// latencyConn delays every datagram it sends: the way to run a replica over
// a slow link (TransportOptions.PacketConn). Datagrams may be reordered, as
// on a real network; QUIC copes.
type latencyConn struct {
	net.PacketConn
	delay time.Duration
	wg    sync.WaitGroup
}

// The socket options pass through, so quic-go can size its buffers (it
// warns otherwise).
func (c *latencyConn) SetReadBuffer(n int) error {
	return c.PacketConn.(*net.UDPConn).SetReadBuffer(n)
}

func (c *latencyConn) SetWriteBuffer(n int) error {
	return c.PacketConn.(*net.UDPConn).SetWriteBuffer(n)
}

func (c *latencyConn) SyscallConn() (syscall.RawConn, error) {
	return c.PacketConn.(*net.UDPConn).SyscallConn()
}

func (c *latencyConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	b := append([]byte(nil), p...)
	c.wg.Add(1)
	time.AfterFunc(c.delay, func() {
		defer c.wg.Done()
		c.PacketConn.WriteTo(b, addr)
	})
	return len(p), nil
}

// TestSyncOverSlowLink: two replicas behind a 40 ms (one way, outbound)
// link converge, and a round trip costs what the link says.
func TestSyncOverSlowLink(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lc := &latencyConn{PacketConn: udp, delay: 40 * time.Millisecond}
	tr := NewTransport(TransportOptions{PacketConn: lc, Logger: quietLog})
	dir := t.TempDir()
	var rs []*Replica
	for i := range 2 {
		rm := ts.remote()
		rm.Transport = tr
		rs = append(rs, openSynced(t, filepath.Join(dir, fmt.Sprintf("r%d.db", i)), reg, rm))
	}
	ctx := waitCtx(t, 30*time.Second)
	for _, r := range rs {
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	h := mustMutate(t, rs[0], mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(start); rtt < 40*time.Millisecond {
		t.Fatalf("confirmed in %v over a 40 ms link", rtt)
	}
	mustMutate(t, rs[1], mutators.CreateCategoryOrIncrementIfExists, incr("Food", 2))
	converged(t, ts, rs...)
	for _, r := range rs {
		r.Close()
	}
	// The socket is the caller's: the Transport stops using it, and the
	// caller closes it.
	tr.Close()
	lc.wg.Wait()
	udp.Close()
}

// TestSyncCAFile: a replica that verifies the server's certificate against
// a CA file connects; one given another CA is refused for good.
func TestSyncCAFile(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	// The self-signed certificate is its own CA; it names localhost.
	rm := ts.remote()
	rm.Fingerprint, rm.CAFile, rm.ServerName = "", filepath.Join(ts.dir, "cert.pem"), "localhost"
	r := openSynced(t, filepath.Join(t.TempDir(), "ok.db"), reg, rm)
	ctx := waitCtx(t, 30*time.Second)
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if _, _, err := protocol.LoadOrCreateCertificate(filepath.Join(other, "cert.pem"), filepath.Join(other, "key.pem"), nil); err != nil {
		t.Fatal(err)
	}
	rm = ts.remote()
	rm.Fingerprint, rm.CAFile, rm.ServerName = "", filepath.Join(other, "cert.pem"), "localhost"
	bad := openSynced(t, filepath.Join(t.TempDir(), "bad.db"), reg, rm)
	err := bad.WaitConnected(ctx)
	if !fatalSyncError(err) {
		t.Fatalf("another CA: %v", err)
	}
	t.Logf("refusal: %v", err)
}

// TestSyncBatchesRebases: a replica that comes back to many new versions
// applies them in a few rebases, not one each.
func TestSyncBatchesRebases(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	dir := t.TempDir()
	a := openSynced(t, filepath.Join(dir, "a.db"), reg, ts.remote())
	converged(t, ts, a)
	a.Close()
	b := openSynced(t, filepath.Join(dir, "b.db"), reg, ts.remote())
	const versions = 40
	for i := range versions {
		h := mustMutate(t, b, mutators.CreateCategoryOrIncrementIfExists, incr("Food", i))
		if err := h.Wait(waitCtx(t, 30*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	// A slow link, so that OnChange is registered before anything arrives.
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lc := &latencyConn{PacketConn: udp, delay: 30 * time.Millisecond}
	tr := NewTransport(TransportOptions{PacketConn: lc, Logger: quietLog})
	rm := ts.remote()
	rm.Transport = tr
	a = openSynced(t, filepath.Join(dir, "a.db"), reg, rm)
	var rebases atomic.Int64
	a.OnChange(func(c Change) {
		if c.Rebased {
			rebases.Add(1)
		}
	})
	converged(t, ts, a, b)
	if n := rebases.Load(); n == 0 || n > 3 {
		t.Fatalf("%d rebases for %d versions", n, versions)
	}
	t.Logf("%d rebases for %d versions", rebases.Load(), versions)
	a.Close()
	tr.Close()
	lc.wg.Wait()
	udp.Close()
}

// TestSyncHistoryAhead: a replica whose files were restored from a backup
// older than the server's record of its client would reuse mutation ids
// the server already processed (and skip as duplicates). It stops with
// ErrHistoryAhead instead of losing them silently.
func TestSyncHistoryAhead(t *testing.T) {
	reg := testRegistry(t)
	ts := startServer(t, reg, "", "127.0.0.1:0", nil)
	dir := t.TempDir()
	path := filepath.Join(dir, "r.db")
	ctx := waitCtx(t, 30*time.Second)
	r, err := Open(ctx, path, Options{Mutators: reg, Remote: ts.remote(), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	r.Close()
	backup := t.TempDir()
	files, _ := filepath.Glob(path + "*")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(backup, filepath.Base(f)), b, 0o644)
	}
	r = openSynced(t, path, reg, ts.remote())
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	r.Close()
	for _, f := range files {
		os.Remove(f)
	}
	restored, _ := filepath.Glob(filepath.Join(backup, "*"))
	for _, f := range restored {
		b, _ := os.ReadFile(f)
		os.WriteFile(filepath.Join(dir, filepath.Base(f)), b, 0o644)
	}
	r = openSynced(t, path, reg, ts.remote())
	if err := r.WaitConnected(ctx); !errors.Is(err, ErrHistoryAhead) {
		t.Fatalf("WaitConnected of a restored replica: %v, want ErrHistoryAhead", err)
	}
	if v := ts.srv.Authority(testDB).Version(); r.Status().Version >= v {
		t.Fatalf("the restored replica caught up anyway (version %d of %d)", r.Status().Version, v)
	}
}
