// Package protocol is the wire protocol between replicas and the server: the
// message types, their binary encoding, the framing on a QUIC stream, and the
// encoding of a version's pages (whole, or compressed against the pages the
// replica already has). Both replica/ and server/ import it; docs/PROTOCOL.md
// specifies it for anyone writing another implementation.
//
// Everything here is a pure function on bytes or on an io.Reader/io.Writer,
// so the decoders can be fuzzed and the codec tested without a network.
package protocol

import (
	"errors"
	"fmt"
)

// ALPN is the TLS application protocol both sides must negotiate. A peer that
// speaks something else fails the TLS handshake, before any message.
const ALPN = "sqlrebase/1"

// Version is the protocol version this build speaks, sent in Hello. A server
// that does not speak the client's version answers CodeProtocolVersion.
// Version 2 added the receive limits to Hello and the VersionPart message;
// version 3 added Hello.AppVersion; version 4 changed the version record
// (no pre checksum, one head varint for codec, page size and flags, and
// CodecPatch) and made the frame length prefix a uvarint, cutting a
// one-row update from 63 to 25 bytes on the wire. A server speaks every
// version from MinVersion to Version; it reads a protocol 3 Hello's framing
// only to refuse it in that framing (Reader.Legacy, WriteLegacyMessage).
const Version = 4

// MinVersion is the oldest protocol version a server of this build accepts.
// It is 4: a server encodes each version once, in one record format, for
// its change log and every subscriber, and a version 3 client cannot
// decode a version 4 record, so an older client is refused with
// CodeProtocolVersion (fatal) rather than sent records it would call
// malformed, reconnecting forever.
const MinVersion = 4

// Limits bound what a decoder accepts. A message beyond a limit is an error
// that closes the stream it came on; it is never truncated or partly used.
type Limits struct {
	MaxMessage   int // bytes in one message (type byte and body), after the length prefix
	MaxBatch     int // mutations in one Push
	MaxString    int // bytes in a database name, client id, credential, mutator name or error text
	MaxArgs      int // bytes of one mutation's arguments
	MaxPages     int // pages in one version or snapshot chunk
	MaxVersions  int // versions in one Versions message
	MaxPageBytes int // bytes of decoded pages one message may expand to (guards decompression)
}

// DefaultLimits are the limits both sides use unless configured otherwise.
var DefaultLimits = Limits{
	MaxMessage:   64 << 20,
	MaxBatch:     1000,
	MaxString:    4096,
	MaxArgs:      1 << 20,
	MaxPages:     1 << 16,
	MaxVersions:  4096,
	MaxPageBytes: 256 << 20,
}

// ReceiveLimits are what a client says in Hello it can receive. The server
// plans every frame it sends to them (PlanFrames): no message above
// MaxMessage, no Versions message of more than MaxVersions versions, and a
// version too large for one message in VersionPart messages. A version whose
// pages exceed MaxVersionBytes is not sent at all: the server ends the
// session with CodeVersionTooLarge, fatal, since the same Hello would meet
// the same version again.
type ReceiveLimits struct {
	MaxMessage      uint32 // bytes in one message (type byte and body)
	MaxVersions     uint32 // versions in one Versions message
	MaxVersionBytes uint64 // bytes of one version's pages, decoded (pages × page size)
}

// Floors and defaults of ReceiveLimits. A server refuses a Hello below a
// floor with CodeLimits: an Ack, an Error and a snapshot chunk of one page
// of the largest page size must fit in one message, and a version of a
// whole largest page in what the client holds.
const (
	MinMessage      = 1 << 20
	MinVersions     = 1
	MinVersionBytes = 1 << 20
)

// DefaultReceiveLimits are what a client states unless configured
// otherwise. A zero field of a Hello's limits means its default.
var DefaultReceiveLimits = ReceiveLimits{MaxMessage: 64 << 20, MaxVersions: 4096, MaxVersionBytes: 1 << 30}

// WithDefaults fills zero fields from DefaultReceiveLimits.
func (r ReceiveLimits) WithDefaults() ReceiveLimits {
	d := DefaultReceiveLimits
	if r.MaxMessage == 0 {
		r.MaxMessage = d.MaxMessage
	}
	if r.MaxVersions == 0 {
		r.MaxVersions = d.MaxVersions
	}
	if r.MaxVersionBytes == 0 {
		r.MaxVersionBytes = d.MaxVersionBytes
	}
	return r
}

// Check returns an error wrapping ErrLimits if a limit is below its floor.
func (r ReceiveLimits) Check() error {
	switch {
	case r.MaxMessage < MinMessage:
		return fmt.Errorf("%w: max message %d bytes, at least %d", ErrLimits, r.MaxMessage, MinMessage)
	case r.MaxVersions < MinVersions:
		return fmt.Errorf("%w: max versions per message %d, at least %d", ErrLimits, r.MaxVersions, MinVersions)
	case r.MaxVersionBytes < MinVersionBytes:
		return fmt.Errorf("%w: max version %d bytes, at least %d", ErrLimits, r.MaxVersionBytes, MinVersionBytes)
	}
	return nil
}

// MaxRecord is the largest encoded version (AppendBinary) the client
// reassembles from parts: the pages, plus page-number deltas (at most 5
// bytes for a page of at least 512) and the header.
func (r ReceiveLimits) MaxRecord() uint64 {
	return r.MaxVersionBytes + r.MaxVersionBytes/64 + 4096
}

// Decoding returns the decoder limits a client that stated r reads with:
// base, with the message, version and page bounds r gives.
func (r ReceiveLimits) Decoding(base Limits) Limits {
	const maxInt = int(^uint(0) >> 1)
	vb := int(min(r.MaxVersionBytes, uint64(maxInt)))
	base.MaxMessage = int(r.MaxMessage)
	base.MaxVersions = int(r.MaxVersions)
	base.MaxPageBytes = max(base.MaxPageBytes, vb)
	base.MaxPages = max(base.MaxPages, vb/512)
	return base
}

// Errors of decoding. They wrap the detail with %w, so callers branch with
// errors.Is.
var (
	// ErrMalformed is a message that does not decode: truncated, trailing
	// bytes, an invalid field, a bad compression stream.
	ErrMalformed = errors.New("protocol: malformed message")
	// ErrTooLarge is a message or field beyond Limits.
	ErrTooLarge = errors.New("protocol: message too large")
	// ErrUnknownType is a message type this version does not know.
	ErrUnknownType = errors.New("protocol: unknown message type")
	// ErrLimits is a Hello's receive limits below the floors.
	ErrLimits = errors.New("protocol: receive limits below the floor")
)

// Code is the kind of an Error message, so that a client can tell a refusal
// it must show its user (a wrong credential) from one it recovers from by
// itself (a gap after a lost connection).
type Code uint16

// Error codes. Values are part of the wire format: never renumber.
const (
	CodeInternal          Code = 1  // the server failed; retry later
	CodeProtocolVersion   Code = 2  // the server does not speak the client's protocol version
	CodeUnauthorized      Code = 3  // wrong or revoked credential, revoked user, or the client id belongs to another user
	CodeUnknownDatabase   Code = 4  // no database of that name
	CodeMalformed         Code = 5  // the server could not decode a message
	CodeTooLarge          Code = 6  // a message or batch beyond the server's limits
	CodeGap               Code = 7  // a pushed mutation id skips ahead of the last processed + 1
	CodeTooManyPending    Code = 8  // the client has more unacknowledged mutations in flight than allowed
	CodeSlowClient        Code = 9  // the client fell behind its bounded queue and was cut off
	CodeDiverged          Code = 10 // the replica's state is not one the server ever had
	CodeShuttingDown      Code = 11 // the server is stopping; reconnect later
	CodeUnexpected        Code = 12 // a message that is not valid at this point of the session
	CodeTooManyConns      Code = 13 // too many connections from the client's address
	CodeLimits            Code = 14 // the client's receive limits (Hello) are below what the server can honour
	CodeVersionTooLarge   Code = 15 // a version is larger than the client said it can hold (Hello.MaxVersionBytes)
	CodeBusy              Code = 16 // the server holds as many databases open as it may and none is idle; retry later
	CodeUpgradeRequired   Code = 17 // the client's Hello.AppVersion is below the oldest the server accepts
	CodeCredentialExpired Code = 18 // the session's token expired: fetch a fresh one and reconnect
	CodeCredentialRevoked Code = 19 // the session's credential was revoked, or rotated past its grace, while it was open
	CodeRateLimited       Code = 20 // too many failed credential checks from the client's address; retry later
)

var codeNames = map[Code]string{
	CodeInternal:          "internal error",
	CodeProtocolVersion:   "protocol version mismatch",
	CodeUnauthorized:      "unauthorized",
	CodeUnknownDatabase:   "unknown database",
	CodeMalformed:         "malformed message",
	CodeTooLarge:          "too large",
	CodeGap:               "mutation id gap",
	CodeTooManyPending:    "too many pending mutations",
	CodeSlowClient:        "client too slow",
	CodeDiverged:          "replica diverged",
	CodeShuttingDown:      "server shutting down",
	CodeUnexpected:        "unexpected message",
	CodeTooManyConns:      "too many connections",
	CodeLimits:            "receive limits too small",
	CodeVersionTooLarge:   "version too large for the client",
	CodeBusy:              "server busy",
	CodeUpgradeRequired:   "app upgrade required",
	CodeCredentialExpired: "credential expired",
	CodeCredentialRevoked: "credential revoked",
	CodeRateLimited:       "rate limited",
}

// String names the code.
func (c Code) String() string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return fmt.Sprintf("code %d", uint16(c))
}

// Fatal reports whether a client should stop retrying and surface the error:
// the same hello would be refused again. CodeCredentialExpired,
// CodeCredentialRevoked and CodeRateLimited are not fatal: the client
// reconnects (with a fresh token, if it has a token source), and a
// credential that is now refused for good meets CodeUnauthorized, which is.
func (c Code) Fatal() bool {
	switch c {
	case CodeProtocolVersion, CodeUnauthorized, CodeUnknownDatabase, CodeLimits, CodeVersionTooLarge, CodeUpgradeRequired:
		return true
	}
	return false
}

// RemoteError is an Error message received from the peer, as a Go error.
type RemoteError struct {
	Code    Code
	Message string
}

func (e *RemoteError) Error() string {
	if e.Message == "" {
		return "sqlrebase server: " + e.Code.String()
	}
	return fmt.Sprintf("sqlrebase server: %s: %s", e.Code, e.Message)
}
