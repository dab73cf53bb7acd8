package server

import (
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// TestMinAppVersion: with Config.MinAppVersion, an older app build (or a
// protocol 2 client, which states none) is refused with the fatal
// CodeUpgradeRequired; the minimum and newer builds are welcomed.
func TestMinAppVersion(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.MinAppVersion = 5 })
	conn := dial(t, addr, srv.Fingerprint())
	for _, h := range []protocol.Hello{
		{Database: "demo", ClientID: "old", Credential: "s3cret", AppVersion: 4},
		{Protocol: 2, Database: "demo", ClientID: "v2", Credential: "s3cret"},
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

// TestProtocol2Admitted: a server of this build still admits a protocol 2
// client when it sets no minimum app version.
func TestProtocol2Admitted(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	conn := dial(t, addr, srv.Fingerprint())
	_, m := openClient(t, conn, protocol.Hello{Protocol: 2, Database: "demo", ClientID: "v2", Credential: "s3cret"})
	welcome(t, m)
}
