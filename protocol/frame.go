package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// FrameHeaderSize is the length prefix before every message: the message's
// size in bytes (type byte and body), big-endian uint32.
const FrameHeaderSize = 4

// AppendFrame appends m, length-prefixed, to b. Appending several messages
// and writing them at once costs one packet where several writes would
// cost one each (quic-go's cost is per write).
func AppendFrame(b []byte, m Message) []byte {
	start := len(b)
	b = append(b, 0, 0, 0, 0, byte(m.Type()))
	b = m.appendBody(b)
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-FrameHeaderSize))
	return b
}

// WriteMessage writes one length-prefixed message.
func WriteMessage(w io.Writer, m Message) error {
	if _, err := w.Write(AppendFrame(nil, m)); err != nil {
		return fmt.Errorf("write %T: %w", m, err)
	}
	return nil
}

// Reader reads length-prefixed messages from a stream.
type Reader struct {
	r      io.Reader
	limits Limits
	hdr    [FrameHeaderSize]byte
}

// NewReader returns a Reader that refuses messages beyond limits.
func NewReader(r io.Reader, limits Limits) *Reader {
	return &Reader{r: r, limits: limits}
}

// Read reads the next message. At a clean end of stream between messages
// it returns io.EOF; a stream that ends inside a message is ErrMalformed. A
// length beyond MaxMessage is ErrTooLarge and is not read: the stream is
// then unusable, and the caller closes it.
func (r *Reader) Read() (Message, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: stream ended inside a length prefix", ErrMalformed)
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(r.hdr[:])
	if n == 0 {
		return nil, fmt.Errorf("%w: empty message", ErrMalformed)
	}
	if uint64(n) > uint64(r.limits.MaxMessage) {
		return nil, fmt.Errorf("%w: message of %d bytes, limit %d", ErrTooLarge, n, r.limits.MaxMessage)
	}
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
