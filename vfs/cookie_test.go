package vfs_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"pgregory.net/rapid"

	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
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
		// A version that leaves page 1 alone: the cookie known before it
		// is kept, and must still be the file's.
		serverExec(t, a, "UPDATE other SET x = randomblob(3000) WHERE rowid = 1")
		sets := since(t, a, r.Version())
		for _, ps := range sets {
			if len(ps.Pages) == 0 || ps.Pages[0].Pgno == 1 {
				t.Fatalf("update %d: the version writes page 1 (%d pages), want one that does not", i, len(ps.Pages))
			}
		}
		if err := r.Rebase(ctx, sets...); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("update %d", i))
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

// TestBasePageIsTheFile: BasePage serves the pages the last rebases wrote
// from memory; after any run of versions (small ones, large ones, a file
// that shrinks, an installed image), and whatever the caller of Rebase does
// with its page buffers afterwards, it must give every page as the file
// holds it.
func TestBasePageIsTheFile(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		a := newAuthority(t)
		r, err := vfs.OpenReplica(filepath.Join(t.TempDir(), "replica.db"), vfs.Normal)
		if err != nil {
			rt.Fatal(err)
		}
		defer r.Close()
		for step := range rapid.IntRange(1, 12).Draw(rt, "steps") {
			switch rapid.IntRange(0, 4).Draw(rt, "op") {
			case 0:
				serverExec(t, a, fmt.Sprintf("UPDATE Categories SET count = count + 1 WHERE name = 'c%d'", rapid.IntRange(0, 3).Draw(rt, "row")),
					fmt.Sprintf("INSERT OR IGNORE INTO Categories(name, count) VALUES ('c%d', 0)", rapid.IntRange(0, 3).Draw(rt, "new")))
			case 1:
				serverExec(t, a, fmt.Sprintf("INSERT INTO other SELECT randomblob(%d) FROM generate_series(1, %d)",
					rapid.IntRange(10, 3000).Draw(rt, "size"), rapid.IntRange(1, 40).Draw(rt, "rows")))
			case 2:
				serverExec(t, a, "DELETE FROM other WHERE rowid % 2 = 0")
			case 3:
				serverExec(t, a, "DELETE FROM other")
			case 4:
				serverExec(t, a, fmt.Sprintf("CREATE TABLE IF NOT EXISTS s%d(x)", step))
			}
			// Copies: the authority's own sets stay as they are.
			var sets []*wal.PageSet
			for _, ps := range since(t, a, r.Version()) {
				c := *ps
				c.Pages = nil
				for _, p := range ps.Pages {
					c.Pages = append(c.Pages, wal.Page{Pgno: p.Pgno, Data: bytes.Clone(p.Data)})
				}
				sets = append(sets, &c)
			}
			if rapid.Bool().Draw(rt, "image") {
				snap, err := a.Snapshot(ctx)
				if err != nil {
					t.Fatal(err)
				}
				img, _ := image(t, snap)
				if err := r.InstallSnapshot(ctx, img); err != nil {
					rt.Fatal(err)
				}
			} else if err := r.Rebase(ctx, sets...); err != nil {
				rt.Fatal(err)
			}
			for _, ps := range sets {
				for _, p := range ps.Pages {
					clear(p.Data) // the caller's buffers are the caller's
				}
			}
			for pgno := uint32(1); pgno <= r.Pages(); pgno++ {
				got, err := r.BasePage(pgno)
				if err != nil {
					t.Fatal(err)
				}
				want, err := r.ReadPage(pgno)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					rt.Fatalf("step %d: BasePage(%d) differs from the file", step, pgno)
				}
			}
		}
	})
}
