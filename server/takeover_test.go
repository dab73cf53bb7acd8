package server

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// fakeTakeover is a fakeCache that asks for a takeover version.
type fakeTakeover struct {
	fakeCache
	takeover bool
}

func (f *fakeTakeover) NeedsTakeover(string) bool { return f.takeover }

// TestTakeoverVersionBeforeServing: a database that opens on a node the
// version log says has just taken it over commits a version of its own
// (nothing but the version number) and appends it before anything is
// served; a refused takeover version fails the open (and lets go of what
// Fresh took) instead of serving; without the request nothing is added.
func TestTakeoverVersionBeforeServing(t *testing.T) {
	ctx := context.Background()
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
	open := func(takeover bool, refuse uint64) (*fakeTakeover, uint64, uint64, error) {
		fc := &fakeTakeover{fakeCache: fakeCache{version: v2, sum: sum2, restore: func(path string) error { return os.WriteFile(path, image, 0o644) }}, takeover: takeover}
		fc.recs, fc.fail = map[uint64][]byte{}, map[uint64]bool{refuse: true}
		srv, _ := testServer(t, t.TempDir(), func(c *Config) { c.VersionLog = fc })
		defer srv.Close()
		var v, sum uint64
		err := srv.WithAuthority(ctx, "demo", func(a *Authority) error { v, sum = a.Version(), a.Checksum(); return nil })
		return fc, v, sum, err
	}

	fc, v, sum, err := open(true, 0)
	if err != nil || v != v2+1 || fc.drops != 0 {
		t.Fatalf("taken over: version %d, %v, %d drops; want %d (the restored %d and the takeover version)", v, err, fc.drops, v2+1, v2)
	}
	rec := fc.get(v2 + 1)
	if len(rec) < 8 || binary.LittleEndian.Uint64(rec) != sum2 || sum == sum2 {
		t.Fatalf("the takeover version's record %x does not start from the restored checksum %016x", rec, sum2)
	}

	fc, _, _, err = open(true, v2+1)
	if err == nil || fc.drops != 1 {
		t.Fatalf("a refused takeover version: open %v, %d drops; want a failed open and one drop", err, fc.drops)
	}

	fc, v, _, err = open(false, 0)
	if err != nil || v != v2 || fc.get(v2+1) != nil {
		t.Fatalf("no takeover asked: version %d, %v; want %d and nothing appended", v, err, v2)
	}
}
