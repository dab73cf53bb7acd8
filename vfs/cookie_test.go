package vfs_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"testing"

	"github.com/sqlrebase/sqlrebase/vfs"
)

// TestSchemaCookieFollowsTheFile: the Replica keeps the main file's schema
// cookie instead of reading it on every call; after every way the main file
// is written (a version with DDL, one without, a snapshot page set, an
// installed image, a reopen) it must say what the file says.
func TestSchemaCookieFollowsTheFile(t *testing.T) {
	ctx := context.Background()
	a := newAuthority(t)
	r, path := openReplica(t)
	check := func(step string) {
		t.Helper()
		got, err := r.SchemaCookie()
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if want := binary.BigEndian.Uint32(b[40:]); got != want {
			t.Fatalf("%s: SchemaCookie %d, the file says %d", step, got, want)
		}
	}
	check("open")
	if err := r.Rebase(ctx, since(t, a, 0)...); err != nil {
		t.Fatal(err)
	}
	check("first versions")
	for i := 0; i < 3; i++ {
		serverExec(t, a, fmt.Sprintf("CREATE TABLE t%d(x)", i))
		if err := r.Rebase(ctx, since(t, a, r.Version())...); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("DDL %d", i))
		serverExec(t, a, "INSERT INTO other VALUES (randomblob(3000))")
		if err := r.Rebase(ctx, since(t, a, r.Version())...); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("rows %d", i))
	}

	// A snapshot of another database, further on and with another schema,
	// installed from an image (the copy path) and then as a page set.
	b := newAuthority(t)
	for i := 0; i < 12; i++ {
		serverExec(t, b, fmt.Sprintf("CREATE TABLE u%d(x)", i))
	}
	snap, err := b.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := r.SchemaCookie()
	img, _ := image(t, snap)
	if err := r.InstallSnapshot(ctx, img); err != nil {
		t.Fatal(err)
	}
	check("installed image")
	if after, _ := r.SchemaCookie(); after == before {
		t.Fatalf("the image's cookie %d is the one before it: the test shows nothing", after)
	}
	serverExec(t, b, "CREATE TABLE v(x)")
	if err := r.Rebase(ctx, since(t, b, r.Version())...); err != nil {
		t.Fatal(err)
	}
	check("DDL after the image")

	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r, err = vfs.OpenReplica(path, vfs.Normal)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	check("reopen")
}
