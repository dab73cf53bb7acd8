package cluster

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/wal"
)

// Restored says what Restore built.
type Restored struct {
	Version  uint64 // the database version of the file
	Checksum uint64 // its whole-database checksum
	Seq      uint64 // the stream sequence of Version's entry (0: none)
	FromSnap uint64 // the snapshot's version it started from (0: the empty database)
}

// restoreChunk is how many log entries a restore reads at a time.
const restoreChunk = 256

// Restore builds db's server file at path from the stream, as a new owner
// must before it takes the lease's work over: the latest snapshot (or the
// empty database, if there is none), then every version after it, each
// checked against the chain (its version follows, its checksum before is
// the image's, its pages give its checksum after). The file is written
// beside path and renamed over it only once complete and synced, so a
// failed restore leaves path as it was. Entries are the server's change log
// records (server.VersionLog): the checksum before, then the encoded
// version.
func Restore(ctx context.Context, l *Log, snaps *Snapshots, db, path string) (Restored, error) {
	tmp := path + ".restore"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return Restored{}, fmt.Errorf("cluster: restore %s: %w", db, err)
	}
	res, err := restoreInto(ctx, l, snaps, db, f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return Restored{}, fmt.Errorf("cluster: restore %s: %w", db, err)
	}
	return res, nil
}

func restoreInto(ctx context.Context, l *Log, snaps *Snapshots, db string, f *os.File) (Restored, error) {
	var res Restored
	pageSize := uint32(wal.DefaultPageSize)
	var sums *wal.ChecksumTable
	from := uint64(0)
	info, r, err := SnapshotInfo{}, io.ReadCloser(nil), error(nil)
	if snaps == nil {
		err = ErrNoSnapshot
	} else {
		info, r, err = snaps.Get(ctx, db)
	}
	switch {
	case errors.Is(err, ErrNoSnapshot):
		img := wal.EmptyDatabase(pageSize)
		if _, err := f.WriteAt(img, 0); err != nil {
			return res, err
		}
		sums = tableOf(img, pageSize)
	case err != nil:
		return res, err
	default:
		// The reader checks the pages against the snapshot's checksum and
		// fails at its end if they do not give it.
		_, err := io.Copy(io.NewOffsetWriter(f, 0), r)
		r.Close()
		if err != nil {
			return res, err
		}
		pageSize = info.PageSize
		sums = wal.NewChecksumTable(pageSize)
		buf := make([]byte, pageSize)
		for pg := uint32(1); pg <= info.Pages; pg++ {
			if _, err := f.ReadAt(buf, int64(pg-1)*int64(pageSize)); err != nil {
				return res, err
			}
			sums.Set(pg, wal.PageChecksum(pg, buf))
		}
		res.Version, res.Seq, res.FromSnap, from = info.Version, info.Seq, info.Version, info.Seq+1
	}
	dbSize := sums.Pages()
	for {
		es, err := l.Read(ctx, db, from, restoreChunk)
		if err != nil {
			return res, err
		}
		for _, e := range es {
			if res.Version != 0 && e.Version != res.Version+1 || res.Version == 0 && e.Version != 1 {
				return res, fmt.Errorf("%w: version %d (seq %d) after %d", ErrBrokenChain, e.Version, e.Seq, res.Version)
			}
			if len(e.Rec) < 8 || binary.LittleEndian.Uint64(e.Rec) != sums.Sum() {
				return res, fmt.Errorf("%w: version %d (seq %d, by %q) does not start from the image's checksum %016x", ErrBrokenChain, e.Version, e.Seq, e.Owner, sums.Sum())
			}
			ev, err := protocol.DecodeEncodedVersion(e.Rec[8:], protocol.DefaultLimits)
			if err != nil {
				return res, fmt.Errorf("%w: version %d: %w", ErrBrokenChain, e.Version, err)
			}
			ps, err := protocol.DecodeVersion(&ev, protocol.DefaultLimits, func(pg uint32) ([]byte, error) {
				if pg == 0 || pg > dbSize {
					return nil, fmt.Errorf("base page %d outside 1..%d", pg, dbSize)
				}
				b := make([]byte, pageSize)
				_, err := f.ReadAt(b, int64(pg-1)*int64(pageSize))
				return b, err
			})
			if err != nil {
				return res, fmt.Errorf("%w: version %d: %w", ErrBrokenChain, e.Version, err)
			}
			if ps.PageSize != pageSize || sums.Preview(ps) != ps.PostChecksum {
				return res, fmt.Errorf("%w: version %d: its pages do not give its checksum", ErrBrokenChain, e.Version)
			}
			for _, p := range ps.Pages {
				if _, err := f.WriteAt(p.Data, int64(p.Pgno-1)*int64(pageSize)); err != nil {
					return res, err
				}
			}
			if ps.DBSize < dbSize {
				if err := f.Truncate(int64(ps.DBSize) * int64(pageSize)); err != nil {
					return res, err
				}
			}
			sums.Apply(ps)
			dbSize = ps.DBSize
			res.Version, res.Seq = e.Version, e.Seq
		}
		if len(es) < restoreChunk {
			break
		}
		from = es[len(es)-1].Seq + 1
	}
	if res.Version == 0 {
		return res, fmt.Errorf("cluster: %s has neither a snapshot nor versions in the stream", db)
	}
	res.Checksum = sums.Sum()
	return res, nil
}

func tableOf(img []byte, pageSize uint32) *wal.ChecksumTable {
	t := wal.NewChecksumTable(pageSize)
	for off, pg := 0, uint32(1); off < len(img); off, pg = off+int(pageSize), pg+1 {
		t.Set(pg, wal.PageChecksum(pg, img[off:off+int(pageSize)]))
	}
	return t
}

// errNoEntry is entryOf's error for a version the subject does not hold
// (trimmed, or never appended).
var errNoEntry = errors.New("cluster: no such version in the stream")

// entryOf finds db's entry of version v by a binary search over stream
// sequences, each probe one direct get of the next entry on the subject
// at or after a sequence: a subject's versions rise with its sequences.
// About log2(the stream's last sequence) gets instead of reading the
// subject from its start.
func entryOf(ctx context.Context, l *Log, db string, v uint64) (Entry, error) {
	last, err := l.Last(ctx, db)
	if err != nil {
		return Entry{}, err
	}
	if last.Seq == 0 || v == 0 || v > last.Version {
		return Entry{}, fmt.Errorf("%w: %s version %d (the subject ends at %d)", errNoEntry, db, v, last.Version)
	}
	if last.Version == v {
		return last, nil
	}
	// The first entry at or after lo is the first of version >= v.
	lo, hi := uint64(1), last.Seq
	for lo < hi {
		mid := lo + (hi-lo)/2
		es, err := l.Read(ctx, db, mid, 1)
		if err != nil {
			return Entry{}, err
		}
		if len(es) == 0 {
			return Entry{}, fmt.Errorf("%w: %s: nothing at or after seq %d below the tail's %d", ErrBrokenChain, db, mid, last.Seq)
		}
		if es[0].Version < v {
			lo = es[0].Seq + 1
		} else {
			hi = mid
		}
	}
	es, err := l.Read(ctx, db, lo, 1)
	if err != nil {
		return Entry{}, err
	}
	if len(es) == 0 || es[0].Version != v {
		return Entry{}, fmt.Errorf("%w: %s version %d (trimmed)", errNoEntry, db, v)
	}
	return es[0], nil
}

// postChecksum is the whole-database checksum after e's version.
func postChecksum(e Entry) (uint64, error) {
	if len(e.Rec) < 8 {
		return 0, fmt.Errorf("%w: %s version %d: a record of %d bytes", ErrBrokenChain, e.msgID, e.Version, len(e.Rec))
	}
	ev, err := protocol.DecodeEncodedVersion(e.Rec[8:], protocol.DefaultLimits)
	if err != nil {
		return 0, fmt.Errorf("%w: version %d: %w", ErrBrokenChain, e.Version, err)
	}
	if ev.Version != e.Version {
		return 0, fmt.Errorf("%w: entry of version %d holds version %d", ErrBrokenChain, e.Version, ev.Version)
	}
	return ev.PostChecksum, nil
}
