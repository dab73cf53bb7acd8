package server

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// smallDisk mounts a tmpfs of size bytes (root only; skipped otherwise) and
// returns its path.
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// TestDiskFull: a batch that fills the disk fails as a whole with
// ErrDiskFull, saying "no space left on device"; nothing of it is
// committed, the file matches the checksum, and once space returns the
// same mutations go through.
func TestDiskFull(t *testing.T) {
	dir := smallDisk(t, "4m")
	ctx := context.Background()
	a, err := OpenAuthorityWith(ctx, filepath.Join(dir, "server.db"), testRegistry(t), demoSetup, AuthorityOptions{SelfCheck: true})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	push(t, a, upsert("c1", 1, "Food", 1))
	// Leave about 512 KiB free.
	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			break
		}
	}
	f.Close()
	if err := os.Truncate(filler, mustSize(t, filler)-512<<10); err != nil {
		t.Fatal(err)
	}
	big := execMutation("c2", 1, "INSERT INTO Categories(name, count) SELECT 'big', length(zeroblob(1)) FROM (SELECT 1)",
		"CREATE TABLE IF NOT EXISTS blobs(b)", "INSERT INTO blobs VALUES (zeroblob(2097152))")
	version := a.Version()
	_, _, err = a.Push(ctx, []Mutation{upsert("c1", 2, "Food", 1), big})
	if !errors.Is(err, ErrDiskFull) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("push on a full disk: %v, want ErrDiskFull", err)
	}
	if a.Version() != version || count(t, a, "Food") != 1 || lastID(t, a, "c2") != 0 {
		t.Fatalf("a batch that failed on a full disk left something: version %d (was %d), Food %d", a.Version(), version, count(t, a, "Food"))
	}
	if err := a.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	os.Remove(filler)
	_, res := push(t, a, upsert("c1", 2, "Food", 1), big)
	if res[0].Outcome != Applied || res[1].Outcome != Applied {
		t.Fatalf("after space returned: %+v %+v", res[0], res[1])
	}
	if count(t, a, "Food") != 2 || count(t, a, "big") != 1 {
		t.Fatal("the retried batch is not all there")
	}
	if err := a.Verify(ctx); err != nil {
		t.Fatal(err)
	}
}

func mustSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
