package vfs

import (
	"context"
	"fmt"
	"io"

	"github.com/sqlrebase/sqlrebase/wal"
)

// SnapshotImage describes a whole database image to install: Pages pages of
// PageSize bytes, concatenated in page order in a file (or anything with
// ReadAt), that is the server's database at Version with checksum Checksum.
type SnapshotImage struct {
	Src      io.ReaderAt
	Version  uint64
	PageSize uint32
	Pages    uint32
	Checksum uint64
}

// snapshotChunkPages is how many pages an install reads and writes at once:
// memory stays at a megabyte whatever the database's size.
const snapshotChunkPages = 256

// InstallSnapshot replaces the database with img, dropping the pending WAL
// as Rebase does. Unlike a snapshot page set given to Rebase, the image is
// never held in memory or copied into the apply journal: it is checked
// against its checksum first (nothing changes if it does not match), then
// a journal record with no pages, naming the version and checksum the main
// file is about to have, is written, then the pages are copied. A crash
// during the copy leaves a main file that does not match that record, which
// the next open refuses with ErrDiverged (the replica then re-syncs from
// the server): it is never served.
func (r *Replica) InstallSnapshot(ctx context.Context, img SnapshotImage) error {
	if r.poisoned.Load() != nil {
		return r.poisonedErr()
	}
	switch {
	case !wal.ValidPageSize(img.PageSize) || img.Pages == 0:
		return fmt.Errorf("%w: snapshot of %d pages of %d bytes", ErrPageSize, img.Pages, img.PageSize)
	case img.Version < r.version:
		return fmt.Errorf("%w: snapshot of version %d would take the replica back from %d", ErrVersion, img.Version, r.version)
	}
	sums := wal.NewChecksumTable(img.PageSize)
	sums.Resize(img.Pages)
	if err := readImage(img, func(first uint32, chunk []byte) error {
		for i := 0; i < len(chunk)/int(img.PageSize); i++ {
			pgno := first + uint32(i)
			sums.Set(pgno, wal.PageChecksum(pgno, chunk[i*int(img.PageSize):(i+1)*int(img.PageSize)]))
		}
		return ctx.Err()
	}); err != nil {
		return fmt.Errorf("snapshot of version %d: %w", img.Version, err)
	}
	if sums.Sum() != img.Checksum {
		return fmt.Errorf("%w: snapshot of version %d has checksum %016x, the server says %016x", ErrChecksum, img.Version, sums.Sum(), img.Checksum)
	}
	marker := &wal.PageSet{Version: img.Version, PageSize: img.PageSize, DBSize: img.Pages, PreChecksum: img.Checksum, PostChecksum: img.Checksum}
	if err := r.writeJournal(marker, nil); err != nil {
		return WrapDiskFull(err) // nothing was touched: not a poison
	}
	if err := r.lockAll(ctx); err != nil {
		return err
	}
	if err := r.copyImage(img); err != nil {
		r.image = &img
		return r.poison(fmt.Errorf("install snapshot of version %d: %w", img.Version, err))
	}
	r.sums, r.pageSize, r.version = sums, img.PageSize, img.Version
	if err := r.resetWAL(false); err != nil {
		return r.poison(fmt.Errorf("drop the WAL: %w", err))
	}
	return r.unlockAll()
}

// copyImage writes the image's pages over the main file and sets its size.
func (r *Replica) copyImage(img SnapshotImage) error {
	r.cookieKnown, r.applied = false, nil // SchemaCookie and BasePage read the file again
	if err := readImage(img, func(first uint32, chunk []byte) error {
		_, err := r.faults.writeAt(r.main, chunk, int64(first-1)*int64(img.PageSize))
		return err
	}); err != nil {
		return err
	}
	if err := r.faults.truncate(r.main, int64(img.Pages)*int64(img.PageSize)); err != nil {
		return err
	}
	if r.durability == Full {
		return r.faults.sync(r.main)
	}
	return nil
}

// readImage calls fn on the image's pages, a chunk at a time.
func readImage(img SnapshotImage, fn func(first uint32, chunk []byte) error) error {
	buf := make([]byte, snapshotChunkPages*int(img.PageSize))
	for first := uint32(1); first <= img.Pages; {
		k := min(img.Pages-first+1, snapshotChunkPages)
		chunk := buf[:int(k)*int(img.PageSize)]
		if _, err := img.Src.ReadAt(chunk, int64(first-1)*int64(img.PageSize)); err != nil {
			return fmt.Errorf("read pages %d+%d: %w", first, k, err)
		}
		if err := fn(first, chunk); err != nil {
			return err
		}
		first += k
	}
	return nil
}
