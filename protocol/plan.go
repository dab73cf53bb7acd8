package protocol

import (
	"encoding/binary"
	"fmt"
)

// Item is one thing due to a client, in order: an encoded version (Rec, as
// AppendBinary wrote it, encoded once and shared by every subscriber) or a
// message sent as it is (an Ack, a closing Error).
type Item struct {
	Version uint64
	Rec     []byte
	Msg     Message
}

// Frame is one message of a plan: a Versions message of whole records, one
// part of a record too large for a message, or a message as it is.
type Frame struct {
	Recs [][]byte
	Part *VersionPart
	Msg  Message
}

// Append appends the frame, length-prefixed.
func (f *Frame) Append(b []byte) []byte {
	switch {
	case f.Part != nil:
		return AppendFrame(b, f.Part)
	case f.Msg != nil:
		return AppendFrame(b, f.Msg)
	default:
		return AppendVersionsFrame(b, f.Recs...)
	}
}

// partOverhead bounds a VersionPart's bytes besides its chunk: the type
// byte and four varints.
const partOverhead = 1 + 4*binary.MaxVarintLen64

// minPlanMessage is the smallest MaxMessage PlanFrames plans to; below it,
// it plans to this (real limits are above MinMessage: Check).
const minPlanMessage = 256

// PlanFrames cuts items into frames within l, keeping their order:
// consecutive records share Versions messages up to l.MaxMessage bytes and
// l.MaxVersions records; a record that does not fit in a message alone goes
// in VersionParts of at most l.MaxMessage bytes each; a message item is a
// frame of its own (the caller keeps those below MinMessage). Records are
// referenced, not copied. It is pure: the server's sender feeds it what is
// due and writes what it returns.
func PlanFrames(items []Item, l ReceiveLimits) []Frame {
	maxMsg := max(uint64(l.MaxMessage), minPlanMessage)
	maxVers := max(int(l.MaxVersions), 1)
	var frames []Frame
	var run [][]byte
	var runBytes uint64 // type byte and records
	flush := func() {
		if len(run) > 0 {
			frames = append(frames, Frame{Recs: run})
			run, runBytes = nil, 0
		}
	}
	for _, it := range items {
		if it.Msg != nil {
			flush()
			frames = append(frames, Frame{Msg: it.Msg})
			continue
		}
		n := uint64(len(it.Rec))
		if 1+uvarintLen(1)+n > maxMsg {
			// Alone it does not fit: parts.
			flush()
			chunk := maxMsg - partOverhead
			for off := uint64(0); off < n; off += chunk {
				end := min(off+chunk, n)
				frames = append(frames, Frame{Part: &VersionPart{Version: it.Version, Offset: off, Total: n, Chunk: it.Rec[off:end:end]}})
			}
			continue
		}
		if len(run) > 0 && (len(run)+1 > maxVers || 1+uvarintLen(uint64(len(run)+1))+runBytes+n > maxMsg) {
			flush()
		}
		run = append(run, it.Rec)
		runBytes += n
	}
	flush()
	return frames
}

func uvarintLen(v uint64) uint64 {
	var b [binary.MaxVarintLen64]byte
	return uint64(binary.PutUvarint(b[:], v))
}

// Reassembler puts a version's parts back together. It is a small state
// machine with no I/O: a client feeds it every VersionPart and gets the
// whole record back after the last one.
type Reassembler struct {
	max     uint64 // largest record accepted
	active  bool
	version uint64
	total   uint64
	buf     []byte
}

// NewReassembler returns a Reassembler that refuses records above max
// bytes (ReceiveLimits.MaxRecord).
func NewReassembler(max uint64) *Reassembler { return &Reassembler{max: max} }

// Pending reports whether a version has begun and not ended: until it
// ends, any other message is out of place. A nil Reassembler has none.
func (a *Reassembler) Pending() bool { return a != nil && a.active }

// Add takes the next part. It returns the whole record once the last part
// is in (the Reassembler is then ready for the next version). Parts out of
// order, of another version mid-way, or of a record above the limit are
// errors wrapping ErrMalformed or ErrTooLarge; the buffer grows with the
// parts that arrived, never with what a Total claims.
func (a *Reassembler) Add(p *VersionPart) ([]byte, error) {
	if !a.active {
		if p.Offset != 0 {
			return nil, fmt.Errorf("%w: first part of version %d at offset %d", ErrMalformed, p.Version, p.Offset)
		}
		if p.Total > a.max {
			return nil, fmt.Errorf("%w: version %d of %d encoded bytes, limit %d", ErrTooLarge, p.Version, p.Total, a.max)
		}
		a.active, a.version, a.total, a.buf = true, p.Version, p.Total, nil
	}
	if p.Version != a.version || p.Total != a.total || p.Offset != uint64(len(a.buf)) {
		err := fmt.Errorf("%w: part of version %d at %d of %d, want version %d at %d of %d",
			ErrMalformed, p.Version, p.Offset, p.Total, a.version, len(a.buf), a.total)
		a.reset()
		return nil, err
	}
	if uint64(len(p.Chunk)) > a.total-uint64(len(a.buf)) {
		a.reset()
		return nil, fmt.Errorf("%w: part of version %d overruns its %d bytes", ErrMalformed, p.Version, a.total)
	}
	a.buf = append(a.buf, p.Chunk...)
	if uint64(len(a.buf)) < a.total {
		return nil, nil
	}
	rec := a.buf
	a.reset()
	return rec, nil
}

func (a *Reassembler) reset() { a.active, a.buf, a.version, a.total = false, nil, 0, 0 }

// RecordHeader is what the header of an encoded version record says,
// read without decoding its pages.
type RecordHeader struct {
	Version      uint64
	PageBytes    uint64 // pages × page size: what the pages decode to
	PostChecksum uint64 // the database's checksum at Version
}

// ReadRecordHeader reads the header of an encoded record (AppendBinary),
// whatever its size: what a server compares with a client's
// MaxVersionBytes, and the checksum a catch-up from Version starts from.
func ReadRecordHeader(rec []byte) (RecordHeader, error) {
	d := &decoder{b: rec}
	var h RecordHeader
	var v EncodedVersion
	h.Version = d.uvarint()
	head := d.uvarint()
	v.decodeHead(d, head)
	d.uvarint() // db size
	if head&headBase != 0 {
		d.uvarint() // base db size
	}
	h.PostChecksum = d.fixed64()
	n := d.uvarint()
	if d.err != nil {
		return RecordHeader{}, fmt.Errorf("version record header: %w", d.err)
	}
	if n > 1<<32 {
		return RecordHeader{}, fmt.Errorf("version record header: %w: %d pages", ErrMalformed, n)
	}
	h.PageBytes = n * uint64(v.PageSize)
	return h, nil
}
