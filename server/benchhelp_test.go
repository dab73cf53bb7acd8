package server

import (
	"testing"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// benchClient opens a welcomed session of client id on conn, to database
// "demo" of a testServer.
func benchClient(b *testing.B, conn *quic.Conn, id string) *client {
	b.Helper()
	c, m := openClient(b, conn, protocol.Hello{Database: "demo", ClientID: id, Credential: "s3cret"})
	welcome(b, m)
	return c
}
