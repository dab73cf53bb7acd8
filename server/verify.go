package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/sqlrebase/sqlrebase/wal"
)

// Verify re-reads the database as SQLite sees it (the main file with the
// committed frames of the WAL over it) and compares it with the checksum
// the authority tracks and ships to replicas. A mismatch is ErrSelfCheck,
// naming the first page that differs. It reads the whole database, holding
// the authority's lock: for tests and debugging (AuthorityOptions.SelfCheck,
// Config.SelfCheck run it after every commit).
func (a *Authority) Verify(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.verifyCtx(ctx)
}

func (a *Authority) verify() error { return a.verifyCtx(context.Background()) }

func (a *Authority) verifyCtx(ctx context.Context) error {
	f, err := os.Open(a.path)
	if err != nil {
		return fmt.Errorf("self-check: %w", err)
	}
	defer f.Close()
	over, err := openWALOverlay(a.path + "-wal")
	if err != nil {
		return fmt.Errorf("self-check: %w", err)
	}
	defer over.close()
	sums, n, err := scanPages(ctx, f, over)
	if err != nil {
		return fmt.Errorf("self-check: %w", err)
	}
	if n != a.dbSize {
		return fmt.Errorf("%w: the file has %d pages, the authority tracks %d at version %d", ErrSelfCheck, n, a.dbSize, a.version)
	}
	if sums.Sum() != a.sums.Sum() {
		for p := uint32(1); p <= n; p++ {
			if sums.Page(p) != a.sums.Page(p) {
				return fmt.Errorf("%w: page %d differs at version %d", ErrSelfCheck, p, a.version)
			}
		}
		return fmt.Errorf("%w: at version %d", ErrSelfCheck, a.version)
	}
	return nil
}

// walOverlay is where the newest committed image of each page in a WAL
// file is: what SQLite reads instead of the main file's page.
type walOverlay struct {
	f        *os.File
	pageSize uint32
	dbSize   uint32           // database size after the last commit frame; 0: no frames
	at       map[uint32]int64 // page number -> offset of its newest committed image
}

// openWALOverlay scans the WAL at path frame by frame, as SQLite's recovery
// does: it stops at the first frame that does not continue the chain (salt
// or checksum), and keeps only frames up to the last commit frame. A missing
// or empty WAL is an empty overlay.
func openWALOverlay(path string) (*walOverlay, error) {
	o := &walOverlay{at: map[uint32]int64{}}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return o, nil
	}
	if err != nil {
		return nil, err
	}
	o.f = f
	var hb [wal.HeaderSize]byte
	if _, err := f.ReadAt(hb[:], 0); err != nil {
		if errors.Is(err, io.EOF) {
			return o, nil
		}
		return nil, fmt.Errorf("read WAL header: %w", err)
	}
	h, err := wal.DecodeHeader(hb[:])
	if err != nil {
		return o, nil // SQLite ignores a WAL without a valid header
	}
	o.pageSize = h.PageSize
	chain := wal.NewChain(h)
	frame := make([]byte, chain.FrameSize())
	pending := map[uint32]int64{}
	for off := int64(wal.HeaderSize); ; off += int64(len(frame)) {
		if _, err := f.ReadAt(frame, off); err != nil {
			break // a short or missing frame ends the log
		}
		fh, _, next, err := chain.Next(frame)
		if err != nil {
			break
		}
		chain = next
		pending[fh.Pgno] = off + wal.FrameHeaderSize
		if fh.Commit != 0 {
			for p, at := range pending {
				o.at[p] = at
			}
			clear(pending)
			o.dbSize = fh.Commit
		}
	}
	return o, nil
}

// page returns pgno's newest committed image in the WAL, or nil.
func (o *walOverlay) page(pgno uint32) ([]byte, error) {
	at, ok := o.at[pgno]
	if !ok {
		return nil, nil
	}
	b := make([]byte, o.pageSize)
	if _, err := o.f.ReadAt(b, at); err != nil {
		return nil, fmt.Errorf("read WAL page %d: %w", pgno, err)
	}
	return b, nil
}

func (o *walOverlay) close() {
	if o.f != nil {
		o.f.Close()
	}
}
