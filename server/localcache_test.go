package server

import (
	"context"
	"errors"
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
}

func (f *fakeCache) Fresh(_ context.Context, _ string, version, checksum uint64) (bool, error) {
	if f.version == 0 { // an empty log: only a new file is its tail
		return version == 0, nil
	}
	return version == f.version && checksum == f.sum, nil
}

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
	if v, sum, err := open(fc); err != nil || v != v2 || sum != sum2 || fc.restores != 1 {
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
	if _, _, err := open(fc); !errors.Is(err, errRefused) {
		t.Fatalf("failed restore: %v, want its error", err)
	}
	fc = &fakeCache{version: v2, sum: sum2 + 1, restore: copyImage}
	if _, _, err := open(fc); !errors.Is(err, ErrStale) || fc.restores != 1 {
		t.Fatalf("restored file still refused: %v after %d restores, want ErrStale after 1", err, fc.restores)
	}
}
