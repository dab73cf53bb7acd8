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
	dbPath  string
	f       *os.File
	main    *os.File         // the main file, for images that predate the WAL (opened on first need)
	latest  map[uint32]int64 // offset of each page's newest committed frame in this WAL generation
	hdr     wal.Header
	chain   wal.Chain
	off     int64 // offset of the first frame not yet captured
	started bool
	// lastFrames is how many frames the last call's commits wrote: the
	// next call reads that many and one more first.
	lastFrames int64
	// lastImages is the image of each page the last call returned, in
	// this WAL generation: the newest committed image of those pages, so
	// imageBefore has it without a read. A server's commits mostly write
	// again the pages the last one wrote (a hot row, the reserved rows of
	// the clients and the version): two reads of the WAL and two page
	// buffers per version fewer.
	lastImages map[uint32][]byte
}

// NewCapture returns a capture of the WAL of the database at dbPath,
// positioned at the current end of the WAL: commits already in it are not
// returned.
func NewCapture(dbPath string) (*Capture, error) {
	c := &Capture{walPath: dbPath + "-wal", dbPath: dbPath, latest: map[uint32]int64{}}
	if _, _, err := c.Next(); err != nil {
		return nil, err
	}
	return c, nil
}

// Next returns the newest image of every page written by the commits since
// the last call, sorted by page number, and the database size in pages after
// the last of them. It returns no pages when nothing was committed.
func (c *Capture) Next() ([]wal.Page, uint32, error) {
	pages, _, dbSize, err := c.next(false)
	return pages, dbSize, err
}

// NextBefore is Next that also returns, for each page, the image it had
// before those commits: from the WAL if an earlier commit of this generation
// wrote it, else from the main file (which a WAL restart proves complete), or
// nil if the page lay beyond the main file. The server encodes each version
// against these images, which are what a replica one version behind holds.
func (c *Capture) NextBefore() (pages []wal.Page, before [][]byte, dbSize uint32, err error) {
	return c.next(true)
}

func (c *Capture) next(wantBefore bool) ([]wal.Page, [][]byte, uint32, error) {
	if c.f != nil && c.started && c.off >= wal.HeaderSize {
		// The usual case first: commits since the last call, in the
		// same WAL generation, right where the last call stopped; found
		// without reading the WAL header (one read per version fewer).
		// After a restart nothing is found here: the new generation's
		// frames have other salts, and what the old one left past the
		// last commit captured was never committed (Capture's contract:
		// called after every commit), so the header below says what
		// happened.
		if frames, committed, dbSize, chain, off := c.scan(c.chain, c.off); committed > 0 {
			c.chain, c.off = chain, off
			pages, before, err := c.collect(frames, committed, dbSize, wantBefore)
			return pages, before, dbSize, err
		}
	}
	if c.f == nil {
		f, err := os.Open(c.walPath)
		if errors.Is(err, fs.ErrNotExist) {
			c.started = true
			return nil, nil, 0, nil
		}
		if err != nil {
			return nil, nil, 0, fmt.Errorf("capture: %w", err)
		}
		c.f = f
	}
	var hb [wal.HeaderSize]byte
	if _, err := c.f.ReadAt(hb[:], 0); err != nil {
		if errors.Is(err, io.EOF) { // empty WAL (just created or truncated)
			c.started = true
			c.off = 0
			return nil, nil, 0, nil
		}
		return nil, nil, 0, fmt.Errorf("capture: read WAL header: %w", err)
	}
	if hb == ([wal.HeaderSize]byte{}) {
		// A WAL file written with zeros ahead of SQLite (the server
		// presizes it): empty until SQLite writes a header.
		c.started = true
		c.off = 0
		return nil, nil, 0, nil
	}
	hdr, err := wal.DecodeHeader(hb[:])
	if err != nil {
		return nil, nil, 0, fmt.Errorf("capture: %w", err)
	}
	if c.off == 0 || hdr.Salt1 != c.hdr.Salt1 || hdr.Salt2 != c.hdr.Salt2 {
		// A new WAL: either the first look, or SQLite restarted the log
		// after a checkpoint. A restart bumps the checkpoint sequence by
		// one; more means a whole generation of frames went by unseen.
		if c.off != 0 && hdr.CheckpointSeq != c.hdr.CheckpointSeq+1 {
			return nil, nil, 0, fmt.Errorf("%w: checkpoint sequence %d after %d", ErrCaptureLost, hdr.CheckpointSeq, c.hdr.CheckpointSeq)
		}
		c.hdr, c.chain, c.off = hdr, wal.NewChain(hdr), wal.HeaderSize
		clear(c.latest)
		c.lastImages = nil
	}
	frames, committed, dbSize, chain, off := c.scan(c.chain, c.off)
	if committed > 0 {
		c.chain, c.off = chain, off
	}
	first := !c.started
	c.started = true
	if committed == 0 {
		c.lastFrames = 0
		return nil, nil, 0, nil
	}
	if first {
		c.lastFrames = int64(committed)
		c.remember(frames[:committed])
		c.lastImages = nil
		return nil, nil, 0, nil
	}
	pages, before, err := c.collect(frames, committed, dbSize, wantBefore)
	return pages, before, dbSize, err
}

// scan reads the frames from off on while they continue chain, and returns
// them, how many of them the last commit frame among them ends (0: none),
// the database size that frame gives, and the chain and offset after it.
func (c *Capture) scan(chain wal.Chain, off int64) (frames []frame, committed int, dbSize uint32, endChain wal.Chain, endOff int64) {
	frameSize := int64(chain.FrameSize())
	// Frames are read a few at a time: the first read takes one frame
	// more than the last call's commits wrote (the frame after them
	// proves they were all), each next one twice as many up to 16. A
	// commit of the size the last one had so costs one system call and a
	// buffer its size, and a WAL that SQLite restarted (it keeps its old
	// length, full of stale frames) is not read to its end. (A read of 16
	// frames every time made a 66 kB buffer per version, which doubled
	// the server's allocation per delivery in the fan-out to 100
	// subscribers, and its collections with it.) The page images returned
	// alias these buffers, so each read has one of its own.
	batch := min(max(c.lastFrames+1, 2), 16)
	var tail []byte
	var tailOff int64
	endChain, endOff = chain, off
	for {
		if off+frameSize > tailOff+int64(len(tail)) {
			tail = make([]byte, batch*frameSize)
			batch = min(2*batch, 16)
			n, _ := c.f.ReadAt(tail, off)
			tail, tailOff = tail[:n], off
			if int64(n) < frameSize {
				break // the end of the WAL
			}
		}
		at := off - tailOff
		buf := tail[at : at+frameSize : at+frameSize]
		fh, page, next, err := chain.Next(buf)
		if err != nil {
			break // a frame of an older generation, or torn: the end
		}
		frames = append(frames, frame{fh.Pgno, off, page})
		chain, off = next, off+frameSize
		if fh.Commit != 0 {
			committed, dbSize = len(frames), fh.Commit
			endChain, endOff = chain, off
		}
	}
	return frames, committed, dbSize, endChain, endOff
}

// collect turns the frames of the commits a call found (the first
// committed of frames) into the newest image of every page they wrote,
// sorted by page number, and with wantBefore each page's image before them;
// then it remembers them for the next call.
func (c *Capture) collect(frames []frame, committed int, dbSize uint32, wantBefore bool) ([]wal.Page, [][]byte, error) {
	c.lastFrames = int64(committed)
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
	var before [][]byte
	if wantBefore {
		before = make([][]byte, len(pages))
		for i, p := range pages {
			b, err := c.imageBefore(p.Pgno, int64(c.hdr.PageSize))
			if err != nil {
				return nil, nil, fmt.Errorf("capture: image of page %d before the commit: %w", p.Pgno, err)
			}
			before[i] = b
		}
	}
	c.remember(frames[:committed])
	c.lastImages = make(map[uint32][]byte, len(pages))
	for _, p := range pages {
		c.lastImages[p.Pgno] = p.Data
	}
	return pages, before, nil
}

// frame is one WAL frame read by a capture: its page, where it starts, and
// the page image.
type frame struct {
	pgno uint32
	off  int64
	data []byte
}

// remember records where the newest committed frame of each page is, for
// imageBefore.
func (c *Capture) remember(frames []frame) {
	for _, f := range frames {
		c.latest[f.pgno] = f.off
	}
}

// imageBefore is a page as of the last commit already remembered: the last
// call's image of it if it returned one, else read from the WAL or the main
// file. The caller reads it and does not change it.
func (c *Capture) imageBefore(pgno uint32, pageSize int64) ([]byte, error) {
	if img, ok := c.lastImages[pgno]; ok {
		return img, nil
	}
	buf := make([]byte, pageSize)
	if off, ok := c.latest[pgno]; ok {
		if _, err := c.f.ReadAt(buf, off+wal.FrameHeaderSize); err != nil {
			return nil, err
		}
		return buf, nil
	}
	if c.main == nil {
		f, err := os.Open(c.dbPath)
		if err != nil {
			return nil, err
		}
		c.main = f
	}
	n, err := c.main.ReadAt(buf, int64(pgno-1)*pageSize)
	if n == len(buf) {
		return buf, nil
	}
	if errors.Is(err, io.EOF) {
		return nil, nil // the page did not exist
	}
	return nil, err
}

// Frames is how many frames the WAL's current generation holds up to the
// last commit captured: what a checkpoint would have to copy. (The WAL
// file's size says nothing once SQLite restarts it: the file keeps its
// length and is overwritten from the start.)
func (c *Capture) Frames() int64 {
	if c.off < wal.HeaderSize || c.hdr.PageSize == 0 {
		return 0
	}
	return (c.off - wal.HeaderSize) / (int64(wal.FrameHeaderSize) + int64(c.hdr.PageSize))
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
	var errs []error
	if c.f != nil {
		errs = append(errs, c.f.Close())
		c.f = nil
	}
	if c.main != nil {
		errs = append(errs, c.main.Close())
		c.main = nil
	}
	return errors.Join(errs...)
}
