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
const Version = 1

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
)

// Code is the kind of an Error message, so that a client can tell a refusal
// it must show its user (a wrong credential) from one it recovers from by
// itself (a gap after a lost connection).
type Code uint16

// Error codes. Values are part of the wire format: never renumber.
const (
	CodeInternal        Code = 1  // the server failed; retry later
	CodeProtocolVersion Code = 2  // the server does not speak the client's protocol version
	CodeUnauthorized    Code = 3  // wrong credential, or the client id belongs to another credential
	CodeUnknownDatabase Code = 4  // no database of that name
	CodeMalformed       Code = 5  // the server could not decode a message
	CodeTooLarge        Code = 6  // a message or batch beyond the server's limits
	CodeGap             Code = 7  // a pushed mutation id skips ahead of the last processed + 1
	CodeTooManyPending  Code = 8  // the client has more unacknowledged mutations in flight than allowed
	CodeSlowClient      Code = 9  // the client fell behind its bounded queue and was cut off
	CodeDiverged        Code = 10 // the replica's state is not one the server ever had
	CodeShuttingDown    Code = 11 // the server is stopping; reconnect later
	CodeUnexpected      Code = 12 // a message that is not valid at this point of the session
	CodeTooManyConns    Code = 13 // too many connections from the client's address
)

var codeNames = map[Code]string{
	CodeInternal:        "internal error",
	CodeProtocolVersion: "protocol version mismatch",
	CodeUnauthorized:    "unauthorized",
	CodeUnknownDatabase: "unknown database",
	CodeMalformed:       "malformed message",
	CodeTooLarge:        "too large",
	CodeGap:             "mutation id gap",
	CodeTooManyPending:  "too many pending mutations",
	CodeSlowClient:      "client too slow",
	CodeDiverged:        "replica diverged",
	CodeShuttingDown:    "server shutting down",
	CodeUnexpected:      "unexpected message",
	CodeTooManyConns:    "too many connections",
}

// String names the code.
func (c Code) String() string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return fmt.Sprintf("code %d", uint16(c))
}

// Fatal reports whether a client should stop retrying and surface the error:
// the same hello would be refused again.
func (c Code) Fatal() bool {
	switch c {
	case CodeProtocolVersion, CodeUnauthorized, CodeUnknownDatabase:
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
