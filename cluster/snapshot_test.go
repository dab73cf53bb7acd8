package cluster

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// authorityImage makes a real server database with some rows and returns
// its image at the latest version, as OpenSnapshot reads it, with the
// checksum the authority tracks (and ships to replicas).
func authorityImage(t *testing.T, rows int) (img []byte, version uint64, sum uint64, pageSize, pages uint32) {
	t.Helper()
	ctx := bounded(t, 30*time.Second)
	a, err := server.OpenAuthority(ctx, filepath.Join(t.TempDir(), "db.sqlite"), mutators.NewRegistry(), func(ctx context.Context, tx mutators.Tx) error {
		_, err := tx.Exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := a.Exec(ctx, func(tx mutators.Tx) error {
		for i := range rows {
			if _, err := tx.Exec("INSERT INTO t (v) VALUES (?)", strings.Repeat(fmt.Sprint(i), 50)); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	r, err := a.OpenSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	img, err = r.ReadPages(1, r.DBSize)
	if err != nil {
		t.Fatal(err)
	}
	return img, r.Version, r.Checksum, r.PageSize, r.DBSize
}

func TestSnapshotPutGetTrim(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := OpenSnapshots(ctx, js, SnapshotConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := snaps.Info(ctx, "app.db"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("info before any snapshot: %v, want ErrNoSnapshot", err)
	}
	img, version, sum, ps, pages := authorityImage(t, 500)
	if pages < 10 {
		t.Fatalf("image of %d pages: the test wants several", pages)
	}
	// The log holds versions 1..version+4; the snapshot is at version.
	ap, err := l.NewAppender(ctx, "app.db", "owner")
	if err != nil {
		t.Fatal(err)
	}
	var snapSeq uint64
	for v := uint64(1); v <= version+4; v++ {
		seq, err := ap.Append(ctx, v, []byte("rec"))
		if err != nil {
			t.Fatal(err)
		}
		if v == version {
			snapSeq = seq
		}
	}
	info := SnapshotInfo{DB: "app.db", Version: version, Seq: snapSeq, Checksum: sum, PageSize: ps, Pages: pages}
	stored, err := snaps.Put(ctx, info, bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	if stored.Digest == "" {
		t.Fatal("no digest")
	}
	// A damaged image (one byte of one page) is refused, and the stored
	// snapshot stays.
	bad := bytes.Clone(img)
	bad[len(bad)/2] ^= 1
	if _, err := snaps.Put(ctx, SnapshotInfo{DB: "app.db", Version: version + 1, Seq: snapSeq + 1, Checksum: sum, PageSize: ps, Pages: pages}, bytes.NewReader(bad)); !errors.Is(err, ErrSnapshotChecksum) {
		t.Fatalf("put of a damaged image: %v, want ErrSnapshotChecksum", err)
	}
	if _, err := snaps.Put(ctx, SnapshotInfo{DB: "app.db", Version: version + 1, Seq: snapSeq + 1, Checksum: sum, PageSize: ps, Pages: pages}, bytes.NewReader(img[:len(img)-int(ps)])); !errors.Is(err, ErrSnapshotChecksum) {
		t.Fatalf("put of a short image: %v, want ErrSnapshotChecksum", err)
	}
	got, r, err := snaps.Get(ctx, "app.db")
	if err != nil {
		t.Fatal(err)
	}
	back, err := io.ReadAll(r)
	r.Close()
	if err != nil {
		t.Fatalf("read snapshot: %v", err)
	}
	if got != stored || !bytes.Equal(back, img) {
		t.Fatalf("got %+v (%d bytes), want %+v (%d bytes)", got, len(back), stored, len(img))
	}
	// Trim behind the snapshot: the log then starts at its version, and
	// the fence still works (the subject keeps its last entry).
	if err := l.TrimBefore(ctx, "app.db", got.Seq); err != nil {
		t.Fatal(err)
	}
	es, err := l.Read(ctx, "app.db", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 5 || es[0].Version != version || es[0].Seq != got.Seq {
		t.Fatalf("after the trim the log holds %d entries from version %d", len(es), es[0].Version)
	}
	if _, err := ap.Append(ctx, version+5, []byte("rec")); err != nil {
		t.Fatalf("append after the trim: %v", err)
	}
	// Trimming to beyond the end keeps the last entry.
	if err := l.TrimBefore(ctx, "app.db", 1<<40); err != nil {
		t.Fatal(err)
	}
	if es, _ := l.Read(ctx, "app.db", 0, 100); len(es) != 1 || es[0].Version != version+5 {
		t.Fatalf("after trimming everything: %+v", es)
	}
	rival, err := l.NewAppender(ctx, "app.db", "rival")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rival.Append(ctx, version+6, []byte("rival")); err != nil {
		t.Fatal(err)
	}
	if _, err := ap.Append(ctx, version+6, []byte("rec")); !errors.Is(err, ErrFenced) {
		t.Fatalf("the fence after a full trim: %v, want ErrFenced", err)
	}
}

// TestSnapshotGetChecksDamage stores an image whose metadata claims
// another checksum (as damage in the store would look): Get's reader ends
// with ErrSnapshotChecksum, not io.EOF.
func TestSnapshotGetChecksDamage(t *testing.T) {
	_, _, js := single(t)
	ctx := bounded(t, 30*time.Second)
	snaps, err := OpenSnapshots(ctx, js, SnapshotConfig{})
	if err != nil {
		t.Fatal(err)
	}
	img, version, sum, ps, pages := authorityImage(t, 50)
	meta := jetstream.ObjectMeta{Name: "db", Metadata: map[string]string{
		"db": "db", "version": fmt.Sprint(version), "seq": "7", "checksum": fmt.Sprintf("%x", sum^1),
		"page-size": fmt.Sprint(ps), "pages": fmt.Sprint(pages),
	}}
	if _, err := snaps.obs.Put(ctx, meta, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	_, r, err := snaps.Get(ctx, "db")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.ReadAll(r); !errors.Is(err, ErrSnapshotChecksum) {
		t.Fatalf("read of a damaged snapshot: %v, want ErrSnapshotChecksum", err)
	}
}

// syntheticImage is an image of pages pages of 4 KiB, each filled with
// fill and its page number, and its whole-database checksum.
func syntheticImage(pages uint32, fill byte) ([]byte, uint64) {
	const ps = 4096
	img := make([]byte, int(pages)*ps)
	var sum uint64
	for pg := uint32(1); pg <= pages; pg++ {
		p := img[int(pg-1)*ps : int(pg)*ps]
		for i := range p {
			p[i] = fill
		}
		binary.LittleEndian.PutUint32(p, pg)
		sum ^= wal.PageChecksum(pg, p)
	}
	return img, sum
}

// TestSnapshotReplacedWhileRead: a snapshot replaced by a newer one while
// a reader is part way through it ends that read with ErrSnapshotReplaced
// (the object store purged its chunks), not with a wait until the
// context's end; and a read of the newer one succeeds.
func TestSnapshotReplacedWhileRead(t *testing.T) {
	_, _, js := single(t)
	ctx := bounded(t, 45*time.Second)
	snaps, err := OpenSnapshots(ctx, js, SnapshotConfig{})
	if err != nil {
		t.Fatal(err)
	}
	const pages = 2048 // 8 MiB: 64 chunks of the object store's 128 KiB, of which the reader has read one
	old, oldSum := syntheticImage(pages, 1)
	if _, err := snaps.Put(ctx, SnapshotInfo{DB: "app.db", Version: 10, Seq: 10, Checksum: oldSum, PageSize: 4096, Pages: pages}, bytes.NewReader(old)); err != nil {
		t.Fatal(err)
	}
	_, r, err := snaps.Get(ctx, "app.db")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.ReadFull(r, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	next, nextSum := syntheticImage(pages, 2)
	if _, err := snaps.Put(ctx, SnapshotInfo{DB: "app.db", Version: 20, Seq: 20, Checksum: nextSum, PageSize: 4096, Pages: pages}, bytes.NewReader(next)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = io.Copy(io.Discard, r)
	if !errors.Is(err, ErrSnapshotReplaced) {
		t.Fatalf("read of a replaced snapshot: %v after %v, want ErrSnapshotReplaced", err, time.Since(start))
	}
	t.Logf("the replaced read ended after %v", time.Since(start).Round(time.Millisecond))
	info, r2, err := snaps.Get(ctx, "app.db")
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	got, err := io.ReadAll(r2)
	if err != nil || info.Version != 20 || !bytes.Equal(got, next) {
		t.Fatalf("read of the newer snapshot: version %d, %d bytes, %v", info.Version, len(got), err)
	}
}
