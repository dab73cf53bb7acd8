package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
	"github.com/sqlrebase/sqlrebase/server"
)

// clusterNode is one node of an in-process test cluster: its Owner and its
// server, listening on loopback.
type clusterNode struct {
	owner *Owner
	srv   *server.Server
	addr  string
}

// startNode starts a node named name on dir: an Owner that runs forwarded
// pushes on its server.
func startNode(t *testing.T, ctx context.Context, sh shared, name, dir string) *clusterNode {
	t.Helper()
	return startNodeLogged(t, ctx, sh, name, dir, quiet)
}

// startNodeLogged is startNode with the Owner's logger.
func startNodeLogged(t *testing.T, ctx context.Context, sh shared, name, dir string, logger *slog.Logger) *clusterNode {
	t.Helper()
	o := NewOwner(sh.log, sh.leases, sh.snaps, name, logger)
	srv := serverAt(t, dir, o)
	o.SetForwardHandler(srv.ServeForwarded)
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &clusterNode{owner: o, srv: srv, addr: addr}
	t.Cleanup(func() { n.stop() })
	return n
}

// stop closes the node's server, then its Owner (which releases its leases).
func (n *clusterNode) stop() {
	n.srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n.owner.Close(ctx)
}

func openReplica(t *testing.T, ctx context.Context, srv *server.Server, addrs ...string) *replica.Replica {
	t.Helper()
	r, err := replica.Open(ctx, filepath.Join(t.TempDir(), "replica.db"), replica.Options{
		Mutators: demoRegistry(t),
		Remote:   &replica.Remote{Addr: addrs[0], Alternates: addrs[1:], Database: "demo.db", Credential: "s3cret", Fingerprint: srv.Fingerprint()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// increments makes n confirmed increments of name's row on r.
func increments(t *testing.T, ctx context.Context, r *replica.Replica, name string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		h, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(name, 1))
		if err != nil {
			t.Fatal(err)
		}
		if err := h.Wait(ctx); err != nil {
			t.Fatalf("%s increment %d: %v", name, i+1, err)
		}
	}
}

func count(t *testing.T, ctx context.Context, r *replica.Replica, name string) int {
	t.Helper()
	var n int
	if err := r.DB().QueryRowContext(ctx, "SELECT count FROM categories WHERE name = ?", name).Scan(&n); err != nil {
		t.Fatalf("count of %s: %v", name, err)
	}
	return n
}

// waitVersion waits until r holds at least version v.
func waitVersion(t *testing.T, ctx context.Context, r *replica.Replica, v uint64) {
	t.Helper()
	for r.Status().Version < v {
		select {
		case <-ctx.Done():
			t.Fatalf("replica at version %d, waiting for %d: %v", r.Status().Version, v, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestFollowerServesAndForwards: node A owns the database; node B, which
// does not, serves a replica all the same. B follows the stream into its
// own copy and fans the versions out to its replica, and forwards the
// replica's pushes to A, whose acks come back through B after the version
// they name. Both replicas end at the stream's tail with exact counts.
// Then A stops: B finds the lease free, takes the database over (its
// replica reconnects), and the next increments are acknowledged by B as
// the owner.
func TestFollowerServesAndForwards(t *testing.T) {
	ctx := bounded(t, 90*time.Second)
	sh := openShared(t, ctx, 2*time.Second)
	a := startNode(t, ctx, sh, "a", t.TempDir())
	rA := openReplica(t, ctx, a.srv, a.addr)
	increments(t, ctx, rA, "alice", 3)
	if !a.owner.Owns("demo.db") {
		t.Fatal("A does not own the database it served first")
	}

	b := startNode(t, ctx, sh, "b", t.TempDir())
	rB := openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 5)
	if b.owner.Owns("demo.db") {
		t.Fatal("B took the lease while A held it")
	}
	increments(t, ctx, rA, "alice", 2)
	tv, tsum := tailChecksum(t, ctx, sh.log, "demo.db")
	waitVersion(t, ctx, rA, tv)
	waitVersion(t, ctx, rB, tv)
	for _, r := range []*replica.Replica{rA, rB} {
		st := r.Status()
		if st.Version != tv || st.Checksum != tsum {
			t.Fatalf("replica at %d/%016x, the stream's tail %d/%016x", st.Version, st.Checksum, tv, tsum)
		}
		if got := count(t, ctx, r, "alice"); got != 5 {
			t.Errorf("alice = %d, want 5", got)
		}
		if got := count(t, ctx, r, "bob"); got != 5 {
			t.Errorf("bob = %d, want 5", got)
		}
	}

	// A goes away and releases its lease; B takes the database over.
	a.stop()
	increments(t, ctx, rB, "bob", 3)
	if !b.owner.Owns("demo.db") {
		t.Fatal("B did not take the database over")
	}
	tv, tsum = tailChecksum(t, ctx, sh.log, "demo.db")
	waitVersion(t, ctx, rB, tv)
	if st := rB.Status(); st.Checksum != tsum {
		t.Fatalf("B's replica at %d/%016x, the tail %d/%016x", st.Version, st.Checksum, tv, tsum)
	}
	if got := count(t, ctx, rB, "bob"); got != 8 {
		t.Errorf("bob = %d after the take-over, want 8", got)
	}
	if got := count(t, ctx, rB, "alice"); got != 5 {
		t.Errorf("alice = %d after the take-over, want 5", got)
	}
}

// TestFollowerCatchesUpFromATrimmedStream: a node that first follows a
// database after its stream was trimmed behind a snapshot builds its copy
// from the snapshot, and serves a replica from it.
func TestFollowerCatchesUpFromATrimmedStream(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	a := startNode(t, ctx, sh, "a", t.TempDir())
	auth := a.srv.Authority("demo.db")
	if auth == nil {
		t.Fatal("A did not open the database")
	}
	for id := uint64(1); id <= 4; id++ {
		if _, _, err := auth.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	putSnapshot(t, ctx, sh.snaps, sh.log, auth)
	if _, _, err := auth.Push(ctx, inc("alice", 5)); err != nil {
		t.Fatal(err)
	}
	b := startNode(t, ctx, sh, "b", t.TempDir())
	rB := openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 2)
	tv, tsum := tailChecksum(t, ctx, sh.log, "demo.db")
	waitVersion(t, ctx, rB, tv)
	if st := rB.Status(); st.Checksum != tsum || st.Version != tv {
		t.Fatalf("replica at %d/%016x, the tail %d/%016x", st.Version, st.Checksum, tv, tsum)
	}
	if got := count(t, ctx, rB, "Food"); got != 5 {
		t.Errorf("Food = %d, want 5", got)
	}
	if got := count(t, ctx, rB, "bob"); got != 2 {
		t.Errorf("bob = %d, want 2", got)
	}
	if b.owner.Owns("demo.db") {
		t.Fatal("B owns the database A holds")
	}
}

// TestIdleCloseReleasesTheLease: a database closed when idle gives its
// lease back, so that a node does not renew leases for databases it no
// longer serves, and the next node to serve it owns it.
func TestIdleCloseReleasesTheLease(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 2*time.Second)
	o := NewOwner(sh.log, sh.leases, sh.snaps, "a", quiet)
	t.Cleanup(func() { o.Close(context.Background()) })
	srv, err := server.Open(ctx, server.Config{
		Dir: t.TempDir(), Mutators: demoRegistry(t), Logger: quiet, VersionLog: o, IdleClose: 50 * time.Millisecond,
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.AddDatabase(ctx, "demo.db", "s3cret"); err != nil {
		t.Fatal(err)
	}
	if err := srv.WithAuthority(ctx, "demo.db", func(a *server.Authority) error {
		_, _, err := a.Push(ctx, inc("alice", 1))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for {
		h, _, err := sh.leases.Holder(ctx, "demo.db")
		if err != nil {
			t.Fatal(err)
		}
		if h == "" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the idle database's lease is still held by %s", h)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if o.Owns("demo.db") {
		t.Fatal("the owner still counts the closed database as its own")
	}
	b := startNode(t, ctx, sh, "b", t.TempDir())
	rB := openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 1)
	if !b.owner.Owns("demo.db") {
		t.Fatal("the next node to serve the database does not own it")
	}
	if got := count(t, ctx, rB, "Food"); got != 1 {
		t.Fatalf("Food = %d, want 1", got)
	}
}

// TestFollowWatchdog: a consumer that lets a whole period pass without a
// version the subject's tail holds is called stalled; one that keeps up,
// or a subject with nothing new, is not.
func TestFollowWatchdog(t *testing.T) {
	ctx := bounded(t, 30*time.Second)
	sh := openShared(t, ctx, 5*time.Second)
	o := NewOwner(sh.log, sh.leases, nil, "a", quiet)
	defer o.Close(ctx)
	ap, err := sh.log.NewAppender(ctx, "db", o.Token())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ap.Append(ctx, 1, []byte{1}); err != nil {
		t.Fatal(err)
	}
	watch := func(applied *atomic.Uint64, d time.Duration) bool {
		wctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		called := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			o.watchFollow(wctx, "db", applied, func() { close(called) })
		}()
		<-done
		select {
		case <-called:
			return true
		default:
			return false
		}
	}
	var caughtUp atomic.Uint64
	caughtUp.Store(1)
	if watch(&caughtUp, 3*followStall) {
		t.Fatal("a follower at the tail was called stalled")
	}
	var stuck atomic.Uint64
	if !watch(&stuck, 4*followStall) {
		t.Fatal("a follower a version behind the tail for two periods was not called stalled")
	}
}

// ownerAndFollower starts node A, which owns the database (its replica made
// one increment of "alice"), and node B, which follows it (its replica
// made one of "bob", forwarded to A), and returns A and B's replica.
func ownerAndFollower(t *testing.T, ctx context.Context) (a *clusterNode, rB *replica.Replica) {
	t.Helper()
	sh := openShared(t, ctx, 2*time.Second)
	a = startNode(t, ctx, sh, "a", t.TempDir())
	increments(t, ctx, openReplica(t, ctx, a.srv, a.addr), "alice", 1)
	b := startNode(t, ctx, sh, "b", t.TempDir())
	rB = openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 1)
	if !a.owner.Owns("demo.db") || b.owner.Owns("demo.db") {
		t.Fatal("A should own the database, B follow it")
	}
	return a, rB
}

// TestForwardToAVanishedOwnerEnds: B forwards its replica's push to A,
// which owns the database and never answers (a node that died with the
// request), then A's lease goes. B's watch of the lease ends the forward
// at once, instead of holding B's writer, and with it the take-over, for
// the forward's 10 s timeout: B takes the database over and the replica's
// mutation is confirmed well before that timeout would have run out.
func TestForwardToAVanishedOwnerEnds(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	a, rB := ownerAndFollower(t, ctx)
	held := make(chan struct{})
	unblock := make(chan struct{})
	defer close(unblock)
	a.owner.SetForwardHandler(func(ctx context.Context, db string, pushes []server.ForwardedPush) ([]server.ForwardedResult, error) {
		close(held)
		select { // the owner's node died with the request
		case <-unblock:
		case <-ctx.Done():
		}
		return nil, errors.New("never answered")
	})
	h, err := rB.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("bob", 1))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-held:
	case <-ctx.Done():
		t.Fatal("B's forward never reached A")
	}
	// A's server stops (it would open the database again, and take the
	// lease back), then its lease goes, as a dead node's runs out.
	a.srv.Close()
	gone := time.Now()
	a.owner.Drop("demo.db", errors.New("the test: A is gone"))
	// Without the watch, the forward would end only after forwardTimeout
	// (10 s) from when it began.
	wctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	defer cancel()
	if err := h.Wait(wctx); err != nil {
		t.Fatalf("the mutation forwarded to a vanished owner: %v (%v after its lease went)", err, time.Since(gone).Round(time.Millisecond))
	}
	t.Logf("confirmed %v after the owner's lease went", time.Since(gone).Round(time.Millisecond))
	if count(t, ctx, rB, "bob") != 2 {
		t.Fatalf("bob's count is %d, want 2", count(t, ctx, rB, "bob"))
	}
}

// TestTakeoverStartsFromTheFollowersCopy: a node that follows a database
// and then takes it over opens it from its follower's copy, which is at
// the stream's tail, instead of replaying the stream into the owner's
// file it never had: no restore runs, and the counts are exact.
func TestTakeoverStartsFromTheFollowersCopy(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 2*time.Second)
	a := startNode(t, ctx, sh, "a", t.TempDir())
	rA := openReplica(t, ctx, a.srv, a.addr)
	increments(t, ctx, rA, "alice", 5)
	var logs syncLog
	b := startNodeLogged(t, ctx, sh, "b", t.TempDir(), slog.New(slog.NewTextHandler(&logs, nil)))
	rB := openReplica(t, ctx, b.srv, b.addr)
	increments(t, ctx, rB, "bob", 3)
	if b.owner.Owns("demo.db") {
		t.Fatal("B owns the database it should follow")
	}
	a.stop()
	increments(t, ctx, rB, "bob", 2)
	if !b.owner.Owns("demo.db") {
		t.Fatal("B did not take the database over")
	}
	if strings.Contains(logs.String(), "restored database from the stream") {
		t.Fatalf("the take-over restored the database from the stream instead of opening the follower's copy:\n%s", logs.String())
	}
	if got := count(t, ctx, rB, "bob"); got != 5 {
		t.Errorf("bob = %d after the take-over, want 5", got)
	}
	if got := count(t, ctx, rB, "alice"); got != 5 {
		t.Errorf("alice = %d after the take-over, want 5", got)
	}
}

// syncLog is a log destination a test reads while the node writes it.
type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestFollowerParksPushesWhileNoOwnerAnswers: between owners, as when the
// old owner's lease has not yet run out, a forward finds no node that
// answers for the database. B parks its replica's push and forwards it
// again, instead of telling the replica to reconnect (which restarted its
// backoff and held its first confirmation seconds after a new owner
// served, in TestClusterFailover): the replica's session stays up, and
// the push is confirmed once an owner answers.
func TestFollowerParksPushesWhileNoOwnerAnswers(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	a, rB := ownerAndFollower(t, ctx)
	var refusing atomic.Bool
	var refused atomic.Int32
	refusing.Store(true)
	a.owner.SetForwardHandler(func(ctx context.Context, db string, pushes []server.ForwardedPush) ([]server.ForwardedResult, error) {
		if refusing.Load() {
			refused.Add(1)
			return nil, fmt.Errorf("%w: the test: no owner answers", server.ErrNotOwner)
		}
		return a.srv.ServeForwarded(ctx, db, pushes)
	})
	h, err := rB.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("bob", 1))
	if err != nil {
		t.Fatal(err)
	}
	// Three refusals: the push was parked and forwarded again twice. The
	// replica's session must stay up throughout.
	for refused.Load() < 3 {
		if st := rB.Status(); !st.Connected {
			t.Fatalf("B ended its replica's session while no owner answered (refusals %d): %v", refused.Load(), st.LastError)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("B forwarded the push %d times, want 3", refused.Load())
		case <-time.After(2 * time.Millisecond):
		}
	}
	refusing.Store(false)
	if err := h.Wait(ctx); err != nil {
		t.Fatalf("the parked push: %v", err)
	}
	if st := rB.Status(); !st.Connected {
		t.Fatalf("B's replica lost its session: %v", st.LastError)
	}
	if got := count(t, ctx, rB, "bob"); got != 2 {
		t.Fatalf("bob = %d, want 2", got)
	}
}

// TestVersionsReadsARange: Versions reads the records after a version
// through another (or to the subject's end), in order, with no consumer,
// and says ErrFollowGap for what the subject does not hold.
func TestVersionsReadsARange(t *testing.T) {
	ctx := bounded(t, 30*time.Second)
	sh := openShared(t, ctx, 2*time.Second)
	o := NewOwner(sh.log, sh.leases, sh.snaps, "a", quiet)
	defer o.Close(ctx)
	for v := uint64(1); v <= 10; v++ {
		if err := o.Append(ctx, "db", v, []byte(fmt.Sprintf("record %d", v))); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	collect := func(v uint64, rec []byte) error {
		got = append(got, fmt.Sprintf("%d=%s", v, rec))
		return nil
	}
	if err := o.Versions(ctx, "db", 3, 6, collect); err != nil {
		t.Fatal(err)
	}
	if want := "[4=record 4 5=record 5 6=record 6]"; fmt.Sprint(got) != want {
		t.Fatalf("Versions(3, 6) gave %v, want %s", got, want)
	}
	got = nil
	if err := o.Versions(ctx, "db", 8, 12, collect); !errors.Is(err, server.ErrFollowGap) || len(got) != 2 {
		t.Fatalf("Versions past the tail: %v after %v, want ErrFollowGap after 9 and 10", err, got)
	}
	got = nil
	if err := o.Versions(ctx, "db", 7, 0, collect); err != nil || fmt.Sprint(got) != "[8=record 8 9=record 9 10=record 10]" {
		t.Fatalf("Versions(7, to the tail): %v, %v", err, got)
	}
	got = nil
	if err := o.Versions(ctx, "db", 10, 0, collect); err != nil || len(got) != 0 {
		t.Fatalf("Versions(10, to the tail) at the tail: %v, %v", err, got)
	}
	if err := o.Versions(ctx, "db", 6, 6, collect); err != nil || len(got) != 0 {
		t.Fatalf("an empty range: %v, %v", err, got)
	}
	stop := errors.New("stop")
	if err := o.Versions(ctx, "db", 0, 10, func(v uint64, _ []byte) error { return stop }); !errors.Is(err, stop) {
		t.Fatalf("apply's error: %v", err)
	}
}

// stuckConsumer is an Owner whose consumers of the log never deliver, as
// on a node whose JetStream is not yet current with its meta leader.
type stuckConsumer struct{ *Owner }

func (s stuckConsumer) Follow(ctx context.Context, db string, after uint64, apply func(uint64, []byte) error) error {
	<-ctx.Done()
	return ctx.Err()
}

// TestFollowerCatchesUpWithoutAConsumer: a node whose consumer of the log
// delivers nothing still builds its copy to the stream's tail, with direct
// reads, and serves a replica at that version.
func TestFollowerCatchesUpWithoutAConsumer(t *testing.T) {
	ctx := bounded(t, 60*time.Second)
	sh := openShared(t, ctx, 2*time.Second)
	a := startNode(t, ctx, sh, "a", t.TempDir())
	rA := openReplica(t, ctx, a.srv, a.addr)
	increments(t, ctx, rA, "alice", 5)
	o := NewOwner(sh.log, sh.leases, sh.snaps, "b", quiet)
	srv := serverAt(t, t.TempDir(), stuckConsumer{o})
	o.SetForwardHandler(srv.ServeForwarded)
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Close()
		o.Close(context.Background())
	})
	rB := openReplica(t, ctx, srv, addr)
	waitVersion(t, ctx, rB, rA.Status().Version)
	if got := count(t, ctx, rB, "alice"); got != 5 {
		t.Fatalf("alice = %d on the node without a consumer, want 5", got)
	}
	if o.Owns("demo.db") {
		t.Fatal("B owns the database it should follow")
	}
}
