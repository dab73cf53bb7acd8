package vfs

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"
	sqlite3vfs "github.com/ncruces/go-sqlite3/vfs"
	"pgregory.net/rapid"
)

// memFile is an in-memory sqlite3vfs.File that counts its writes.
type memFile struct {
	b      []byte
	writes int
}

func (m *memFile) Close() error { return nil }
func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.writes++
	m.b = writeInto(m.b, p, off)
	return len(p), nil
}
func (m *memFile) Truncate(size int64) error {
	if size < int64(len(m.b)) {
		m.b = m.b[:size]
	} else {
		m.b = append(m.b, make([]byte, size-int64(len(m.b)))...)
	}
	return nil
}
func (m *memFile) Sync(sqlite3vfs.SyncFlag) error                         { return nil }
func (m *memFile) Size() (int64, error)                                   { return int64(len(m.b)), nil }
func (m *memFile) Lock(sqlite3vfs.LockLevel) error                        { return nil }
func (m *memFile) Unlock(sqlite3vfs.LockLevel) error                      { return nil }
func (m *memFile) CheckReservedLock() (bool, error)                       { return false, nil }
func (m *memFile) SectorSize() int                                        { return 4096 }
func (m *memFile) DeviceCharacteristics() sqlite3vfs.DeviceCharacteristic { return 0 }

func writeInto(b, p []byte, off int64) []byte {
	if end := off + int64(len(p)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[off:], p)
	return b
}

// frameHeader is a WAL frame header for pgno; commit is the database size
// of a commit frame, 0 for any other.
func frameHeader(pgno, commit uint32) []byte {
	h := make([]byte, 24)
	binary.BigEndian.PutUint32(h, pgno)
	binary.BigEndian.PutUint32(h[4:], commit)
	h[8] = 0xA5 // salts and checksums: any bytes
	return h
}

func frameOff(frame int64, pageSize int64) int64 { return 32 + (frame-1)*(pageSize+24) }

// TestWALHoldOneCommitOneWrite: the first commit after a drop (WAL header,
// two frames, the second a commit frame) and a later commit each reach the
// file as one write, and a frame header rewritten in place goes through
// at once.
func TestWALHoldOneCommitOneWrite(t *testing.T) {
	const ps = 4096
	m := &memFile{}
	f := newWALFile(m)
	page := bytes.Repeat([]byte{7}, ps)
	write := func(p []byte, off int64) {
		t.Helper()
		if n, err := f.WriteAt(p, off); n != len(p) || err != nil {
			t.Fatalf("WriteAt: %d, %v", n, err)
		}
	}
	write(make([]byte, 32), 0)
	write(frameHeader(2, 0), frameOff(1, ps))
	write(page, frameOff(1, ps)+24)
	write(frameHeader(3, 9), frameOff(2, ps))
	if m.writes != 0 {
		t.Fatalf("%d writes before the commit frame's page, want 0", m.writes)
	}
	write(page, frameOff(2, ps)+24)
	if m.writes != 1 || len(m.b) != int(frameOff(3, ps)) {
		t.Fatalf("after the commit: %d writes, %d bytes; want 1 write of %d", m.writes, len(m.b), frameOff(3, ps))
	}
	// The next commit appends where the last frame ended.
	write(frameHeader(4, 9), frameOff(3, ps))
	write(page, frameOff(3, ps)+24)
	if m.writes != 2 {
		t.Fatalf("the second commit: %d writes in all, want 2", m.writes)
	}
	// A header rewritten in place (walRewriteChecksums) is not held.
	write(frameHeader(2, 0), frameOff(1, ps))
	if m.writes != 3 {
		t.Fatalf("a rewritten frame header was held (%d writes)", m.writes)
	}
	// A frame appended after a truncation is not where a frame ended.
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	write(frameHeader(2, 0), frameOff(1, ps))
	if m.writes != 4 {
		t.Fatalf("a frame header after a truncation was held (%d writes)", m.writes)
	}
}

// TestWALFileModel runs random sequences of WAL-shaped and arbitrary calls
// through a walFile and holds it to a file written directly: at every call
// but a held append, the file is exactly the model; with the held bytes
// applied, it always is; and a read returns what the model holds.
func TestWALFileModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		ps := int64(rapid.SampledFrom([]int{512, 1024, 4096}).Draw(t, "pageSize"))
		m := &memFile{}
		f := newWALFile(m)
		var model []byte
		end := int64(-1) // where this file's last frame ended
		frames := int64(0)
		pending := false // an appended frame header waits for its page
		pendingCommit := false
		held := func() bool { return len(f.buf) > 0 }
		check := func(what string, mayHold bool) {
			if !mayHold && held() {
				t.Fatalf("%s: %d bytes still held", what, len(f.buf))
			}
			got := writeInto(bytes.Clone(m.b), f.buf, f.hold.start)
			if !held() {
				got = m.b
			}
			if !bytes.Equal(got, model) {
				t.Fatalf("%s: the file (with what is held) differs from the model", what)
			}
		}
		do := func(p []byte, off int64) {
			if n, err := f.WriteAt(p, off); n != len(p) || err != nil {
				t.Fatalf("WriteAt: %d, %v", n, err)
			}
			model = writeInto(model, p, off)
		}
		for i := range rapid.IntRange(1, 60).Draw(t, "calls") {
			if pending {
				// SQLite writes a frame's page right after its header.
				data := bytes.Repeat([]byte{byte(i)}, int(ps))
				do(data, end+24)
				end += 24 + ps
				frames++
				pending = false
				check(fmt.Sprintf("call %d: frame page", i), !pendingCommit)
				continue
			}
			switch op := rapid.IntRange(0, 8).Draw(t, "op"); op {
			case 0: // a WAL header: the first frame after a drop follows
				do(bytes.Repeat([]byte{0xEE}, 32), 0)
				end, frames = 32, 0
				check(fmt.Sprintf("call %d: WAL header", i), true)
			case 1, 2, 3: // append a frame header where the last frame ended
				if end < 0 {
					end = frameOff(frames+1, ps)
				}
				commit := uint32(0)
				if rapid.Bool().Draw(t, "commit") {
					commit = uint32(frames + 2)
				}
				do(frameHeader(uint32(i+2), commit), end)
				pending, pendingCommit = true, commit != 0
				check(fmt.Sprintf("call %d: frame header", i), true)
			case 4: // rewrite the header of a frame already written
				if frames == 0 {
					continue
				}
				k := rapid.Int64Range(1, frames).Draw(t, "rewrite")
				do(frameHeader(9, 0), frameOff(k, ps))
				check(fmt.Sprintf("call %d: rewritten header", i), false)
			case 5: // overwrite a page in place
				if frames == 0 {
					continue
				}
				k := rapid.Int64Range(1, frames).Draw(t, "overwrite")
				do(bytes.Repeat([]byte{0x33}, int(ps)), frameOff(k, ps)+24)
				check(fmt.Sprintf("call %d: page overwritten", i), false)
			case 6: // an arbitrary write
				off := rapid.Int64Range(0, 3*ps).Draw(t, "off")
				n := rapid.SampledFrom([]int{1, 24, 32, int(ps)}).Draw(t, "len")
				if off == 0 && n == 32 || n == 24 && off == f.hold.next {
					n = 1 // not a write SQLite appends with (those are cases 0 to 3)
				}
				do(bytes.Repeat([]byte{0x44}, n), off)
				check(fmt.Sprintf("call %d: write of %d at %d", i, n, off), false)
			case 7: // a read
				off := rapid.Int64Range(0, 3*ps).Draw(t, "readOff")
				b := make([]byte, rapid.IntRange(1, int(ps)).Draw(t, "readLen"))
				n, _ := f.ReadAt(b, off)
				check(fmt.Sprintf("call %d: read", i), false)
				var want []byte
				if off < int64(len(model)) {
					want = model[off:min(int64(len(model)), off+int64(len(b)))]
				}
				if !bytes.Equal(b[:n], want) {
					t.Fatalf("call %d: read %d bytes at %d that the model does not hold", i, n, off)
				}
			case 8: // a sync, a size, or a truncation
				switch rapid.IntRange(0, 2).Draw(t, "which") {
				case 0:
					f.Sync(sqlite3vfs.SYNC_NORMAL)
				case 1:
					if n, _ := f.Size(); n != int64(len(model)) {
						t.Fatalf("call %d: size %d, the model has %d", i, n, len(model))
					}
				case 2:
					f.Truncate(0)
					model, end, frames = nil, -1, 0
				}
				check(fmt.Sprintf("call %d: sync, size or truncate", i), false)
			}
		}
	})
}

// FuzzWALHold feeds arbitrary write sequences to a walFile: it never
// panics, the file with what it holds is always what was written, and
// after any call that did not hold, nothing is held.
func FuzzWALHold(f *testing.F) {
	f.Add([]byte{0, 0, 1, 32, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		m := &memFile{}
		w := newWALFile(m)
		var model []byte
		for len(in) >= 3 {
			kind, a, b := in[0], int64(in[1]), int64(in[2])
			in = in[3:]
			var p []byte
			var off int64
			switch kind % 5 {
			case 0:
				p, off = make([]byte, 32), 0
			case 1:
				p, off = frameHeader(1, uint32(b%2)), 32+a*(512+24)
			case 2:
				p, off = bytes.Repeat([]byte{byte(a)}, 512), 32+b*(512+24)+24
			case 3:
				p, off = bytes.Repeat([]byte{byte(b)}, int(a%64)+1), a*b
			case 4:
				w.ReadAt(make([]byte, 16), a)
				if len(w.buf) > 0 || !bytes.Equal(m.b, model) {
					t.Fatal("a read left bytes held, or the file differs from what was written")
				}
				continue
			}
			if _, err := w.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			model = writeInto(model, p, off)
			got := m.b
			if len(w.buf) > 0 {
				got = writeInto(bytes.Clone(m.b), w.buf, w.hold.start)
			}
			if !bytes.Equal(got, model) {
				t.Fatal("the file with what is held differs from what was written")
			}
		}
	})
}

// recordingVFS is the OS VFS with each WAL file behind a walFile, over a
// file that counts the 24-byte writes (frame headers) that reached it
// before the end of what was written (the WAL never restarts in the test
// that uses it, so these are rewritten headers).
type recordingVFS struct {
	sqlite3vfs.VFS
	mu        sync.Mutex
	end       int64
	rewritten int
}

func (v *recordingVFS) Open(name string, flags sqlite3vfs.OpenFlag) (sqlite3vfs.File, sqlite3vfs.OpenFlag, error) {
	f, out, err := v.VFS.Open(name, flags)
	return v.wrap(f, flags), out, err
}

func (v *recordingVFS) OpenFilename(name *sqlite3vfs.Filename, flags sqlite3vfs.OpenFlag) (sqlite3vfs.File, sqlite3vfs.OpenFlag, error) {
	f, out, err := v.VFS.(sqlite3vfs.VFSFilename).OpenFilename(name, flags)
	return v.wrap(f, flags), out, err
}

func (v *recordingVFS) wrap(f sqlite3vfs.File, flags sqlite3vfs.OpenFlag) sqlite3vfs.File {
	if f == nil || flags&sqlite3vfs.OPEN_WAL == 0 {
		return f
	}
	return newWALFile(&recordingFile{File: f, v: v})
}

type recordingFile struct {
	sqlite3vfs.File
	v *recordingVFS
}

func (r *recordingFile) WriteAt(p []byte, off int64) (int, error) {
	r.v.mu.Lock()
	if len(p) == 24 && off < r.v.end {
		r.v.rewritten++
	}
	r.v.end = max(r.v.end, off+int64(len(p)))
	r.v.mu.Unlock()
	return r.File.WriteAt(p, off)
}

// TestWALFileSQLite runs SQLite through walFile: small commits, and a
// transaction larger than its page cache that writes pages twice, so that
// SQLite spills frames, overwrites them in place and rewrites their
// checksums before it commits. A second connection sees each commit, and
// the stock sqlite3 CLI recovers a copy of the files (the WAL's checksum
// chain, from its own recovery) with every committed row.
func TestWALFileSQLite(t *testing.T) {
	rv := &recordingVFS{VFS: sqlite3vfs.Find("")}
	sqlite3vfs.Register("sqlrebase-waltest", rv)
	defer sqlite3vfs.Unregister("sqlrebase-waltest")
	path := filepath.Join(t.TempDir(), "w.db")
	dsn := "file:" + path + "?vfs=sqlrebase-waltest&_pragma=journal_mode(wal)&_pragma=wal_autocheckpoint(0)&_pragma=cache_size(5)&_pragma=synchronous(normal)"
	ctx := context.Background()
	w, err := driver.Open(dsn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.SetMaxOpenConns(1)
	r, err := sql.Open("sqlite3", "file:"+path+"?vfs=sqlrebase-waltest")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	run := func(q string, args ...any) {
		t.Helper()
		if _, err := w.ExecContext(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	count := func() (n, sum int64) {
		t.Helper()
		if err := r.QueryRowContext(ctx, "SELECT count(*), coalesce(sum(length(x)), 0) FROM t").Scan(&n, &sum); err != nil {
			t.Fatal(err)
		}
		return n, sum
	}
	run("CREATE TABLE t(id INTEGER PRIMARY KEY, x BLOB)")
	for i := range 20 {
		run("INSERT INTO t(x) VALUES (randomblob(?))", 100+i)
		if n, _ := count(); n != int64(i+1) {
			t.Fatalf("after commit %d the reader sees %d rows", i+1, n)
		}
	}
	// One transaction over many pages, touching each twice.
	tx, err := w.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		if _, err := tx.ExecContext(ctx, "INSERT INTO t(x) VALUES (randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		if i%10 == 9 {
			if _, err := tx.ExecContext(ctx, "UPDATE t SET x = randomblob(3000) WHERE id > ?", 20+i-9); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	n, sum := count()
	if n != 220 {
		t.Fatalf("after the large commit the reader sees %d rows, want 220", n)
	}
	rv.mu.Lock()
	rewritten := rv.rewritten
	rv.mu.Unlock()
	t.Logf("%d frame headers rewritten in place", rewritten)
	if rewritten == 0 {
		t.Fatal("no frame header was written twice: the large transaction did not make SQLite rewrite checksums, so this test shows nothing of that case")
	}

	cli, err := exec.LookPath("sqlite3")
	if err != nil {
		t.Skip("no sqlite3 CLI on PATH")
	}
	dir := t.TempDir()
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "copy.db"+suffix), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(cli, filepath.Join(dir, "copy.db"), "PRAGMA integrity_check; SELECT count(*), sum(length(x)) FROM t").CombinedOutput()
	if want := fmt.Sprintf("ok\n%d|%d", n, sum); err != nil || strings.TrimSpace(string(out)) != want {
		t.Fatalf("sqlite3 on a copy of the files: %q, %v; want %q", out, err, want)
	}
}
