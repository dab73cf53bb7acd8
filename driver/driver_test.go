package driver_test

import (
	"context"
	"database/sql"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/driver"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

func TestMain(m *testing.M) {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		panic(err)
	}
	if err := driver.RegisterMutators(driver.DefaultRegistry, reg); err != nil {
		panic(err)
	}
	m.Run()
}

func TestParseDSN(t *testing.T) {
	fp := "sha256:" + strings.Repeat("ab", 32)
	good := []struct {
		dsn  string
		want func(driver.Config) bool
	}{
		{"app.db", func(c driver.Config) bool { return filepath.IsAbs(c.Path) && c.Server == "" && c.Mutators == "default" }},
		{"file:/tmp/x.db", func(c driver.Config) bool { return c.Path == "/tmp/x.db" }},
		{"file:///tmp/y.db?durability=full", func(c driver.Config) bool { return c.Path == "/tmp/y.db" && c.Durability == replica.Full }},
		{"file:/tmp/a%20b.db", func(c driver.Config) bool { return c.Path == "/tmp/a b.db" }},
		{"file:/tmp/z.db?server=127.0.0.1:7878&db=demo&fingerprint=" + fp, func(c driver.Config) bool {
			return c.Server == "127.0.0.1:7878" && c.Database == "demo" && c.Fingerprint == fp && c.CredentialEnv == driver.DefaultCredentialEnv
		}},
		{"/tmp/z.db?server=h:1&db=d&ca=/etc/ca.pem&servername=sync.example&credential=tok&mutators=todo", func(c driver.Config) bool {
			return c.CAFile == "/etc/ca.pem" && c.ServerName == "sync.example" && c.CredentialSource == "tok" && c.CredentialEnv == "" && c.Mutators == "todo"
		}},
		{"/tmp/l.db?local=app&local_path=/tmp/local.db", func(c driver.Config) bool { return c.LocalName == "app" && c.LocalPath == "/tmp/local.db" }},
	}
	for _, g := range good {
		c, err := driver.ParseDSN(g.dsn)
		if err != nil || !g.want(c) {
			t.Errorf("ParseDSN(%q) = %+v, %v", g.dsn, c, err)
		}
	}
	bad := []struct{ dsn, says string }{
		{"", "needs a file path"},
		{":memory:", "needs a file path"},
		{"file:", "needs a file path"},
		{"x.db?sever=h:1", "unknown parameter sever"},
		{"x.db?durability=full&durability=normal", "given 2 times"},
		{"x.db?durability=sometimes", "want normal or full"},
		{"x.db?db=demo", "db= needs server="},
		{"x.db?server=nohostport&db=d&fingerprint=" + fp, "want HOST:PORT"},
		{"x.db?server=h:1&fingerprint=" + fp, "needs db="},
		{"x.db?server=h:1&db=d", "needs fingerprint= or ca="},
		{"x.db?server=h:1&db=d&ca=c&fingerprint=" + fp, "exclude each other"},
		{"x.db?server=h:1&db=d&fingerprint=" + fp + "&servername=s", "servername= goes with ca="},
		{"x.db?server=h:1&db=d&fingerprint=" + fp + "&credential=a&credential_env=B", "exclude each other"},
		{"x.db?local=app", "go together"},
		{"x.db?mutators=", "empty"},
		{"file://otherhost/x.db", "only local files"},
		{"x.db?%zz", "parameters"},
	}
	for _, b := range bad {
		_, err := driver.ParseDSN(b.dsn)
		if !errors.Is(err, driver.ErrDSN) || !strings.Contains(err.Error(), b.says) {
			t.Errorf("ParseDSN(%q) = %v, want ErrDSN saying %q", b.dsn, err, b.says)
		}
	}
	// A secret pasted into an unknown parameter stays out of the message.
	if _, err := driver.ParseDSN("x.db?token=hunter2"); err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("the error shows the unknown parameter's value: %v", err)
	}
}

func FuzzParseDSN(f *testing.F) {
	for _, s := range []string{"app.db", "file:/tmp/x.db?server=h:1&db=d&fingerprint=sha256:00", "x?local=a&local_path=b", "file://h/x", "?", "x.db?a=b&a=c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, dsn string) {
		c, err := driver.ParseDSN(dsn)
		if err != nil {
			if !errors.Is(err, driver.ErrDSN) {
				t.Fatalf("error %v does not wrap ErrDSN", err)
			}
			return
		}
		if !filepath.IsAbs(c.Path) || c.Mutators == "" || (c.Server != "" && c.Database == "") {
			t.Fatalf("ParseDSN(%q) accepted %+v", dsn, c)
		}
	})
}

// TestSharedReplica: two sql.Opens of one path share one replica, which
// the last Close closes; a second Open with other settings is refused.
func TestSharedReplica(t *testing.T) {
	ctx := context.Background()
	dsn := "file:" + filepath.Join(t.TempDir(), "app.db")
	db1, err := sql.Open(driver.Name, dsn)
	if err != nil {
		t.Fatal(err)
	}
	db2, err := sql.Open(driver.Name, dsn+"?durability=normal") // the same settings, spelled out
	if err != nil {
		t.Fatal(err)
	}
	r, ok := driver.Replica(dsn)
	if !ok {
		t.Fatal("no replica open for the path")
	}
	if _, err := sql.Open(driver.Name, dsn+"?durability=full"); !errors.Is(err, driver.ErrConflict) {
		t.Fatalf("an Open with other settings: %v, want ErrConflict", err)
	}
	var id int64
	if err := db1.QueryRowContext(ctx, `SELECT sqlrebase_mutate(?, ?)`, mutators.CreateCategoryOrIncrementIfExists, `{"name":"Food","delta":2}`).Scan(&id); err != nil || id != 1 {
		t.Fatalf("sqlrebase_mutate = %d, %v", id, err)
	}
	var count int
	if err := db2.QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&count); err != nil || count != 2 {
		t.Fatalf("the other sql.DB reads count %d, %v", count, err)
	}
	if err := db1.Close(); err != nil {
		t.Fatal(err)
	}
	if r2, ok := driver.Replica(dsn); !ok || r2 != r || r.Status().Pending != 1 {
		t.Fatal("closing one of two sql.DBs closed the replica")
	}
	if err := db2.QueryRowContext(ctx, `SELECT count FROM Categories WHERE name = 'Food'`).Scan(&count); err != nil {
		t.Fatalf("the second sql.DB after the first closed: %v", err)
	}
	if err := db2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := driver.Replica(dsn); ok {
		t.Fatal("the replica is still open after the last Close")
	}
	if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("x", 1)); !errors.Is(err, replica.ErrClosed) {
		t.Fatalf("Mutate after the last Close: %v, want ErrClosed", err)
	}
	// Open again: the pending mutation was kept in the queue.
	db3, err := sql.Open(driver.Name, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db3.Close()
	if r3, _ := driver.Replica(dsn); r3 == nil || r3.Status().Pending != 1 {
		t.Fatal("the reopened replica lost its pending mutation")
	}
}

// TestMutateFunctionErrors: an unknown mutator, args that are not JSON and
// arguments of the wrong type fail the statement, clearly, and queue
// nothing; triggers cannot call it.
func TestMutateFunctionErrors(t *testing.T) {
	ctx := context.Background()
	dsn := "file:" + filepath.Join(t.TempDir(), "app.db")
	db, err := sql.Open(driver.Name, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	r, _ := driver.Replica(dsn)
	for _, c := range []struct {
		args []any
		says string
	}{
		{[]any{"noSuchMutator", `{}`}, "unknown mutator"},
		{[]any{mutators.CreateCategoryOrIncrementIfExists, `{"name": `}, "not valid JSON"},
		{[]any{42, `{}`}, "mutator's name as text"},
		{[]any{mutators.CreateCategoryOrIncrementIfExists, 7}, "args as JSON text"},
	} {
		var id int64
		err := db.QueryRowContext(ctx, `SELECT sqlrebase_mutate(?, ?)`, c.args...).Scan(&id)
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("sqlrebase_mutate(%v) = %d, %v; want an error saying %q", c.args, id, err, c.says)
		}
	}
	if n := r.Status().Pending; n != 0 {
		t.Fatalf("%d mutations queued by refused calls", n)
	}
	if _, err := db.ExecContext(ctx, `SELECT sqlrebase_mutate('x')`); err == nil {
		t.Error("a call with one argument succeeded")
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := sql.Open(driver.Name, filepath.Join(dir, "a.db")+"?mutators=nosuch"); !errors.Is(err, driver.ErrUnknownRegistry) {
		t.Errorf("unknown registry: %v", err)
	}
	t.Setenv("SQLREBASE_TEST_NO_SUCH_VAR", "")
	dsn := filepath.Join(dir, "b.db") + "?server=127.0.0.1:1&db=d&fingerprint=sha256:" + strings.Repeat("00", 32) + "&credential_env=SQLREBASE_TEST_NO_SUCH_VAR"
	if _, err := sql.Open(driver.Name, dsn); !errors.Is(err, driver.ErrNoCredential) || !strings.Contains(err.Error(), "SQLREBASE_TEST_NO_SUCH_VAR") {
		t.Errorf("no credential: %v", err)
	}
	if _, err := sql.Open(driver.Name, filepath.Join(dir, "c.db")+"?server=127.0.0.1:1&db=d&fingerprint=sha256:"+strings.Repeat("00", 32)+"&credential=nosuch"); !errors.Is(err, driver.ErrNoCredential) {
		t.Errorf("no credential source: %v", err)
	}
	if _, err := sql.Open(driver.Name, "x.db?bogus=1"); !errors.Is(err, driver.ErrDSN) {
		t.Errorf("bad DSN: %v", err)
	}
}
