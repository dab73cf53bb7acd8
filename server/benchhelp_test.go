package server

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

func benchServer(b *testing.B) (*Server, string) {
	b.Helper()
	ctx := context.Background()
	reg := mutators.NewRegistry()
	mutators.RegisterDemo(reg)
	srv, err := Open(ctx, Config{Dir: b.TempDir(), Mutators: reg, Setup: demoSetup, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	if err := srv.AddDatabase(ctx, "demo", "s3cret"); err != nil {
		b.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	return srv, addr
}

func dialB(b *testing.B, addr, fp string) *quic.Conn {
	b.Helper()
	tlsConf, _ := protocol.ClientTLS(fp, "", "")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, addr, tlsConf, protocol.QUICConfig())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.CloseWithError(0, "") })
	return conn
}

func openClientB(b *testing.B, conn *quic.Conn, id string) *client {
	b.Helper()
	stream, err := conn.OpenStreamSync(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	c := &client{stream: stream, r: protocol.NewReader(stream, protocol.DefaultLimits), im: newImage()}
	if err := protocol.WriteMessage(stream, &protocol.Hello{Protocol: protocol.Version, Database: "demo", ClientID: id, Credential: "s3cret", Checksum: c.im.sums.Sum()}); err != nil {
		b.Fatal(err)
	}
	m, err := c.r.Read()
	if err != nil {
		b.Fatal(err)
	}
	if _, ok := m.(*protocol.Welcome); !ok {
		b.Fatalf("got %T", m)
	}
	return c
}
