package server

import (
	"context"

	"errors"
	"github.com/sqlrebase/sqlrebase/protocol"
	"os"
	"path/filepath"
	"testing"
)

// fakeCache is a LocalCache over fakeLog whose tail is (version, sum)
// (version 0: an empty log), and whose Restore does what restore says.
type fakeCache struct {
	fakeLog
	version, sum uint64
	restore      func(path string) error
	restores     int
	drops        int // opens that failed after Fresh
}

func (f *fakeCache) Fresh(_ context.Context, _ string, version, checksum uint64) (bool, error) {
	if f.version == 0 { // an empty log: only a new file is its tail
		return version == 0, nil
	}
	return version == f.version && checksum == f.sum, nil
}

func (f *fakeCache) Drop(string, error) { f.drops++ }

func (f *fakeCache) Restore(_ context.Context, _, path string) error {
	f.restores++
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		return errors.New("fake cache: the stale file was not set aside before the restore")
	}
	return f.restore(path)
}

// TestLocalCacheRestoresAStaleFile: a file the cache refuses is set aside
// and replaced by the restore's, which is then served; one the restore
// leaves absent becomes a new database; a restore that fails, or gives a
// file the cache still refuses, fails the open instead of serving it.
func TestLocalCacheRestoresAStaleFile(t *testing.T) {
	ctx := context.Background()
	// A database at version 2 whose file serves as "the log's" image.
	src := t.TempDir()
	srv0, _ := testServer(t, src, nil)
	var v2, sum2 uint64
	if err := srv0.WithAuthority(ctx, "demo", func(a *Authority) error {
		if _, _, err := a.Push(ctx, []Mutation{upsert("alice", 1, "Food", 1)}); err != nil {
			return err
		}
		v2, sum2 = a.Version(), a.Checksum()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	srv0.Close()
	image, err := os.ReadFile(filepath.Join(src, "dbs", "demo", "db.sqlite"))
	if err != nil {
		t.Fatal(err)
	}
	copyImage := func(path string) error { return os.WriteFile(path, image, 0o644) }

	open := func(fc *fakeCache) (uint64, uint64, error) {
		fc.recs, fc.fail = map[uint64][]byte{}, map[uint64]bool{}
		srv, _ := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = fc })
		defer srv.Close()
		var v, sum uint64
		err := srv.WithAuthority(ctx, "demo", func(a *Authority) error { v, sum = a.Version(), a.Checksum(); return nil })
		return v, sum, err
	}

	fc := &fakeCache{version: v2, sum: sum2, restore: copyImage}
	if v, sum, err := open(fc); err != nil || v != v2 || sum != sum2 || fc.restores != 1 || fc.drops != 0 {
		t.Fatalf("new node: version %d, %016x, %v after %d restores; want the log's %d, %016x after 1", v, sum, err, fc.restores, v2, sum2)
	}
	if fc.get(1) != nil {
		t.Fatal("a restored database made its own version 1")
	}
	fc = &fakeCache{restore: func(string) error { return nil }} // an empty log
	if v, _, err := open(fc); err != nil || v != 1 || fc.restores != 0 || fc.get(1) == nil {
		t.Fatalf("empty log: version %d, %v, %d restores; want version 1, made here and appended, no restore", v, err, fc.restores)
	}
	fc = &fakeCache{version: v2, sum: sum2, restore: func(string) error { return errRefused }}
	if _, _, err := open(fc); !errors.Is(err, errRefused) || fc.drops != 1 {
		t.Fatalf("failed restore: %v, %d drops; want its error, and the cache told once", err, fc.drops)
	}
	fc = &fakeCache{version: v2, sum: sum2 + 1, restore: copyImage}
	if _, _, err := open(fc); !errors.Is(err, ErrStale) || fc.restores != 1 || fc.drops != 1 {
		t.Fatalf("restored file still refused: %v after %d restores, %d drops; want ErrStale after 1, and the cache told once", err, fc.restores, fc.drops)
	}
}

// tailCache is a LocalCache whose tail is the last version it accepted
// (fakeLog's records, 1..n), and whose Restore writes image.
type tailCache struct {
	fakeLog
	image    []byte
	restores int
}

func (f *tailCache) Fresh(_ context.Context, _ string, version, checksum uint64) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	last := uint64(len(f.recs))
	if last == 0 {
		return version == 0, nil
	}
	ev, err := protocol.DecodeEncodedVersion(f.recs[last][logPrefix:], protocol.DefaultLimits)
	if err != nil {
		return false, err
	}
	return version == last && checksum == ev.PostChecksum, nil
}

func (f *tailCache) Restore(_ context.Context, _, path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.restores++
	return os.WriteFile(path, f.image, 0o644)
}

func (f *tailCache) Drop(string, error) {}

// TestRefusedVersionReopensTheDatabase: once the log refuses a version,
// the pusher and every subscriber get the retryable internal error, and
// the database reopens at once from the log (the file restored to the
// log's tail, without the refused version) and takes the next push.
func TestRefusedVersionReopensTheDatabase(t *testing.T) {
	ctx := context.Background()
	tc := &tailCache{fakeLog: fakeLog{recs: map[uint64][]byte{}, fail: map[uint64]bool{}}}
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = tc })
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
	v2, sum2 := sr.Version, sr.Checksum
	sr.Close()
	if err != nil || v2 != 2 {
		t.Fatalf("snapshot at version %d: %v", v2, err)
	}
	tc.mu.Lock()
	tc.image, tc.fail[3] = img, true
	tc.mu.Unlock()
	watcher, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "bob", Credential: "s3cret", Version: 0})
	welcome(t, m)
	c.push(2)
	for _, s := range []*client{c, watcher} {
		for {
			m := s.read()
			if e, ok := m.(*protocol.Error); ok {
				if e.Code != protocol.CodeInternal || e.Code.Fatal() {
					t.Fatalf("error %v, want the retryable internal error", e.Err())
				}
				break
			}
			if v, ok := m.(*protocol.Versions); ok && v.Versions[len(v.Versions)-1].Version > 2 {
				t.Fatalf("version %d sent though the log refused it", v.Versions[len(v.Versions)-1].Version)
			}
			if _, ok := m.(*protocol.Ack); ok && s == c {
				t.Fatal("an ack of a version the log refused")
			}
		}
	}
	if a.Version() != v2 || a.Checksum() != sum2 || tc.restores != 1 {
		t.Fatalf("after the refusal: version %d, %016x after %d restores; want the log's %d, %016x after 1", a.Version(), a.Checksum(), tc.restores, v2, sum2)
	}
	tc.mu.Lock()
	delete(tc.fail, 3)
	tc.mu.Unlock()
	if _, _, err := a.Push(ctx, []Mutation{upsert("alice", 2, "Food", 1)}); err != nil {
		t.Fatalf("push after the reopen: %v", err)
	}
	if tc.get(3) == nil || a.Version() != 3 {
		t.Fatalf("the reopened database is at version %d; its push did not reach the log", a.Version())
	}
}
