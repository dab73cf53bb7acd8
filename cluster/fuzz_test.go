package cluster

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/wal"
)

// FuzzSnapshotInfo: metadata read back from the object store (a disk, a
// network) is parsed or refused, never trusted half-way: whatever it says,
// the parsed size matches the object's.
func FuzzSnapshotInfo(f *testing.F) {
	f.Add("db", "7", "3", "ff", "4096", "2", int64(8192))
	f.Add("db", "7", "3", "ff", "4096", "2", int64(8191))
	f.Add("db", "-1", "x", "zz", "1000", "99999999999", int64(0))
	f.Fuzz(func(t *testing.T, db, version, seq, sum, ps, pages string, size int64) {
		oi := &jetstream.ObjectInfo{ObjectMeta: jetstream.ObjectMeta{Metadata: map[string]string{
			"db": db, "version": version, "seq": seq, "checksum": sum, "page-size": ps, "pages": pages,
		}}, Size: uint64(max(size, 0))}
		info, err := parseInfo(db, oi)
		if err != nil {
			return
		}
		if !wal.ValidPageSize(info.PageSize) || uint64(info.PageSize)*uint64(info.Pages) != oi.Size {
			t.Fatalf("accepted %+v for an object of %d bytes", info, oi.Size)
		}
	})
}

// FuzzPageChecker: an image reaches io.EOF through the checker only if it
// is whole pages of the size claimed that give the checksum claimed.
func FuzzPageChecker(f *testing.F) {
	page := bytes.Repeat([]byte{1}, 512)
	f.Add(page, uint32(1), wal.PageChecksum(1, page), 7)
	f.Add(page[:100], uint32(1), uint64(0), 3)
	f.Add([]byte{}, uint32(0), uint64(0), 1)
	f.Fuzz(func(t *testing.T, img []byte, pages uint32, sum uint64, chunk int) {
		info := SnapshotInfo{DB: "db", Version: 1, Seq: 1, Checksum: sum, PageSize: 512, Pages: pages % 64}
		r := newPageChecker(&chunked{b: img, n: max(chunk%97, 1)}, info)
		got, err := io.ReadAll(r)
		want := len(img) == int(info.Pages)*512 && tableOf(img, 512).Sum() == sum
		if (err == nil) != want {
			t.Fatalf("%d bytes, %d pages claimed: err %v, want accepted %v", len(img), info.Pages, err, want)
		}
		if err != nil && !errors.Is(err, ErrSnapshotChecksum) {
			t.Fatalf("refused with %v, not ErrSnapshotChecksum", err)
		}
		if !bytes.Equal(got, img[:len(got)]) {
			t.Fatal("the checker changed the bytes")
		}
	})
}

// chunked reads b n bytes at a time, as a network stream might.
type chunked struct {
	b []byte
	n int
}

func (c *chunked) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[k:]
	return k, nil
}

// FuzzEntry: a message on a database's subject is an Entry only with a
// positive version header.
func FuzzEntry(f *testing.F) {
	f.Add("12", []byte("rec"))
	f.Add("0", []byte{})
	f.Add("-3", []byte{})
	f.Add("99999999999999999999999", []byte{1})
	f.Fuzz(func(t *testing.T, version string, data []byte) {
		m := &jetstream.RawStreamMsg{Subject: Subject("db"), Sequence: 5, Header: nats.Header{}, Data: data}
		m.Header.Set(headerVersion, version)
		e, err := entry(m)
		if err != nil {
			if !errors.Is(err, ErrBadEntry) {
				t.Fatalf("refused with %v, not ErrBadEntry", err)
			}
			return
		}
		if e.Version == 0 || e.Seq != 5 || !bytes.Equal(e.Rec, data) {
			t.Fatalf("entry %+v", e)
		}
	})
}
