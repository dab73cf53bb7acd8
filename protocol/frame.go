package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MaxFrameHeaderSize is the longest length prefix before a message: the
// message's size in bytes (type byte and body) as a uvarint (since protocol
// 4; protocol 3 sent a big-endian uint32). A one-row update's message is
// under 128 bytes, so its prefix is one byte where it was four.
const MaxFrameHeaderSize = binary.MaxVarintLen32

// legacyHeaderSize is protocol 3's length prefix, a big-endian uint32. Its
// first byte is 0 for any message under 16 MiB (every Hello and Error),
// and a uvarint prefix never starts with 0 (a length of 0 is malformed), so
// a Reader tells the two apart on the first byte of a stream.
const legacyHeaderSize = 4

// AppendFrame appends m, length-prefixed, to b. Appending several messages
// and writing them at once costs one packet where several writes would
// cost one each (quic-go's cost is per write).
func AppendFrame(b []byte, m Message) []byte {
	start := len(b)
	b = append(b, make([]byte, MaxFrameHeaderSize)...)
	b = append(b, byte(m.Type()))
	b = m.appendBody(b)
	// The size is known only now: write its uvarint at start and move
	// the message up against it.
	n := len(b) - start - MaxFrameHeaderSize
	k := binary.PutUvarint(b[start:], uint64(n))
	copy(b[start+k:], b[start+MaxFrameHeaderSize:])
	return b[:start+k+n]
}

// WriteMessage writes one length-prefixed message.
func WriteMessage(w io.Writer, m Message) error {
	if _, err := w.Write(AppendFrame(nil, m)); err != nil {
		return fmt.Errorf("write %T: %w", m, err)
	}
	return nil
}

// WriteLegacyMessage writes one message in protocol 3's framing (a
// big-endian uint32 length prefix): what a server answers a peer whose
// Hello came in that framing (Reader.Legacy), so that an old client reads
// its CodeProtocolVersion refusal instead of a frame it cannot parse.
func WriteLegacyMessage(w io.Writer, m Message) error {
	body := Encode(m)
	b := binary.BigEndian.AppendUint32(make([]byte, 0, legacyHeaderSize+len(body)), uint32(len(body)))
	if _, err := w.Write(append(b, body...)); err != nil {
		return fmt.Errorf("write %T: %w", m, err)
	}
	return nil
}

// Reader reads length-prefixed messages from a stream.
type Reader struct {
	r      io.Reader
	limits Limits
	one    [1]byte
	read   int  // messages read
	legacy bool // the first message came in protocol 3's framing
}

// NewReader returns a Reader that refuses messages beyond limits.
func NewReader(r io.Reader, limits Limits) *Reader {
	return &Reader{r: r, limits: limits}
}

// Legacy reports whether the first message came in protocol 3's framing
// (then the only one read): the peer speaks protocol 3 or older, and
// reads only WriteLegacyMessage's framing.
func (r *Reader) Legacy() bool { return r.legacy }

// Read reads the next message. At a clean end of stream between messages
// it returns io.EOF; a stream that ends inside a message is ErrMalformed. A
// length beyond MaxMessage is ErrTooLarge and is not read: the stream is
// then unusable, and the caller closes it. The first message may come in
// protocol 3's framing (Legacy); after it, nothing more is read.
func (r *Reader) Read() (Message, error) {
	if r.legacy {
		return nil, fmt.Errorf("%w: the peer speaks protocol 3's framing", ErrMalformed)
	}
	n, err := r.length()
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: empty message", ErrMalformed)
	}
	if n > uint64(r.limits.MaxMessage) {
		return nil, fmt.Errorf("%w: message of %d bytes, limit %d", ErrTooLarge, n, r.limits.MaxMessage)
	}
	r.read++
	// A fresh buffer per message: decoded messages alias it.
	buf := make([]byte, n)
	if _, err := io.ReadFull(r.r, buf); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: stream ended inside a message of %d bytes", ErrMalformed, n)
		}
		return nil, err
	}
	return Decode(buf, r.limits)
}

// length reads a message's length prefix: a uvarint, one byte at a time
// (nothing past the prefix is read, so the Reader owns no buffer), or, for
// the first message only, protocol 3's uint32.
func (r *Reader) length() (uint64, error) {
	var n uint64
	for i := 0; ; i++ {
		if _, err := io.ReadFull(r.r, r.one[:]); err != nil {
			if i > 0 && errors.Is(err, io.EOF) {
				return 0, fmt.Errorf("%w: stream ended inside a length prefix", ErrMalformed)
			}
			return 0, err
		}
		c := r.one[0]
		if i == 0 && c == 0 && r.read == 0 {
			return r.legacyLength()
		}
		if i == MaxFrameHeaderSize-1 && c > 0x0f {
			return 0, fmt.Errorf("%w: length prefix overflows 32 bits", ErrMalformed)
		}
		n |= uint64(c&0x7f) << (7 * i)
		if c < 0x80 {
			if i > 0 && c == 0 {
				return 0, fmt.Errorf("%w: length prefix not minimal", ErrMalformed)
			}
			return n, nil
		}
	}
}

// legacyLength reads the rest of protocol 3's uint32 length prefix, whose
// first byte (0) was read.
func (r *Reader) legacyLength() (uint64, error) {
	var rest [legacyHeaderSize - 1]byte
	if _, err := io.ReadFull(r.r, rest[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, fmt.Errorf("%w: stream ended inside a length prefix", ErrMalformed)
		}
		return 0, err
	}
	r.legacy = true
	return uint64(rest[0])<<16 | uint64(rest[1])<<8 | uint64(rest[2]), nil
}
