package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// pinnedDB opens a database of srv and pins it open, as Authority does.
func pinnedDB(t testing.TB, srv *Server, name string) *database {
	t.Helper()
	tn, err := srv.tenant(name)
	if err != nil {
		t.Fatal(err)
	}
	d, err := srv.reg.pin(t.Context(), tn)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// fakeRegistry is a registry whose databases are empty structs: opening
// and closing count, and may be held up by the test.
type fakeRegistry struct {
	*registry
	opens, closes atomic.Int64
	openGate      chan struct{} // if set, an opening waits for it
	closeGate     chan struct{} // if set, a closing waits for it
}

func newFakeRegistry(t *testing.T, idle time.Duration, maxOpen int, wait time.Duration) *fakeRegistry {
	cfg := &Config{IdleClose: idle, MaxOpenDatabases: maxOpen, OpenWait: wait}
	f := &fakeRegistry{registry: newRegistry(slog.New(slog.NewTextHandler(io.Discard, nil)), cfg)}
	f.openDB = func(ctx context.Context, tn *tenant) (*database, error) {
		if f.openGate != nil {
			<-f.openGate
		}
		f.opens.Add(1)
		return &database{name: tn.name}, nil
	}
	f.closeDB = func(d *database) error {
		if f.closeGate != nil {
			<-f.closeGate
		}
		f.closes.Add(1)
		return nil
	}
	t.Cleanup(func() { f.closeAll() })
	return f
}

func (f *fakeRegistry) tenant(t *testing.T, name string) *tenant {
	tn, err := f.add(name, "")
	if err != nil {
		t.Fatal(err)
	}
	return tn
}

// bounded runs fn and fails the test with a goroutine dump if it has not
// returned within 15 s.
func bounded(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("%s did not return within 15 s:\n%s", what, buf[:runtime.Stack(buf, true)])
	}
}

func (f *fakeRegistry) state(tn *tenant) tstate {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	return tn.life.state
}

// TestRegistryOpensOnce: many acquirers of a closed database at once open
// it once and all get the same database.
func TestRegistryOpensOnce(t *testing.T) {
	f := newFakeRegistry(t, time.Hour, 10, time.Second)
	f.openGate = make(chan struct{})
	tn := f.tenant(t, "a")
	var wg sync.WaitGroup
	got := make([]*database, 20)
	for i := range got {
		wg.Go(func() {
			d, err := f.acquire(context.Background(), tn)
			if err != nil {
				t.Error(err)
			}
			got[i] = d
		})
	}
	time.Sleep(20 * time.Millisecond) // let them pile up on the opening
	close(f.openGate)
	bounded(t, "20 acquires", wg.Wait)
	for _, d := range got {
		if d != got[0] || d == nil {
			t.Fatal("acquirers got different databases")
		}
	}
	if n := f.opens.Load(); n != 1 {
		t.Fatalf("opened %d times", n)
	}
}

// TestRegistryIdleClose: the last release arms the idle timer; the
// database closes after IdleClose and reopens on the next acquire. An
// acquire before the timer fires keeps it open.
func TestRegistryIdleClose(t *testing.T) {
	f := newFakeRegistry(t, 50*time.Millisecond, 10, time.Second)
	tn := f.tenant(t, "a")
	if _, err := f.acquire(context.Background(), tn); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if f.state(tn) != tOpen {
		t.Fatal("closed while held")
	}
	f.release(tn)
	eventually(t, "idle close", func() bool { return f.state(tn) == tClosed })
	if _, open := f.counts(); open != 0 || f.closes.Load() != 1 {
		t.Fatalf("%d open, %d closes", open, f.closes.Load())
	}
	if _, err := f.acquire(context.Background(), tn); err != nil || f.opens.Load() != 2 {
		t.Fatalf("reopen: %v, %d opens", err, f.opens.Load())
	}
	f.release(tn)
	if _, err := f.acquire(context.Background(), tn); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	if f.state(tn) != tOpen {
		t.Fatal("a timer armed before an acquire closed the database")
	}
}

// TestRegistryBound: at MaxOpenDatabases, opening another closes the least
// recently used idle one; with none idle it waits OpenWait and says
// ErrBusy, or opens as soon as one becomes idle.
func TestRegistryBound(t *testing.T) {
	f := newFakeRegistry(t, time.Hour, 2, 100*time.Millisecond)
	a, b, c, d := f.tenant(t, "a"), f.tenant(t, "b"), f.tenant(t, "c"), f.tenant(t, "d")
	ctx := context.Background()
	for _, tn := range []*tenant{a, b} {
		if _, err := f.acquire(ctx, tn); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.acquire(ctx, c); !errors.Is(err, ErrBusy) {
		t.Fatalf("a third with two held: %v, want ErrBusy", err)
	}
	if f.state(c) != tClosed {
		t.Fatalf("refused, yet %v", f.state(c))
	}
	f.release(b)
	time.Sleep(time.Millisecond)
	f.release(a) // a is now the most recently used
	if _, err := f.acquire(ctx, c); err != nil {
		t.Fatal(err)
	}
	if f.state(b) != tClosed || f.state(a) != tOpen {
		t.Fatalf("evicted: a %v, b %v; want b (least recently used)", f.state(a), f.state(b))
	}
	// All held again (c, and a re-acquired): d waits until one is idle.
	if _, err := f.acquire(ctx, a); err != nil {
		t.Fatal(err)
	}
	f.openWait = 10 * time.Second
	done := make(chan error, 1)
	go func() {
		_, err := f.acquire(ctx, d)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("opened past the bound: %v", err)
	default:
	}
	f.release(c)
	bounded(t, "the waiting acquire", func() {
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	if f.state(c) != tClosed || f.state(d) != tOpen {
		t.Fatalf("c %v, d %v", f.state(c), f.state(d))
	}
	if _, open := f.counts(); open != 2 {
		t.Fatalf("%d open, bound 2", open)
	}
}

// TestRegistryAcquireDuringClose: an acquire that comes while the database
// is closing waits for the close and gets a newly opened database, never
// the closed one.
func TestRegistryAcquireDuringClose(t *testing.T) {
	f := newFakeRegistry(t, 10*time.Millisecond, 10, time.Second)
	f.closeGate = make(chan struct{})
	tn := f.tenant(t, "a")
	first, err := f.acquire(context.Background(), tn)
	if err != nil {
		t.Fatal(err)
	}
	f.release(tn)
	eventually(t, "closing", func() bool { return f.state(tn) == tClosing })
	got := make(chan *database, 1)
	go func() {
		d, err := f.acquire(context.Background(), tn)
		if err != nil {
			t.Error(err)
		}
		got <- d
	}()
	time.Sleep(20 * time.Millisecond)
	select {
	case <-got:
		t.Fatal("acquired while closing")
	default:
	}
	close(f.closeGate)
	var d *database
	bounded(t, "the acquire after the close", func() { d = <-got })
	if d == first || d == nil || f.opens.Load() != 2 {
		t.Fatalf("got the closed database again (opens %d)", f.opens.Load())
	}
}

// TestRegistryRace: acquires and releases of a few databases from many
// goroutines under a tight bound and a short idle time; every acquired
// database is open while held (checked against the fake's own record of
// what it closed), and the bound holds. Run with -race.
func TestRegistryRace(t *testing.T) {
	f := newFakeRegistry(t, time.Millisecond, 3, 5*time.Second)
	var mu sync.Mutex
	closedDBs := map[*database]bool{}
	maxOpen := 0
	f.closeDB = func(d *database) error {
		mu.Lock()
		closedDBs[d] = true
		mu.Unlock()
		return nil
	}
	open := f.openDB
	f.openDB = func(ctx context.Context, tn *tenant) (*database, error) {
		_, n := f.counts()
		mu.Lock()
		maxOpen = max(maxOpen, n)
		mu.Unlock()
		return open(ctx, tn)
	}
	ts := []*tenant{f.tenant(t, "a"), f.tenant(t, "b"), f.tenant(t, "c"), f.tenant(t, "d"), f.tenant(t, "e")}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				tn := ts[(g+i)%len(ts)]
				d, err := f.acquire(context.Background(), tn)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				bad := closedDBs[d]
				mu.Unlock()
				if bad {
					t.Error("handed out a closed database")
				}
				if i%3 == 0 {
					time.Sleep(time.Millisecond)
				}
				f.release(tn)
			}
		})
	}
	bounded(t, "the workers", wg.Wait)
	if maxOpen > 3 {
		t.Fatalf("%d open at once, bound 3", maxOpen)
	}
}
