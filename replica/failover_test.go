package replica

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/internal/faultnet"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

func TestNodeCursorNext(t *testing.T) {
	for _, tc := range []struct {
		name             string
		in               nodeCursor
		nodes            int
		welcomed, moveOn bool
		want             nodeCursor
		wantNow          bool
	}{
		{"one node stays on a failure", nodeCursor{0, 0}, 1, false, true, nodeCursor{0, 1}, false},
		{"stays on a working node", nodeCursor{1, 0}, 3, true, false, nodeCursor{1, 0}, false},
		{"a session that worked clears failures", nodeCursor{1, 2}, 3, true, false, nodeCursor{1, 0}, false},
		{"a failure that is not the node's stays", nodeCursor{1, 1}, 3, false, false, nodeCursor{1, 1}, false},
		{"first failure moves on at once", nodeCursor{0, 0}, 2, false, true, nodeCursor{1, 1}, true},
		{"a full round of failures backs off", nodeCursor{1, 1}, 2, false, true, nodeCursor{0, 2}, false},
		{"the next round moves on at once again", nodeCursor{0, 2}, 2, false, true, nodeCursor{1, 3}, true},
		{"wraps round to Addr", nodeCursor{2, 0}, 3, false, true, nodeCursor{0, 1}, true},
		{"a welcomed node shutting down moves on at once", nodeCursor{0, 5}, 3, true, true, nodeCursor{1, 1}, true},
		{"an index out of range restarts at Addr", nodeCursor{7, 0}, 2, false, false, nodeCursor{0, 0}, false},
		{"zero nodes counts as one", nodeCursor{0, 0}, 0, false, true, nodeCursor{0, 1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, now := tc.in.next(tc.nodes, tc.welcomed, tc.moveOn)
			if got != tc.want || now != tc.wantNow {
				t.Fatalf("%+v.next(%d, %v, %v) = %+v, %v; want %+v, %v", tc.in, tc.nodes, tc.welcomed, tc.moveOn, got, now, tc.want, tc.wantNow)
			}
		})
	}
}

// TestNodeCursorRapid checks the cursor's promises over any sequence of
// outcomes: it stays in range, moves only on moveOn and then to the next
// node, never goes at once more than nodes-1 times in a row without a
// welcome in between (so that all
// nodes down is retried with backoff, not in a hot loop), and every node
// is tried within one round of failures.
func TestNodeCursorRapid(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		nodes := rapid.IntRange(1, 5).Draw(t, "nodes")
		var c nodeCursor
		inARow := 0
		tried := map[int]bool{0: true}
		steps := rapid.IntRange(1, 60).Draw(t, "steps")
		for i := range steps {
			welcomed := rapid.Bool().Draw(t, fmt.Sprint("welcomed", i))
			moveOn := rapid.Bool().Draw(t, fmt.Sprint("moveOn", i))
			next, now := c.next(nodes, welcomed, moveOn)
			if next.Cur < 0 || next.Cur >= nodes {
				t.Fatalf("cursor %d out of %d nodes", next.Cur, nodes)
			}
			if !moveOn && (next.Cur != c.Cur || now) {
				t.Fatalf("moved without moveOn: %+v -> %+v, now %v", c, next, now)
			}
			if moveOn && next.Cur != (c.Cur+1)%nodes {
				t.Fatalf("moved from %d to %d of %d", c.Cur, next.Cur, nodes)
			}
			if welcomed {
				// A welcomed session took a round trip of its own; the
				// count of failures starts again.
				tried, inARow = map[int]bool{}, 0
			}
			if now {
				inARow++
			} else {
				inARow = 0
			}
			if inARow > nodes-1 {
				t.Fatalf("%d attempts at once in a row with %d nodes", inARow, nodes)
			}
			tried[next.Cur] = true
			if !now && moveOn && len(tried) != nodes {
				t.Fatalf("backed off after a round that tried %d of %d nodes", len(tried), nodes)
			}
			if !now && moveOn {
				tried = map[int]bool{next.Cur: true}
			}
			c = next
		}
	})
}

func TestMoveOnError(t *testing.T) {
	remote := func(c protocol.Code) error { return fmt.Errorf("hello: %w", &protocol.RemoteError{Code: c}) }
	for _, tc := range []struct {
		err      error
		welcomed bool
		want     bool
	}{
		{nil, false, false},
		{errors.New("connect to 127.0.0.1:1: timeout"), false, true},
		{fmt.Errorf("%w within 5s", errNoWelcome), false, true},
		{remote(protocol.CodeShuttingDown), false, true},
		{remote(protocol.CodeShuttingDown), true, true},
		{remote(protocol.CodeBusy), false, true},
		{remote(protocol.CodeInternal), false, true},
		{remote(protocol.CodeInternal), true, false},
		{remote(protocol.CodeSlowClient), true, false},
		{remote(protocol.CodeCredentialExpired), true, false},
		{errors.New("connection lost"), true, false},
		{fmt.Errorf("%w: offline", errTokenSource), false, false},
		{fmt.Errorf("%w: nothing for 2.25s", errNodeSilent), true, true},
	} {
		if got := moveOnError(tc.err, tc.welcomed); got != tc.want {
			t.Errorf("moveOnError(%v, welcomed %v) = %v, want %v", tc.err, tc.welcomed, got, tc.want)
		}
	}
}

// startNode starts a second node that presents the same certificate as ts
// (the same key, as the docs ask of a cluster that uses Fingerprint), on a
// directory of its own.
func startNode(t *testing.T, ts *testServer, tweak func(*server.Config)) *testServer {
	return startServer(t, ts.reg, "", "127.0.0.1:0", func(c *server.Config) {
		c.CertFile, c.KeyFile = filepath.Join(ts.dir, "cert.pem"), filepath.Join(ts.dir, "key.pem")
		if tweak != nil {
			tweak(c)
		}
	})
}

// failoverCounts makes n increments on r and checks that the replica and
// the node b end with exactly want, with the replica on b's node.
func failoverCounts(t *testing.T, r *Replica, b *testServer, n, want int) {
	t.Helper()
	ctx := waitCtx(t, 60*time.Second)
	for i := range n {
		if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1)); err != nil {
			t.Fatalf("mutation %d: %v", i, err)
		}
	}
	converged(t, b, r)
	if got := categories(t, authQuery{b.srv.Authority(testDB)})["Food"]; got != int64(want) {
		t.Fatalf("node b counts %d, want %d", got, want)
	}
	if got := categories(t, r.DB())["Food"]; got != int64(want) {
		t.Fatalf("replica counts %d, want %d", got, want)
	}
	if st := r.Status(); st.Node != b.addr || !st.Connected {
		t.Fatalf("status %+v, want connected to %s", st, b.addr)
	}
}

// TestFailoverFirstNodeDown: the first node is closed; the replica moves
// to the second and syncs there, and stays.
func TestFailoverFirstNodeDown(t *testing.T) {
	reg := testRegistry(t)
	a := startServer(t, reg, "", "127.0.0.1:0", nil)
	b := startNode(t, a, nil)
	if a.fp != b.fp {
		t.Fatalf("nodes with one key have fingerprints %s and %s", a.fp, b.fp)
	}
	if err := a.srv.Close(); err != nil {
		t.Fatal(err)
	}
	rm := a.remote()
	rm.Alternates = []string{b.addr}
	tr := NewTransport(TransportOptions{Logger: quietLog, HandshakeTimeout: 300 * time.Millisecond})
	t.Cleanup(func() { tr.Close() })
	rm.Transport = tr
	start := time.Now()
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	if err := r.WaitConnected(waitCtx(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}
	// Informational: about one handshake timeout (300 ms here) for the
	// dead node, then one connection to b.
	t.Logf("connected to the second node %v after Open", time.Since(start).Round(time.Millisecond))
	failoverCounts(t, r, b, 10, 10)
	sessions := r.Stats().Sessions
	failoverCounts(t, r, b, 20, 30)
	if got := r.Stats().Sessions; got != sessions {
		t.Fatalf("sessions went from %d to %d: the replica left a working node", sessions, got)
	}
}

// TestFailoverFirstNodeBusy: the first node refuses the Hello with
// CodeBusy (it may hold one database open, and a session holds another);
// the replica moves to the second and syncs there.
func TestFailoverFirstNodeBusy(t *testing.T) {
	reg := testRegistry(t)
	a := startServer(t, reg, "", "127.0.0.1:0", func(c *server.Config) {
		c.MaxOpenDatabases, c.OpenWait = 1, 50*time.Millisecond
	})
	ctx := waitCtx(t, 30*time.Second)
	if err := a.srv.AddDatabase(ctx, "other", testSecret); err != nil {
		t.Fatal(err)
	}
	holder := openSynced(t, filepath.Join(t.TempDir(), "holder.db"), reg,
		&Remote{Addr: a.addr, Database: "other", Credential: testSecret, Fingerprint: a.fp})
	if err := holder.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	// The refusal this test relies on: a is busy for testDB.
	probe := openSynced(t, filepath.Join(t.TempDir(), "probe.db"), reg, a.remote())
	var re *protocol.RemoteError
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if err := probe.Status().LastError; errors.As(err, &re) && re.Code == protocol.CodeBusy {
			break
		}
		if st := probe.Status(); st.Connected || time.Now().After(deadline) {
			t.Fatalf("node a did not refuse with CodeBusy: %+v", st)
		}
	}
	probe.Close()

	b := startNode(t, a, nil)
	rm := a.remote()
	rm.Alternates = []string{b.addr}
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	failoverCounts(t, r, b, 15, 15)
}

// TestFailoverFatalOnAnyNode: a fatal refusal from the second node (a
// credential it does not know) stops sync, as it would with one node,
// rather than going back round to the first.
func TestFailoverFatalOnAnyNode(t *testing.T) {
	reg := testRegistry(t)
	a := startServer(t, reg, "", "127.0.0.1:0", nil)
	b := startNode(t, a, nil)
	ctx := waitCtx(t, 30*time.Second)
	if err := a.srv.Close(); err != nil {
		t.Fatal(err)
	}
	rm := a.remote()
	rm.Alternates = []string{b.addr}
	tr := NewTransport(TransportOptions{Logger: quietLog, HandshakeTimeout: 300 * time.Millisecond})
	t.Cleanup(func() { tr.Close() })
	rm.Transport = tr
	rm.Database = "nosuch" // a fatal CodeUnknownDatabase on b
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	err := r.WaitConnected(ctx)
	var re *protocol.RemoteError
	if !errors.As(err, &re) || re.Code != protocol.CodeUnknownDatabase {
		t.Fatalf("WaitConnected = %v, want the second node's CodeUnknownDatabase", err)
	}
}

// TestDeadAfterDefaults: a replica with Alternates counts a silent
// connection dead after 5 s, one without after QUIC's usual 20 s, unless
// told (cluster/trio_test.go shows the fail-over it buys).
func TestDeadAfterDefaults(t *testing.T) {
	for _, c := range []struct {
		rm   Remote
		want time.Duration
	}{
		{Remote{}, 20 * time.Second},
		{Remote{Alternates: []string{"b:1"}}, 5 * time.Second},
		{Remote{DeadAfter: 2 * time.Second}, 2 * time.Second},
		{Remote{DeadAfter: 30 * time.Second, Alternates: []string{"b:1"}}, 30 * time.Second},
	} {
		if got := c.rm.deadAfter(); got != c.want {
			t.Errorf("%+v: %v, want %v", c.rm, got, c.want)
		}
	}
}

func TestSilenceWatch(t *testing.T) {
	const limit = 2 * time.Second
	t0 := time.Unix(1000, 0)
	var w silenceWatch
	w, dead := w.look(7, t0, limit)
	if dead || w.Since != t0 || w.Received != 7 {
		t.Fatalf("a new watch: %+v dead %v", w, dead)
	}
	if w, dead = w.look(7, t0.Add(limit-time.Millisecond), limit); dead {
		t.Fatal("silent for less than the limit: dead")
	}
	if w, dead = w.look(8, t0.Add(limit+time.Second), limit); dead || w.Since != t0.Add(limit+time.Second) {
		t.Fatalf("a packet arrived: %+v dead %v", w, dead)
	}
	if _, dead = w.look(8, w.Since.Add(limit), limit); !dead {
		t.Fatal("silent for the limit: not dead")
	}
	// Not watching (zero) starts afresh, however old the count.
	if _, dead = (silenceWatch{}).look(8, t0.Add(time.Hour), limit); dead {
		t.Fatal("a watch that began now is dead")
	}
}

func TestSilenceLimit(t *testing.T) {
	for _, c := range []struct{ deadAfter, want time.Duration }{
		{deadAfterAlternates, 1250*time.Millisecond + silenceMargin},
		{deadAfterAlone, 5*time.Second + silenceMargin},
		{8 * time.Second, 2*time.Second + silenceMargin},
	} {
		if got := silenceLimit(c.deadAfter); got != c.want || got >= c.deadAfter {
			t.Errorf("silenceLimit(%v) = %v, want %v (below the idle timeout)", c.deadAfter, got, c.want)
		}
	}
}

// TestSilentNodeEndsAWaitingSession: the node stops sending anything at
// all (a relay in front of it drops every packet, as a SIGKILLed node's
// host sends nothing) while a push waits for its ack. The session ends
// with errNodeSilent a keep-alive period and silenceMargin after (3 s
// here), not after the idle timeout (DeadAfter, 8 s), and once the node
// answers again the mutation is confirmed, once.
func TestSilentNodeEndsAWaitingSession(t *testing.T) {
	reg := testRegistry(t)
	a := startServer(t, reg, "", "127.0.0.1:0", nil)
	rel, err := faultnet.Listen(faultnet.Config{Target: a.addr, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rel.Close() })
	rm := a.remote()
	rm.Addr, rm.DeadAfter = rel.Addr(), 8*time.Second
	r := openSynced(t, filepath.Join(t.TempDir(), "r.db"), reg, rm)
	ctx := waitCtx(t, 60*time.Second)
	h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rel.SetProfile(faultnet.Profile{Loss: 1}); err != nil {
		t.Fatal(err)
	}
	silent := time.Now()
	if h, err = r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr("Food", 1)); err != nil {
		t.Fatal(err)
	}
	// Whichever comes first ends the session: the silence watch after 3 s,
	// or QUIC's idle timeout after 8 s.
	for r.Status().LastError == nil {
		select {
		case <-ctx.Done():
			t.Fatalf("the session outlived a silent node: %+v", r.Status())
		case <-time.After(10 * time.Millisecond):
		}
	}
	st := r.Status()
	if !errors.Is(st.LastError, errNodeSilent) {
		t.Fatalf("the session with a silent node ended with %v, want errNodeSilent", st.LastError)
	}
	t.Logf("the session ended %v after the node went silent: %v", time.Since(silent).Round(time.Millisecond), st.LastError)
	if err := rel.SetProfile(faultnet.Profile{}); err != nil {
		t.Fatal(err)
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	converged(t, a, r)
	if got := categories(t, r.DB())["Food"]; got != 2 {
		t.Fatalf("the replica counts %d, want 2", got)
	}
}
