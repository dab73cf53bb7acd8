package server

import (
	"context"
	"encoding/binary"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// TestMinAppVersion: with Config.MinAppVersion, an older app build (or a
// client that states none) is refused with the fatal CodeUpgradeRequired;
// the minimum and newer builds are welcomed.
func TestMinAppVersion(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.MinAppVersion = 5 })
	conn := dial(t, addr, srv.Fingerprint())
	for _, h := range []protocol.Hello{
		{Database: "demo", ClientID: "old", Credential: "s3cret", AppVersion: 4},
		{Database: "demo", ClientID: "unstated", Credential: "s3cret"},
	} {
		_, m := openClient(t, conn, h)
		e, ok := m.(*protocol.Error)
		if !ok || e.Code != protocol.CodeUpgradeRequired || !strings.Contains(e.Message, "upgrade") {
			t.Fatalf("app version %d, protocol %d: got %#v", h.AppVersion, h.Protocol, m)
		}
		if !e.Code.Fatal() {
			t.Fatal("upgrade required is not fatal")
		}
	}
	for _, v := range []uint64{5, 6} {
		_, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "new", Credential: "s3cret", AppVersion: v})
		welcome(t, m)
	}
}

// TestOldProtocolRefused: a protocol 2 or 3 client, which cannot decode
// protocol 4's version records, is refused with the fatal
// CodeProtocolVersion naming the versions this server speaks, not sent
// records it would call malformed (and reconnect for, forever).
func TestOldProtocolRefused(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	conn := dial(t, addr, srv.Fingerprint())
	for _, p := range []uint32{2, 3} {
		_, m := openClient(t, conn, protocol.Hello{Protocol: p, Database: "demo", ClientID: "old", Credential: "s3cret"})
		e, ok := m.(*protocol.Error)
		if !ok || e.Code != protocol.CodeProtocolVersion || !e.Code.Fatal() || !strings.Contains(e.Message, "speaks 4 to 4") {
			t.Fatalf("protocol %d: got %#v", p, m)
		}
	}
	// A real protocol 3 client frames its Hello with a uint32 length and
	// reads only that framing: its refusal comes in it.
	stream, err := conn.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := protocol.WriteLegacyMessage(stream, &protocol.Hello{Protocol: 3, Database: "demo", ClientID: "v3", Credential: "s3cret"}); err != nil {
		t.Fatal(err)
	}
	stream.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(stream)
	if err != nil || len(b) < 4 || int(binary.BigEndian.Uint32(b)) != len(b)-4 {
		t.Fatalf("answer to a protocol 3 hello: % x, %v", b, err)
	}
	m, err := protocol.Decode(b[4:], protocol.DefaultLimits)
	if e, ok := m.(*protocol.Error); err != nil || !ok || e.Code != protocol.CodeProtocolVersion || !strings.Contains(e.Message, "client speaks protocol 3") {
		t.Fatalf("answer to a protocol 3 hello: %#v, %v", m, err)
	}
}
