package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// fakeLog is a VersionLog that records what it is given and refuses the
// versions in fail.
type fakeLog struct {
	mu   sync.Mutex
	recs map[uint64][]byte
	fail map[uint64]bool
}

var errRefused = errors.New("fake log: refused")

func (f *fakeLog) Append(ctx context.Context, db string, v uint64, rec []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ctx.Done() == nil {
		return errors.New("fake log: an unbounded context")
	}
	if f.fail[v] {
		return errRefused
	}
	f.recs[v] = bytes.Clone(rec)
	return nil
}

func (f *fakeLog) get(v uint64) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.recs[v]
}

// TestVersionLogGetsEveryVersionFirst: every version reaches the version
// log, as the change log stores it (the checksum before it, then the wire
// record the replicas received).
func TestVersionLogGetsEveryVersionFirst(t *testing.T) {
	fl := &fakeLog{recs: map[uint64][]byte{}, fail: map[uint64]bool{}}
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = fl })
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "alice", Credential: "s3cret"})
	welcome(t, m)
	c.until(1)
	c.push(1, 2)
	c.acked(2)
	for v := uint64(1); v <= 2; v++ {
		got := fl.get(v)
		wire, err := srv.EncodedVersion("demo", v)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) < logPrefix || !bytes.Equal(got[logPrefix:], wire) {
			t.Fatalf("version %d: the log got %d bytes, not the change log's record", v, len(got))
		}
		if v == 2 && binary.LittleEndian.Uint64(got) != checksumBefore(t, srv, 2) {
			t.Fatal("the log's record does not start with the checksum before the version")
		}
	}
}

// TestVersionLogRefusalIsNeverAcked: a version the log refuses is neither
// acknowledged nor sent; the pusher gets a retryable error and the
// database takes no more work.
func TestVersionLogRefusalIsNeverAcked(t *testing.T) {
	fl := &fakeLog{recs: map[uint64][]byte{}, fail: map[uint64]bool{2: true}}
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = fl })
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "alice", Credential: "s3cret"})
	welcome(t, m)
	c.until(1)
	watcher, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "bob", Credential: "s3cret", Version: c.im.version, Checksum: c.im.sums.Sum()})
	welcome(t, m)
	c.push(1)
	for {
		switch m := c.read().(type) {
		case *protocol.Ack:
			t.Fatalf("ack %+v of a version the log refused", m)
		case *protocol.Versions:
			t.Fatalf("version %d sent though the log refused it", m.Versions[0].Version)
		case *protocol.Error:
			if m.Code != protocol.CodeInternal {
				t.Fatalf("error %v, want the retryable internal error", m.Err())
			}
			if fl.get(2) != nil {
				t.Fatal("the refused version was recorded")
			}
			if _, err := srv.Authority("demo").Exec(context.Background(), func(mutators.Tx) error { return nil }); err == nil || !errors.Is(err, errRefused) {
				t.Fatalf("the database after a refusal: %v, want it stopped with the log's error", err)
			}
			// The other subscriber never saw version 2 either (a version
			// offered before the log's answer would be waiting for it by
			// now: the pusher's error came after).
			watcher.stream.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			if m, err := watcher.r.Read(); err == nil {
				if v, ok := m.(*protocol.Versions); ok {
					t.Fatalf("a subscriber got version %d, which the log refused", v.Versions[0].Version)
				}
			}
			return
		}
	}
}
