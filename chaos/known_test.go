package chaos

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// knownServerOpenVague: server.Open on a full disk failed with "PRAGMA
// journal_mode=WAL: sqlite3: disk I/O error", not "no space left on
// device" (found by TestChaos restarting the server while its disk was
// full). Fixed: the open's error is classified as a batch's is.
const knownServerOpenVague = false

// TestServerOpenOnFullDiskSaysSo: a server whose disk is full may fail to
// open, but must say why: "no space left on device".
func TestServerOpenOnFullDiskSaysSo(t *testing.T) {
	disk, err := smallDisk(t, "8m")
	if err != nil {
		t.Skipf("needs a small tmpfs: %v", err)
	}
	ctx := context.Background()
	dir := filepath.Join(disk, "server")
	cfg := server.Config{Dir: dir, Mutators: registry(t), Logger: quietLogger(),
		Setup: func(ctx context.Context, tx mutators.Tx) error {
			_, err := tx.Exec(mutators.DemoSchema)
			return err
		}}
	srv, err := server.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddDatabase(ctx, dbName, secret); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := fill(filepath.Join(disk, "filler")); err == nil {
		t.Fatal("the disk did not fill")
	}
	srv, err = server.Open(ctx, cfg)
	if err == nil {
		srv.Close()
		t.Skip("the server opened on a full disk: nothing to say")
	}
	if !strings.Contains(err.Error(), "no space left on device") {
		if knownServerOpenVague {
			t.Skipf("known: server.Open on a full disk does not say so: %v", err)
		}
		t.Fatalf("server.Open on a full disk: %v, want it to say \"no space left on device\"", err)
	}
	os.Remove(filepath.Join(disk, "filler"))
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
