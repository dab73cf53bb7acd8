package cluster

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	sqlitedriver "github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// Restored says what Restore built.
type Restored struct {
	Version  uint64 // the database version of the file
	Checksum uint64 // its whole-database checksum
	Seq      uint64 // the stream sequence of Version's entry (0: none)
	FromSnap uint64 // the snapshot's version it started from (0: none)
	FromFile uint64 // the local file's version it started from (0: none)
	Applied  int    // how many versions from the stream it applied
}

// restoreChunk is how many log entries a restore reads at a time.
const restoreChunk = 256

// restoreTries bounds how often a restore starts again from a newer
// snapshot stored while it ran (errTrimmed): the owner snapshots at most
// every DefaultSnapshotMinVersions versions, so a restore that loses the
// race three times in a row is up against a misconfigured policy.
const restoreTries = 3

// errTrimmed marks a restore that found the stream trimmed past its image:
// the versions after the image's are gone, because a newer snapshot was
// stored (and the stream trimmed behind it) meanwhile.
var errTrimmed = errors.New("cluster: the stream is trimmed past the image")

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
	for try := 1; try < restoreTries && snaps != nil; try++ {
		// The owner stored a newer snapshot while this restore read the
		// older one (and purged its chunks, or trimmed the stream behind
		// the new one): start again from the new one.
		if errors.Is(err, errTrimmed) {
			info, ierr := snaps.Info(ctx, db)
			if ierr != nil || info.Version == res.FromSnap {
				break
			}
		} else if !errors.Is(err, ErrSnapshotReplaced) {
			break
		}
		if err = f.Truncate(0); err == nil {
			res, err = restoreInto(ctx, l, snaps, db, f)
		}
	}
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
	res, err = apply(ctx, l, db, f, pageSize, sums, res, from)
	if err != nil {
		return res, err
	}
	if res.Version == 0 {
		return res, fmt.Errorf("cluster: %s has neither a snapshot nor versions in the stream", db)
	}
	return res, nil
}

// apply applies db's entries from stream sequence from on to the image in
// f (res.Version, its checksum table sums), checking each against the
// chain, and returns what the image then is.
func apply(ctx context.Context, l *Log, db string, f *os.File, pageSize uint32, sums *wal.ChecksumTable, res Restored, from uint64) (Restored, error) {
	dbSize := sums.Pages()
	for {
		es, err := l.Read(ctx, db, from, restoreChunk)
		if err != nil {
			return res, err
		}
		for _, e := range es {
			if e.Version > res.Version+1 {
				return res, fmt.Errorf("%w: %w: version %d (seq %d) after %d", ErrBrokenChain, errTrimmed, e.Version, e.Seq, res.Version)
			}
			if e.Version != res.Version+1 {
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
			crcs := wal.PageChecksums(ps) // once, for the check and the apply
			if ps.PageSize != pageSize || sums.PreviewWith(ps, crcs) != ps.PostChecksum {
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
			sums.ApplyWith(ps, crcs)
			dbSize = ps.DBSize
			res.Version, res.Seq = e.Version, e.Seq
			res.Applied++
		}
		if len(es) < restoreChunk {
			break
		}
		from = es[len(es)-1].Seq + 1
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

// entryOf finds db's entry of version v: seqAfter's binary search over
// stream sequences (about log2(the stream's last sequence) direct gets),
// then that entry. errNoEntry if the subject does not hold v (trimmed, or
// not appended yet).
func entryOf(ctx context.Context, l *Log, db string, v uint64) (Entry, error) {
	if v == 0 {
		return Entry{}, fmt.Errorf("%w: %s version 0", errNoEntry, db)
	}
	seq, err := l.seqAfter(ctx, db, v-1)
	if errors.Is(err, server.ErrFollowGap) {
		return Entry{}, fmt.Errorf("%w: %s version %d: %w", errNoEntry, db, v, err)
	}
	if err != nil {
		return Entry{}, err
	}
	es, err := l.Read(ctx, db, seq, 1)
	if err != nil {
		return Entry{}, err
	}
	if len(es) == 0 || es[0].Version != v {
		return Entry{}, fmt.Errorf("%w: %s version %d (the subject ends before it)", errNoEntry, db, v)
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

// errNoLocal is restoreBehind's error when there is no local file to
// start from (none set aside, or a new one at version 0).
var errNoLocal = errors.New("cluster: no local file to restore from")

// restoreBehind is the restore of a node whose old file may be only behind
// the stream (docs/CLUSTER.md, "A new owner's restore", step 4). stale is
// the file the server set aside (with its WAL beside it, if any): it is
// copied beside path, never changed; its WAL is checkpointed into the copy
// by SQLite itself (committed frames are part of the version, an
// uncommitted tail is not), and the copy's version (from its reserved
// table) and whole-database checksum are read. Only if the subject holds
// that version's entry, with that checksum after, does the restore apply
// the entries after it; the copy then replaces path as Restore's file
// does. Any other case is an error and path is left as it was: a file
// whose last commit the stream refused (its checksum is not the stream's
// at its version), one ahead of the stream, one behind a trim, or a new
// one (errNoLocal). The caller then restores in full.
func restoreBehind(ctx context.Context, l *Log, db, path, stale string) (Restored, error) {
	if _, err := os.Stat(stale); err != nil {
		return Restored{}, fmt.Errorf("%w: %w", errNoLocal, err)
	}
	tmp := path + ".restore"
	res, err := restoreBehindInto(ctx, l, db, stale, tmp)
	for _, sfx := range []string{"-wal", "-shm"} {
		os.Remove(tmp + sfx)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return Restored{}, fmt.Errorf("cluster: restore %s from its local file: %w", db, err)
	}
	return res, nil
}

func restoreBehindInto(ctx context.Context, l *Log, db, stale, tmp string) (Restored, error) {
	if err := copyFile(stale, tmp); err != nil {
		return Restored{}, err
	}
	os.Remove(tmp + "-shm") // the index belongs to the WAL it was made for
	if st, err := os.Stat(stale + "-wal"); err == nil && st.Size() > 0 {
		if err := copyFile(stale+"-wal", tmp+"-wal"); err != nil {
			return Restored{}, err
		}
	} else {
		os.Remove(tmp + "-wal")
	}
	version, err := checkpointedVersion(ctx, tmp)
	if err != nil {
		return Restored{}, err
	}
	if version == 0 {
		return Restored{}, fmt.Errorf("%w: the set-aside file is a new database", errNoLocal)
	}
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err != nil {
		return Restored{}, err
	}
	defer f.Close()
	pageSize, sums, err := scanFile(f)
	if err != nil {
		return Restored{}, err
	}
	e, err := entryOf(ctx, l, db, version)
	if err != nil {
		return Restored{}, err
	}
	sum, err := postChecksum(e)
	if err != nil {
		return Restored{}, err
	}
	if sum != sums.Sum() {
		return Restored{}, fmt.Errorf("%w: the local file at version %d has checksum %016x, the stream's %016x", ErrBrokenChain, version, sums.Sum(), sum)
	}
	res, err := apply(ctx, l, db, f, pageSize, sums, Restored{Version: version, Seq: e.Seq, FromFile: version}, e.Seq+1)
	if err != nil {
		return Restored{}, err
	}
	if err := f.Sync(); err != nil {
		return Restored{}, err
	}
	return res, nil
}

// checkpointedVersion opens the database file at path with SQLite,
// checkpoints its WAL into it (so that the main file alone is the last
// committed state, as the server's own open does), and returns its
// version. Closing the last connection removes the WAL.
func checkpointedVersion(ctx context.Context, path string) (uint64, error) {
	db, err := sqlitedriver.Open("file:"+path, nil)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	var busy, logFrames, done int
	if err := db.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &logFrames, &done); err != nil {
		return 0, fmt.Errorf("checkpoint the local file: %w", err)
	}
	if busy != 0 {
		return 0, errors.New("checkpoint the local file: busy")
	}
	v, err := mutators.Version(ctx, db)
	if err != nil {
		return 0, err
	}
	return v, db.Close()
}

// scanFile reads the page size from a database file's header and the
// checksum table of its pages (the file's size in pages, as the server's
// scan counts them).
func scanFile(f *os.File) (uint32, *wal.ChecksumTable, error) {
	var hdr [100]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return 0, nil, fmt.Errorf("read the database header: %w", err)
	}
	pageSize := uint32(hdr[16])<<8 | uint32(hdr[17])
	if pageSize == 1 {
		pageSize = 65536
	}
	if !wal.ValidPageSize(pageSize) {
		return 0, nil, fmt.Errorf("the database header's page size %d", pageSize)
	}
	st, err := f.Stat()
	if err != nil {
		return 0, nil, err
	}
	n := uint32(st.Size() / int64(pageSize))
	sums := wal.NewChecksumTable(pageSize)
	sums.Resize(n)
	buf := make([]byte, imageReadPages*int(pageSize))
	for first := uint32(1); first <= n; {
		k := min(n-first+1, imageReadPages)
		chunk := buf[:int(k)*int(pageSize)]
		if _, err := f.ReadAt(chunk, int64(first-1)*int64(pageSize)); err != nil {
			return 0, nil, err
		}
		for i := uint32(0); i < k; i++ {
			sums.Set(first+i, wal.PageChecksum(first+i, chunk[int(i)*int(pageSize):int(i+1)*int(pageSize)]))
		}
		first += k
	}
	return pageSize, sums, nil
}

// copyFile copies src to dst (replaced), not synced: the restore syncs
// the finished file before it renames it into place, and a crash before
// that leaves only a temporary file the next restore replaces.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
