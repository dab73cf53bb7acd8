package vfs

import (
	"context"
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/ncruces/go-sqlite3/driver"
)

// TestForwardsEveryFileInterface reads go-sqlite3's vfs package source and
// checks that the replica's main-file wrapper (and the fault hook's file
// wrapper) has every method of every optional File interface defined
// there, so that a go-sqlite3 bump that adds one fails here instead of
// being silently dropped.
func TestForwardsEveryFileInterface(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/ncruces/go-sqlite3").Output()
	if err != nil {
		t.Skipf("go list: %v", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "vfs")
	names, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	found := 0
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		{
			for _, decl := range file.Decls {
				gd, ok := decl.(*ast.GenDecl)
				if !ok {
					continue
				}
				for _, spec := range gd.Specs {
					ts, ok := spec.(*ast.TypeSpec)
					if !ok {
						continue
					}
					it, ok := ts.Type.(*ast.InterfaceType)
					if !ok || !embedsFile(it) {
						continue
					}
					found++
					for _, m := range it.Methods.List {
						for _, n := range m.Names {
							if !n.IsExported() {
								continue // unexported: nothing outside go-sqlite3 can implement it
							}
							for _, w := range []any{(*mainFile)(nil), (*faultFile)(nil)} {
								if _, ok := reflect.TypeOf(w).MethodByName(n.Name); !ok {
									t.Errorf("%T lacks %s.%s", w, ts.Name.Name, n.Name)
								}
							}
						}
					}
				}
			}
		}
	}
	if found < 15 {
		t.Fatalf("found only %d optional File interfaces in %s", found, dir)
	}
}

func embedsFile(it *ast.InterfaceType) bool {
	for _, m := range it.Methods.List {
		if id, ok := m.Type.(*ast.Ident); ok && len(m.Names) == 0 && id.Name == "File" {
			return true
		}
	}
	return false
}

// TestMmapOnReplica: PRAGMA mmap_size takes effect on a replica (it did
// nothing while the wrapper dropped FileMemoryMapper).
func TestMmapOnReplica(t *testing.T) {
	path := filepath.Join(t.TempDir(), "replica.db")
	r, err := OpenReplica(path, Normal)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	db, err := driver.Open("file:"+path+"?vfs="+Name, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	ctx := context.Background()
	var got int64
	if err := db.QueryRowContext(ctx, "PRAGMA mmap_size=1048576").Scan(&got); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRowContext(ctx, "PRAGMA mmap_size").Scan(&got); err != nil {
		t.Fatal(err)
	}
	if got != 1<<20 {
		t.Fatalf("mmap_size is %d on a replica, want %d", got, 1<<20)
	}
	if _, err := db.ExecContext(ctx, "CREATE TABLE t(x); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM t").Scan(&got); err != nil || got != 1 {
		t.Fatalf("read through mmap: %d, %v", got, err)
	}
}
