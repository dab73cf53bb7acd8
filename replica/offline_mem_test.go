package replica

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// TestOfflineMemory makes many mutations offline (no server) and reports
// the replica's live heap and its WAL and queue sizes: the README's numbers.
// SQLREBASE_OFFLINE_N sets how many (200,000 for the README; the default
// keeps the run short). The heap must stay within a budget per mutation.
func TestOfflineMemory(t *testing.T) {
	n := 20000
	if testing.Short() {
		n = 2000
	}
	if s := os.Getenv("SQLREBASE_OFFLINE_N"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		n = v
	}
	reg := testRegistry(t)
	path := filepath.Join(t.TempDir(), "r.db")
	r := openReplica(t, path, reg)
	ctx := context.Background()
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	names := []string{"Food", "Rent", "Fun", "Travel", "Books"}
	for i := range n {
		if _, err := r.Mutate(ctx, mutators.CreateCategoryOrIncrementIfExists, incr(names[i%len(names)], i%7+1)); err != nil {
			t.Fatal(err)
		}
	}
	after := heap()
	size := func(p string) int64 {
		fi, err := os.Stat(p)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	perMut := float64(after-before) / float64(n)
	t.Logf("%d offline mutations: heap +%.1f MB (%.0f B/mutation), WAL %.1f MB (%.0f B/mutation), queue %.1f MB",
		n, float64(after-before)/1e6, perMut, float64(size(path+"-wal"))/1e6, float64(size(path+"-wal"))/float64(n), float64(size(path+"-pending"))/1e6)
	if perMut > 200 { // 311 B before handles were held weakly and args left in the file
		t.Fatalf("%.0f B of heap per offline mutation", perMut)
	}
}
