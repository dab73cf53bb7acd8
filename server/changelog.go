package server

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Retention bounds the change log. A replica further behind than the log
// reaches catches up with a snapshot instead. A zero Retention is
// DefaultRetention(); otherwise zero (or negative) fields mean no bound of
// that kind. The newest segment is never removed.
type Retention struct {
	Versions int           // keep at most this many versions (roughly: whole segments go)
	Bytes    int64         // keep at most this many bytes of log
	Age      time.Duration // drop segments whose newest version is older than this
}

// changeLog is a database's versions, encoded once as they travel, in
// append-only segment files named after their first version. A record is
//
//	u32 LE length | u32 LE CRC-32C of the payload | payload
//
// and a torn record at the end of the newest segment (a crash mid-append) is
// cut off at open. The log is not fsynced: it can always be rebuilt from
// nothing, since a replica it cannot serve gets a snapshot.
// DefaultRetention returns the change log's bound when Config.Retention is
// zero: 256 MiB or 7 days, whichever is reached first. A catch-up that
// weighs more than the database is sent as a snapshot anyway, so a longer
// log mostly costs disk; 7 days lets a replica offline for a week catch up
// with the versions it missed rather than the whole database.
func DefaultRetention() Retention { return Retention{Bytes: 256 << 20, Age: 7 * 24 * time.Hour} }

type changeLog struct {
	dir         string
	segs        []*segment // oldest first; the last one is appended to
	f           *os.File   // the newest segment, open for append
	segVersions int
	segBytes    int64
	retention   Retention
}

type segment struct {
	path     string
	first    uint64
	offsets  []int64 // where each record starts; record i is version first+i
	size     int64
	modified time.Time
}

func (s *segment) last() uint64 { return s.first + uint64(len(s.offsets)) - 1 }

const recordHeaderSize = 8

// errLogGap is an append of a version that does not follow the log's
// last: the log was left behind (a restore or take-over applied versions
// from the version log that it never got), not damaged.
var errLogGap = errors.New("change log: the version does not follow the last")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// openChangeLog opens the log in dir, creating dir if needed.
func openChangeLog(dir string, segVersions int, segBytes int64, retention Retention) (*changeLog, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("change log: %w", err)
	}
	l := &changeLog{dir: dir, segVersions: segVersions, segBytes: segBytes, retention: retention}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("change log: %w", err)
	}
	var firsts []uint64
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), segmentSuffix)
		if !ok {
			if _, old := strings.CutSuffix(e.Name(), ".seg"); old {
				// A segment of protocol 3's records: not servable.
				os.Remove(filepath.Join(dir, e.Name()))
			}
			continue
		}
		v, err := strconv.ParseUint(name, 10, 64)
		if err != nil {
			continue
		}
		firsts = append(firsts, v)
	}
	sort.Slice(firsts, func(i, j int) bool { return firsts[i] < firsts[j] })
	for i, first := range firsts {
		seg, err := scanSegment(filepath.Join(dir, segmentName(first)), first, i == len(firsts)-1)
		if err != nil {
			return nil, err
		}
		if len(seg.offsets) == 0 || (len(l.segs) > 0 && seg.first != l.segs[len(l.segs)-1].last()+1) {
			// Empty, or not contiguous with what precedes it: what came
			// before can no longer be served in order. Keep the newest run.
			for _, old := range l.segs {
				os.Remove(old.path)
			}
			l.segs = nil
			if len(seg.offsets) == 0 {
				os.Remove(seg.path)
				continue
			}
		}
		l.segs = append(l.segs, seg)
	}
	return l, nil
}

// segmentSuffix names the segments of this record format: a record is a
// protocol 4 version record after the checksum before it (database.go).
// Segments of the format before (".seg", protocol 3's records) are removed
// at open; the database then starts the log afresh.
const segmentSuffix = ".seg4"

func segmentName(first uint64) string { return fmt.Sprintf("%020d%s", first, segmentSuffix) }

// scanSegment reads a segment's record offsets, checking every CRC. In the
// newest segment a bad tail is cut off; in an older one it ends the segment.
func scanSegment(path string, first uint64, newest bool) (*segment, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("change log: %w", err)
	}
	seg := &segment{path: path, first: first}
	off := int64(0)
	for off+recordHeaderSize <= int64(len(b)) {
		n := int64(binary.LittleEndian.Uint32(b[off:]))
		sum := binary.LittleEndian.Uint32(b[off+4:])
		end := off + recordHeaderSize + n
		if end > int64(len(b)) || crc32.Checksum(b[off+recordHeaderSize:end], castagnoli) != sum {
			break
		}
		seg.offsets = append(seg.offsets, off)
		off = end
	}
	if off != int64(len(b)) && newest {
		if err := os.Truncate(path, off); err != nil {
			return nil, fmt.Errorf("change log: cut torn tail of %s: %w", path, err)
		}
	}
	seg.size = off
	if st, err := os.Stat(path); err == nil {
		seg.modified = st.ModTime()
	}
	return seg, nil
}

// first and last are the versions the log holds; both 0 when it is empty.
func (l *changeLog) first() uint64 {
	if len(l.segs) == 0 {
		return 0
	}
	return l.segs[0].first
}

func (l *changeLog) last() uint64 {
	if len(l.segs) == 0 {
		return 0
	}
	return l.segs[len(l.segs)-1].last()
}

// append adds version v's record. v must follow the last one, unless the
// log is empty.
func (l *changeLog) append(v uint64, rec []byte, now time.Time) error {
	if len(l.segs) > 0 && v != l.last()+1 {
		return fmt.Errorf("%w: append version %d after %d", errLogGap, v, l.last())
	}
	seg := l.current()
	if seg == nil || len(seg.offsets) >= l.segVersions || seg.size >= l.segBytes {
		if err := l.roll(v); err != nil {
			return err
		}
		seg = l.current()
	}
	buf := make([]byte, recordHeaderSize, recordHeaderSize+len(rec))
	binary.LittleEndian.PutUint32(buf, uint32(len(rec)))
	binary.LittleEndian.PutUint32(buf[4:], crc32.Checksum(rec, castagnoli))
	buf = append(buf, rec...)
	if _, err := l.f.WriteAt(buf, seg.size); err != nil {
		return fmt.Errorf("change log: append version %d: %w", v, err)
	}
	seg.offsets = append(seg.offsets, seg.size)
	seg.size += int64(len(buf))
	seg.modified = now
	l.trim(now)
	return nil
}

func (l *changeLog) current() *segment {
	if len(l.segs) == 0 {
		return nil
	}
	return l.segs[len(l.segs)-1]
}

// roll starts a new segment whose first version is v.
func (l *changeLog) roll(v uint64) error {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
	path := filepath.Join(l.dir, segmentName(v))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("change log: new segment: %w", err)
	}
	l.f = f
	l.segs = append(l.segs, &segment{path: path, first: v})
	return nil
}

// openTail opens the newest segment for appending, after open.
func (l *changeLog) openTail() error {
	seg := l.current()
	if seg == nil || l.f != nil {
		return nil
	}
	f, err := os.OpenFile(seg.path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("change log: %w", err)
	}
	l.f = f
	return nil
}

// trim removes the oldest segments beyond the retention, never the newest.
func (l *changeLog) trim(now time.Time) {
	for len(l.segs) > 1 {
		old := l.segs[0]
		var versions, bytes int64
		for _, s := range l.segs[1:] {
			versions += int64(len(s.offsets))
			bytes += s.size
		}
		over := (l.retention.Versions > 0 && versions >= int64(l.retention.Versions)) ||
			(l.retention.Bytes > 0 && bytes >= l.retention.Bytes) ||
			(l.retention.Age > 0 && now.Sub(old.modified) > l.retention.Age)
		if !over {
			return
		}
		os.Remove(old.path)
		l.segs = l.segs[1:]
	}
}

// size returns how many bytes of log the records of versions from..to
// take (with their headers), without reading them; -1 if the log does not
// hold them all.
func (l *changeLog) size(from, to uint64) int64 {
	if len(l.segs) == 0 || from < l.first() || to > l.last() || from > to {
		return -1
	}
	var n int64
	for _, seg := range l.segs {
		if seg.last() < from || seg.first > to {
			continue
		}
		lo, hi := max(from, seg.first), min(to, seg.last())
		end := seg.size
		if hi < seg.last() {
			end = seg.offsets[hi-seg.first+1]
		}
		n += end - seg.offsets[lo-seg.first]
	}
	return n
}

// read returns the records of versions from..to, inclusive.
func (l *changeLog) read(from, to uint64) ([][]byte, error) {
	if from < l.first() || to > l.last() || from > to {
		return nil, fmt.Errorf("change log: versions %d..%d outside %d..%d", from, to, l.first(), l.last())
	}
	var out [][]byte
	for _, seg := range l.segs {
		if seg.last() < from || seg.first > to {
			continue
		}
		lo, hi := max(from, seg.first), min(to, seg.last())
		start := seg.offsets[lo-seg.first]
		end := seg.size
		if hi < seg.last() {
			end = seg.offsets[hi-seg.first+1]
		}
		buf := make([]byte, end-start)
		f, err := os.Open(seg.path)
		if err != nil {
			return nil, fmt.Errorf("change log: %w", err)
		}
		_, err = f.ReadAt(buf, start)
		f.Close()
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("change log: read %s: %w", seg.path, err)
		}
		for off := 0; off < len(buf); {
			if off+recordHeaderSize > len(buf) {
				return nil, fmt.Errorf("change log: %s: torn record", seg.path)
			}
			n := int(binary.LittleEndian.Uint32(buf[off:]))
			sum := binary.LittleEndian.Uint32(buf[off+4:])
			if off+recordHeaderSize+n > len(buf) {
				return nil, fmt.Errorf("change log: %s: torn record at %d", seg.path, start+int64(off))
			}
			rec := buf[off+recordHeaderSize : off+recordHeaderSize+n]
			if crc32.Checksum(rec, castagnoli) != sum {
				return nil, fmt.Errorf("change log: %s: bad CRC at %d", seg.path, start+int64(off))
			}
			out = append(out, rec)
			off += recordHeaderSize + n
		}
	}
	return out, nil
}

// reset removes every segment: the log then starts at the next append.
func (l *changeLog) reset() error {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
	var errs []error
	for _, s := range l.segs {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	l.segs = nil
	return errors.Join(errs...)
}

func (l *changeLog) close() error {
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
