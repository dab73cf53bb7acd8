package server

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// downCache is a tailCache whose Fresh fails while down is set, as
// Owner.Fresh does while the lease cannot be reached (a partition, or a
// stream leader election).
type downCache struct {
	tailCache
	dmu  sync.Mutex
	down bool
}

var errLeaseUnreachable = errors.New("fake cache: no response from the lease bucket")

func (f *downCache) Fresh(ctx context.Context, db string, version, checksum uint64) (bool, error) {
	f.dmu.Lock()
	down := f.down
	f.dmu.Unlock()
	if down {
		return false, errLeaseUnreachable
	}
	return f.tailCache.Fresh(ctx, db, version, checksum)
}

func (f *downCache) setDown(down bool) {
	f.dmu.Lock()
	f.down = down
	f.dmu.Unlock()
}

// TestStoppedDatabaseOpensAgain: the log refuses a version and the reopen
// cannot reach the lease, so the database stops; Hellos are refused with
// the retryable internal error meanwhile. Once the lease can be reached, a
// Hello makes the database try the open again, and a later one is
// welcomed and its push acknowledged, without the database having to sit
// idle until it closes.
func TestStoppedDatabaseOpensAgain(t *testing.T) {
	ctx := context.Background()
	dc := &downCache{tailCache: tailCache{fakeLog: fakeLog{recs: map[uint64][]byte{}, fail: map[uint64]bool{}}}}
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = dc })
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "alice", Credential: "s3cret"})
	welcome(t, m)
	c.until(1)
	c.push(1)
	c.acked(1)
	a := srv.Authority("demo")
	sr, err := a.OpenSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img, err := sr.ReadPages(1, sr.DBSize)
	sr.Close()
	if err != nil {
		t.Fatal(err)
	}
	dc.mu.Lock()
	dc.image, dc.fail[3] = img, true
	dc.mu.Unlock()
	dc.setDown(true)
	c.push(2)
	for {
		if e, ok := c.read().(*protocol.Error); ok {
			if e.Code != protocol.CodeInternal {
				t.Fatalf("error %v, want the retryable internal error", e.Err())
			}
			break
		}
	}
	hello := protocol.Hello{Database: "demo", ClientID: "bob", Credential: "s3cret"}
	if _, m := openClient(t, conn, hello); !isInternal(m) {
		t.Fatalf("a stopped database answered a Hello with %T, want the retryable internal error", m)
	}
	dc.setDown(false)
	dc.mu.Lock()
	delete(dc.fail, 3)
	dc.mu.Unlock()
	deadline := time.Now().Add(15 * time.Second)
	for {
		b, m := openClient(t, conn, hello)
		if _, ok := m.(*protocol.Welcome); ok {
			b.until(2)
			b.push(1)
			b.acked(1)
			break
		}
		if !isInternal(m) {
			t.Fatalf("got %T, want a Welcome or the retryable internal error", m)
		}
		if time.Now().After(deadline) {
			t.Fatal("the stopped database still refuses Hellos 15 s after the lease can be reached again")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if dc.get(3) == nil {
		t.Fatal("the push after the database opened again did not reach the log")
	}
}

func isInternal(m protocol.Message) bool {
	e, ok := m.(*protocol.Error)
	return ok && e.Code == protocol.CodeInternal
}

// ownsCache is a tailCache that holds a lease (Owns) until deposed is
// set, and takes it back at the next Fresh, as Owner.Fresh does when the
// lease is free again.
type ownsCache struct {
	tailCache
	omu     sync.Mutex
	deposed bool
	freshes int
}

func (f *ownsCache) Owns(string) bool {
	f.omu.Lock()
	defer f.omu.Unlock()
	return !f.deposed
}

func (f *ownsCache) Fresh(ctx context.Context, db string, version, checksum uint64) (bool, error) {
	f.omu.Lock()
	f.deposed = false
	f.freshes++
	f.omu.Unlock()
	return f.tailCache.Fresh(ctx, db, version, checksum)
}

// TestLostLeaseReopensTheDatabase: an owner whose lease is lost without a
// refused append (no push came) ends its sessions with the retryable
// internal error within about a second and opens the database again
// through the check, instead of serving its last version while the log
// moves on; a new Hello is then welcomed and its push acknowledged.
func TestLostLeaseReopensTheDatabase(t *testing.T) {
	oc := &ownsCache{tailCache: tailCache{fakeLog: fakeLog{recs: map[uint64][]byte{}, fail: map[uint64]bool{}}}}
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = oc })
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "alice", Credential: "s3cret"})
	welcome(t, m)
	c.until(1)
	oc.omu.Lock()
	oc.deposed, oc.freshes = true, 0
	oc.omu.Unlock()
	for { // read waits at most 10 s
		if e, ok := c.read().(*protocol.Error); ok {
			if e.Code != protocol.CodeInternal {
				t.Fatalf("error %v, want the retryable internal error", e.Err())
			}
			break
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		b, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "bob", Credential: "s3cret"})
		if _, ok := m.(*protocol.Welcome); ok {
			b.until(1)
			b.push(1)
			b.acked(1)
			break
		}
		if !isInternal(m) || time.Now().After(deadline) {
			t.Fatalf("got %T after the lease was lost, want a Welcome once the database opened again", m)
		}
		time.Sleep(100 * time.Millisecond)
	}
	oc.omu.Lock()
	defer oc.omu.Unlock()
	if oc.freshes == 0 {
		t.Fatal("the database did not open again through the check")
	}
}
