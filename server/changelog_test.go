package server

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func rec(v uint64) []byte {
	return []byte(fmt.Sprintf("version %d %s", v, bytes.Repeat([]byte{byte(v)}, int(v%7))))
}

func TestChangeLog(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(1e9, 0)
	l, err := openChangeLog(dir, 3, 1<<20, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	for v := uint64(5); v <= 14; v++ {
		if err := l.append(v, rec(v), now); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.append(16, rec(16), now); err == nil {
		t.Fatal("appended with a gap")
	}
	check := func(l *changeLog, first, last uint64) {
		t.Helper()
		if l.first() != first || l.last() != last {
			t.Fatalf("log holds %d..%d, want %d..%d", l.first(), l.last(), first, last)
		}
		got, err := l.read(first, last)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range got {
			if !bytes.Equal(r, rec(first+uint64(i))) {
				t.Fatalf("record %d differs", first+uint64(i))
			}
		}
		if _, err := l.read(first-1, last); err == nil {
			t.Fatal("read before the log")
		}
	}
	check(l, 5, 14)
	var want int64
	for v := uint64(6); v <= 12; v++ {
		want += int64(recordHeaderSize + len(rec(v)))
	}
	if got := l.size(6, 12); got != want {
		t.Fatalf("size of 6..12 = %d, want %d", got, want)
	}
	if l.size(4, 12) != -1 || l.size(6, 15) != -1 {
		t.Fatal("size of versions the log does not hold")
	}
	l.close()

	// A torn record at the end (a crash mid-append) is cut off at open.
	segs, _ := filepath.Glob(filepath.Join(dir, "*"+segmentSuffix))
	if len(segs) != 4 {
		t.Fatalf("%d segments, want 4 of at most 3 versions", len(segs))
	}
	newest := segs[len(segs)-1]
	f, _ := os.OpenFile(newest, os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte{200, 0, 0, 0, 1, 2, 3, 4, 5})
	f.Close()
	l, err = openChangeLog(dir, 3, 1<<20, Retention{Versions: 4})
	if err != nil {
		t.Fatal(err)
	}
	check(l, 5, 14)
	if err := l.openTail(); err != nil {
		t.Fatal(err)
	}
	if err := l.append(15, rec(15), now); err != nil {
		t.Fatal(err)
	}
	// Retention by count removes whole old segments, never the newest.
	if l.first() < 11 || l.last() != 15 {
		t.Fatalf("after retention: %d..%d", l.first(), l.last())
	}
	check(l, l.first(), 15)
	// A corrupt record in an older segment is found when read.
	l.close()
	segs, _ = filepath.Glob(filepath.Join(dir, "*"+segmentSuffix))
	b, _ := os.ReadFile(segs[0])
	b[len(b)-1] ^= 1
	os.WriteFile(segs[0], b, 0o644)
	l, err = openChangeLog(dir, 3, 1<<20, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	if l.last() != 15 {
		t.Fatalf("log ends at %d after corruption of an old segment", l.last())
	}
	// The run after the damage is kept; what came before is unusable.
	if _, err := l.read(l.first(), 15); err != nil {
		t.Fatal(err)
	}
	// Retention by age.
	l.retention = Retention{Age: time.Hour}
	l.openTail()
	l.append(16, rec(16), now) // fills the segment 14..16, last written at now
	for v := uint64(17); v <= 20; v++ {
		l.append(v, rec(v), now.Add(2*time.Hour))
	}
	if l.first() != 17 {
		t.Fatalf("age retention kept versions from %d", l.first())
	}
}

// FuzzChangeLogSegment: any bytes in a segment file open as a log (cut at
// the first bad record) and read back without a panic.
func FuzzChangeLogSegment(f *testing.F) {
	dir := f.TempDir()
	l, _ := openChangeLog(dir, 100, 1<<20, Retention{})
	for v := uint64(1); v <= 3; v++ {
		l.append(v, rec(v), time.Now())
	}
	l.close()
	good, _ := os.ReadFile(filepath.Join(dir, segmentName(1)))
	f.Add(good)
	f.Add(good[:len(good)-3])
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, segmentName(7)), b, 0o644)
		l, err := openChangeLog(dir, 100, 1<<20, Retention{})
		if err != nil {
			t.Fatal(err)
		}
		defer l.close()
		if l.last() == 0 {
			return
		}
		if _, err := l.read(l.first(), l.last()); err != nil {
			t.Fatalf("a log that opened does not read: %v", err)
		}
	})
}

// TestChangeLogOldFormat: segments of protocol 3's records (".seg") are
// not served after an upgrade: open removes them and the log is empty (the
// database then starts it afresh, and replicas behind get a snapshot).
func TestChangeLogOldFormat(t *testing.T) {
	dir := t.TempDir()
	l, err := openChangeLog(dir, 3, 1<<20, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	for v := uint64(1); v <= 4; v++ {
		if err := l.append(v, rec(v), time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	l.close()
	// Rename the segments as protocol 3 named them: same records.
	segs, _ := filepath.Glob(filepath.Join(dir, "*"+segmentSuffix))
	if len(segs) != 2 {
		t.Fatalf("%d segments", len(segs))
	}
	for _, s := range segs {
		if err := os.Rename(s, s[:len(s)-len(segmentSuffix)]+".seg"); err != nil {
			t.Fatal(err)
		}
	}
	other := filepath.Join(dir, "notes.txt")
	os.WriteFile(other, []byte("kept"), 0o644)
	l, err = openChangeLog(dir, 3, 1<<20, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	if l.first() != 0 || l.last() != 0 {
		t.Fatalf("old segments served: versions %d..%d", l.first(), l.last())
	}
	if old, _ := filepath.Glob(filepath.Join(dir, "*.seg")); len(old) != 0 {
		t.Fatalf("old segments left: %v", old)
	}
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("a file that is no segment was removed: %v", err)
	}
	if err := l.append(5, rec(5), time.Now()); err != nil {
		t.Fatal(err)
	}
}
