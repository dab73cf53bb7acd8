package driver_test

import (
	"context"
	"database/sql"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/driver"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// TestCredentialSourceEveryConnect: a registered credential source is the
// replica's token source: asked again for the session after a server
// restart, not once at sql.Open.
func TestCredentialSourceEveryConnect(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := server.Config{Dir: filepath.Join(dir, "server"), Mutators: reg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Setup: func(ctx context.Context, tx mutators.Tx) error { _, err := tx.Exec(mutators.DemoSchema); return err }}
	srv, err := server.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Close() }()
	if err := srv.AddDatabase(ctx, "demo", "s3cret"); err != nil {
		t.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	if err := driver.RegisterCredential("counting", func(context.Context) (string, error) {
		calls.Add(1)
		return "s3cret", nil
	}); err != nil {
		t.Fatal(err)
	}
	dsn := "file:" + filepath.Join(dir, "app.db") + "?" + url.Values{
		"server": {addr}, "db": {"demo"}, "fingerprint": {srv.Fingerprint()}, "credential": {"counting"},
	}.Encode()
	db, err := sql.Open(driver.Name, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	r, _ := driver.Replica(dsn)
	mutate := func() {
		t.Helper()
		if _, err := db.ExecContext(ctx, `SELECT sqlrebase_mutate(?, ?)`, mutators.CreateCategoryOrIncrementIfExists, `{"name":"Food","delta":1}`); err != nil {
			t.Fatal(err)
		}
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	mutate()
	first := calls.Load()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if srv, err = server.Open(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Listen(ctx, addr); err != nil {
		t.Fatal(err)
	}
	mutate()
	if calls.Load() <= first {
		t.Fatalf("credential source called %d times, %d before the restart: not again for the new session", calls.Load(), first)
	}
	var n int
	if err := db.QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&n); err != nil || n != 2 {
		t.Fatalf("Food = %d, %v; want 2", n, err)
	}
}
