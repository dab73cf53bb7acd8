package vfs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"

	"github.com/sqlrebase/sqlrebase/wal"
)

// ErrCaptureLost means the WAL was restarted more than once since the last
// capture, so commits were missed; the caller must take a full snapshot.
var ErrCaptureLost = errors.New("vfs: commits were lost between captures (WAL restarted twice)")

// Capture follows the WAL of a database written by ordinary SQLite (the
// server's) and returns, after each commit, the pages that commit wrote.
//
// It reads only what was appended since the last call, so capture costs what
// the commit wrote, not what the WAL holds. It stops at the last commit
// frame: frames after it belong to a transaction still open or rolled back.
// It follows a WAL restart (new salts after a checkpoint) as long as it is
// called after every commit and before the next write transaction, which is
// how the server's single writer uses it.
type Capture struct {
	walPath string
	f       *os.File
	hdr     wal.Header
	chain   wal.Chain
	off     int64 // offset of the first frame not yet captured
	started bool
}

// NewCapture returns a capture of the WAL of the database at dbPath,
// positioned at the current end of the WAL: commits already in it are not
// returned.
func NewCapture(dbPath string) (*Capture, error) {
	c := &Capture{walPath: dbPath + "-wal"}
	if _, _, err := c.Next(); err != nil {
		return nil, err
	}
	return c, nil
}

// Next returns the newest image of every page written by the commits since
// the last call, sorted by page number, and the database size in pages after
// the last of them. It returns no pages when nothing was committed.
func (c *Capture) Next() ([]wal.Page, uint32, error) {
	if c.f == nil {
		f, err := os.Open(c.walPath)
		if errors.Is(err, fs.ErrNotExist) {
			c.started = true
			return nil, 0, nil
		}
		if err != nil {
			return nil, 0, fmt.Errorf("capture: %w", err)
		}
		c.f = f
	}
	var hb [wal.HeaderSize]byte
	if _, err := c.f.ReadAt(hb[:], 0); err != nil {
		if errors.Is(err, io.EOF) { // empty WAL (just created or truncated)
			c.started = true
			c.off = 0
			return nil, 0, nil
		}
		return nil, 0, fmt.Errorf("capture: read WAL header: %w", err)
	}
	hdr, err := wal.DecodeHeader(hb[:])
	if err != nil {
		return nil, 0, fmt.Errorf("capture: %w", err)
	}
	if c.off == 0 || hdr.Salt1 != c.hdr.Salt1 || hdr.Salt2 != c.hdr.Salt2 {
		// A new WAL: either the first look, or SQLite restarted the log
		// after a checkpoint. A restart bumps the checkpoint sequence by
		// one; more means a whole generation of frames went by unseen.
		if c.off != 0 && hdr.CheckpointSeq != c.hdr.CheckpointSeq+1 {
			return nil, 0, fmt.Errorf("%w: checkpoint sequence %d after %d", ErrCaptureLost, hdr.CheckpointSeq, c.hdr.CheckpointSeq)
		}
		c.hdr, c.chain, c.off = hdr, wal.NewChain(hdr), wal.HeaderSize
	}
	frameSize := int64(wal.FrameHeaderSize) + int64(hdr.PageSize)
	type frame struct {
		pgno uint32
		data []byte
	}
	var frames []frame
	committed, dbSize := 0, uint32(0)
	chain, off := c.chain, c.off
	for {
		buf := make([]byte, frameSize)
		if _, err := c.f.ReadAt(buf, off); err != nil {
			break // short read: the end of the WAL
		}
		fh, page, next, err := chain.Next(buf)
		if err != nil {
			break // a frame of an older generation, or torn: the end
		}
		frames = append(frames, frame{fh.Pgno, page})
		chain, off = next, off+frameSize
		if fh.Commit != 0 {
			committed, dbSize = len(frames), fh.Commit
			c.chain, c.off = chain, off
		}
	}
	first := !c.started
	c.started = true
	if committed == 0 || first {
		return nil, 0, nil
	}
	newest := make(map[uint32][]byte, committed)
	for _, f := range frames[:committed] {
		if f.pgno <= dbSize {
			newest[f.pgno] = f.data
		}
	}
	pages := make([]wal.Page, 0, len(newest))
	for pgno, data := range newest {
		pages = append(pages, wal.Page{Pgno: pgno, Data: data})
	}
	sort.Slice(pages, func(i, j int) bool { return pages[i].Pgno < pages[j].Pgno })
	return pages, dbSize, nil
}

// Resync forgets the position and takes the current end of the WAL as the
// new start, without returning what lies before it. Call it after a
// checkpoint the caller ran itself, with everything before it captured: a
// TRUNCATE or RESTART checkpoint moves the WAL's checkpoint sequence, which
// Next would otherwise take for a lost generation.
func (c *Capture) Resync() error {
	c.started, c.off = false, 0
	_, _, err := c.Next()
	return err
}

// Close closes the WAL handle.
func (c *Capture) Close() error {
	if c.f == nil {
		return nil
	}
	err := c.f.Close()
	c.f = nil
	return err
}
