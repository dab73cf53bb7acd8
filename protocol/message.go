package protocol

import (
	"encoding/binary"
	"fmt"

	"github.com/sqlrebase/sqlrebase/wal"
)

// Type is a message's type byte. Values are part of the wire format.
type Type byte

// Message types.
const (
	TypeHello    Type = 1
	TypeWelcome  Type = 2
	TypeError    Type = 3
	TypePush     Type = 4
	TypeAck      Type = 5
	TypeVersions Type = 6
	TypeSnapshot Type = 7
	TypePart     Type = 8 // VersionPart, since protocol 2
)

// Message is one protocol message.
type Message interface {
	// Type is the message's type byte.
	Type() Type
	appendBody(b []byte) []byte
	decodeBody(d *decoder, l Limits) error
}

// Hello opens a database session: the first message a client sends on a
// stream.
type Hello struct {
	Protocol   uint32 // protocol version (Version)
	Database   string
	ClientID   string
	Credential string
	Version    uint64        // the version the replica's main file holds (0: empty)
	Checksum   uint64        // the replica's whole-database checksum at Version
	Receive    ReceiveLimits // what the client can receive (zero fields: DefaultReceiveLimits)
	// AppVersion is the app's build number (since protocol 3; 0: not
	// stated). A server with a minimum refuses a lower one with
	// CodeUpgradeRequired.
	AppVersion uint64
}

// Welcome accepts a Hello. The server then sends whatever brings the
// replica to Version: Versions messages, or a snapshot.
type Welcome struct {
	Version        uint64 // the server's current version
	LastMutationID uint64 // the last mutation id of this client the server processed
	PageSize       uint32
	MaxBatch       uint32 // most mutations the server takes in one Push
	MaxInFlight    uint32 // most mutations pushed and not yet acknowledged
	Snapshot       bool   // catch-up comes as a snapshot (the replica is too far behind, or diverged)
}

// Error refuses a Hello or ends a session. The sender closes the stream
// after it.
type Error struct {
	Code    Code
	Message string
}

// Mutation is one pushed mutation. The client id is the session's.
type Mutation struct {
	ID   uint64
	Name string
	Args []byte
}

// Push sends mutations, in id order.
type Push struct {
	Mutations []Mutation
}

// Ack says the server processed this client's mutations up to
// LastMutationID (applied or rejected) and that their outcome is in Version
// or earlier.
type Ack struct {
	LastMutationID uint64
	Version        uint64
}

// Versions carries consecutive versions, oldest first. A server coalesces
// what is due to one client into one message.
type Versions struct {
	Versions []EncodedVersion
}

// SnapshotChunk carries pages First..First+Count-1 of a database image at
// Version. Chunks come in page order; the last one ends at DBSize.
type SnapshotChunk struct {
	Version  uint64
	PageSize uint32
	DBSize   uint32
	Checksum uint64 // the whole image's checksum
	First    uint32
	Count    uint32
	Codec    Codec
	Payload  []byte
}

// VersionPart carries bytes Offset..Offset+len(Chunk)-1 of one version's
// encoded record (what AppendBinary writes, Total bytes in all) that is too
// large for one message. The parts of a version come in order, one after
// the other with no other message between them; the receiver reassembles
// the record and decodes it as one version of a Versions message.
type VersionPart struct {
	Version uint64
	Offset  uint64
	Total   uint64
	Chunk   []byte
}

// Type implements Message.
func (*VersionPart) Type() Type { return TypePart }

func (m *VersionPart) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Version)
	b = binary.AppendUvarint(b, m.Offset)
	b = binary.AppendUvarint(b, m.Total)
	return appendBytes(b, m.Chunk)
}

func (m *VersionPart) decodeBody(d *decoder, l Limits) error {
	m.Version = d.uvarint()
	m.Offset = d.uvarint()
	m.Total = d.uvarint()
	m.Chunk = d.bytes(l.MaxMessage)
	if d.err == nil && (len(m.Chunk) == 0 || m.Offset > m.Total || uint64(len(m.Chunk)) > m.Total-m.Offset) {
		d.fail("version part of %d bytes at %d of %d", len(m.Chunk), m.Offset, m.Total)
	}
	return d.err
}

// Type implements Message.
func (*Hello) Type() Type { return TypeHello }

// Type implements Message.
func (*Welcome) Type() Type { return TypeWelcome }

// Type implements Message.
func (*Error) Type() Type { return TypeError }

// Type implements Message.
func (*Push) Type() Type { return TypePush }

// Type implements Message.
func (*Ack) Type() Type { return TypeAck }

// Type implements Message.
func (*Versions) Type() Type { return TypeVersions }

// Type implements Message.
func (*SnapshotChunk) Type() Type { return TypeSnapshot }

// Err returns the message as a Go error.
func (e *Error) Err() error { return &RemoteError{Code: e.Code, Message: e.Message} }

func (m *Hello) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, uint64(m.Protocol))
	b = appendString(b, m.Database)
	b = appendString(b, m.ClientID)
	b = appendString(b, m.Credential)
	b = binary.AppendUvarint(b, m.Version)
	b = binary.LittleEndian.AppendUint64(b, m.Checksum)
	b = binary.AppendUvarint(b, uint64(m.Receive.MaxMessage))
	b = binary.AppendUvarint(b, uint64(m.Receive.MaxVersions))
	b = binary.AppendUvarint(b, m.Receive.MaxVersionBytes)
	if m.Protocol < 3 {
		return b
	}
	return binary.AppendUvarint(b, m.AppVersion)
}

func (m *Hello) decodeBody(d *decoder, l Limits) error {
	m.Protocol = d.uint32()
	m.Database = d.string(l.MaxString)
	m.ClientID = d.string(l.MaxString)
	m.Credential = d.string(l.MaxString)
	m.Version = d.uvarint()
	m.Checksum = d.fixed64()
	if m.Protocol < 2 && len(d.b) == 0 {
		// A version 1 Hello ends here; the server refuses its protocol.
		return d.err
	}
	m.Receive.MaxMessage = d.uint32()
	m.Receive.MaxVersions = d.uint32()
	m.Receive.MaxVersionBytes = d.uvarint()
	if m.Protocol < 3 {
		return d.err
	}
	m.AppVersion = d.uvarint()
	return d.err
}

func (m *Welcome) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Version)
	b = binary.AppendUvarint(b, m.LastMutationID)
	b = binary.AppendUvarint(b, uint64(m.PageSize))
	b = binary.AppendUvarint(b, uint64(m.MaxBatch))
	b = binary.AppendUvarint(b, uint64(m.MaxInFlight))
	return appendBool(b, m.Snapshot)
}

func (m *Welcome) decodeBody(d *decoder, _ Limits) error {
	m.Version = d.uvarint()
	m.LastMutationID = d.uvarint()
	m.PageSize = d.uint32()
	m.MaxBatch = d.uint32()
	m.MaxInFlight = d.uint32()
	m.Snapshot = d.bool()
	return d.err
}

func (m *Error) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, uint64(m.Code))
	return appendString(b, m.Message)
}

func (m *Error) decodeBody(d *decoder, l Limits) error {
	c := d.uvarint()
	if c > 0xffff {
		d.fail("error code %d", c)
	}
	m.Code = Code(c)
	m.Message = d.string(l.MaxString)
	return d.err
}

func (m *Push) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(m.Mutations)))
	for _, mu := range m.Mutations {
		b = binary.AppendUvarint(b, mu.ID)
		b = appendString(b, mu.Name)
		b = appendBytes(b, mu.Args)
	}
	return b
}

func (m *Push) decodeBody(d *decoder, l Limits) error {
	n := d.count(l.MaxBatch, "mutations in a push")
	m.Mutations = make([]Mutation, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		var mu Mutation
		mu.ID = d.uvarint()
		mu.Name = d.string(l.MaxString)
		mu.Args = d.bytes(l.MaxArgs)
		if d.err == nil && i > 0 && mu.ID <= m.Mutations[i-1].ID {
			d.fail("mutation id %d after %d (must ascend)", mu.ID, m.Mutations[i-1].ID)
		}
		m.Mutations = append(m.Mutations, mu)
	}
	return d.err
}

func (m *Ack) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, m.LastMutationID)
	return binary.AppendUvarint(b, m.Version)
}

func (m *Ack) decodeBody(d *decoder, _ Limits) error {
	m.LastMutationID = d.uvarint()
	m.Version = d.uvarint()
	return d.err
}

func (m *Versions) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(m.Versions)))
	for i := range m.Versions {
		b = m.Versions[i].append(b)
	}
	return b
}

func (m *Versions) decodeBody(d *decoder, l Limits) error {
	n := d.count(l.MaxVersions, "versions in a message")
	m.Versions = make([]EncodedVersion, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		var v EncodedVersion
		v.decode(d, l)
		if d.err == nil && i > 0 && v.Version != m.Versions[i-1].Version+1 {
			d.fail("version %d after %d (must be consecutive)", v.Version, m.Versions[i-1].Version)
		}
		m.Versions = append(m.Versions, v)
	}
	return d.err
}

func (m *SnapshotChunk) appendBody(b []byte) []byte {
	b = binary.AppendUvarint(b, m.Version)
	b = binary.AppendUvarint(b, uint64(m.PageSize))
	b = binary.AppendUvarint(b, uint64(m.DBSize))
	b = binary.LittleEndian.AppendUint64(b, m.Checksum)
	b = binary.AppendUvarint(b, uint64(m.First))
	b = binary.AppendUvarint(b, uint64(m.Count))
	b = append(b, byte(m.Codec))
	return appendBytes(b, m.Payload)
}

func (m *SnapshotChunk) decodeBody(d *decoder, l Limits) error {
	m.Version = d.uvarint()
	m.PageSize = d.uint32()
	m.DBSize = d.uint32()
	m.Checksum = d.fixed64()
	m.First = d.uint32()
	m.Count = d.uint32()
	m.Codec = Codec(d.byte())
	m.Payload = d.bytes(l.MaxMessage)
	if d.err != nil {
		return d.err
	}
	switch {
	case !wal.ValidPageSize(m.PageSize):
		d.fail("snapshot page size %d", m.PageSize)
	case m.First == 0 || m.Count == 0 || uint64(m.First)+uint64(m.Count)-1 > uint64(m.DBSize):
		d.fail("snapshot chunk of pages %d+%d outside 1..%d", m.First, m.Count, m.DBSize)
	case int(m.Count) > l.MaxPages || uint64(m.Count)*uint64(m.PageSize) > uint64(l.MaxPageBytes):
		d.tooLarge("snapshot chunk of %d pages", m.Count)
	case m.Codec != CodecRaw && m.Codec != CodecZstd:
		d.fail("snapshot codec %d", m.Codec)
	}
	return d.err
}

// newMessage returns an empty message of type t.
func newMessage(t Type) (Message, error) {
	switch t {
	case TypeHello:
		return new(Hello), nil
	case TypeWelcome:
		return new(Welcome), nil
	case TypeError:
		return new(Error), nil
	case TypePush:
		return new(Push), nil
	case TypeAck:
		return new(Ack), nil
	case TypeVersions:
		return new(Versions), nil
	case TypeSnapshot:
		return new(SnapshotChunk), nil
	case TypePart:
		return new(VersionPart), nil
	}
	return nil, fmt.Errorf("%w: %d", ErrUnknownType, t)
}

// Encode returns the message's bytes without the length prefix: the type
// byte, then the body.
func Encode(m Message) []byte {
	return m.appendBody([]byte{byte(m.Type())})
}

// Decode decodes a message (type byte and body, no length prefix). It never
// panics; every error wraps ErrMalformed, ErrTooLarge or ErrUnknownType.
// Byte slices in the result alias b.
func Decode(b []byte, l Limits) (Message, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty message", ErrMalformed)
	}
	if len(b) > l.MaxMessage {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(b), l.MaxMessage)
	}
	m, err := newMessage(Type(b[0]))
	if err != nil {
		return nil, err
	}
	d := &decoder{b: b[1:]}
	if err := m.decodeBody(d, l); err != nil {
		return nil, fmt.Errorf("decode message type %d: %w", b[0], err)
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("decode message type %d: %w: %d trailing bytes", b[0], ErrMalformed, len(d.b))
	}
	return m, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b, p []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(p)))
	return append(b, p...)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// decoder reads fields off a byte slice, remembering the first error so
// that a message decoder reads straight through and checks once.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
	}
	d.b = nil
}

func (d *decoder) tooLarge(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrTooLarge}, args...)...)
	}
	d.b = nil
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uint32() uint32 {
	v := d.uvarint()
	if v > 1<<32-1 {
		d.fail("value %d overflows 32 bits", v)
		return 0
	}
	return uint32(v)
}

func (d *decoder) fixed64() uint64 {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 8 {
		d.fail("truncated")
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 1 {
		d.fail("truncated")
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) bool() bool {
	switch v := d.byte(); v {
	case 0:
		return false
	case 1:
		return true
	default:
		d.fail("bool %d", v)
		return false
	}
}

// count reads a count of items and checks it against a limit and against
// the bytes left (each item takes at least one byte), so that a forged
// count cannot make the decoder allocate.
func (d *decoder) count(limit int, what string) int {
	n := d.uvarint()
	if d.err != nil {
		return 0
	}
	if n > uint64(limit) {
		d.tooLarge("%d %s, limit %d", n, what, limit)
		return 0
	}
	if n > uint64(len(d.b)) {
		d.fail("%d %s in %d bytes", n, what, len(d.b))
		return 0
	}
	return int(n)
}

func (d *decoder) bytes(limit int) []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(limit) {
		d.tooLarge("field of %d bytes, limit %d", n, limit)
		return nil
	}
	if n > uint64(len(d.b)) {
		d.fail("field of %d bytes, %d left", n, len(d.b))
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) string(limit int) string { return string(d.bytes(limit)) }
