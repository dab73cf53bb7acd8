package replica

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// sqliteCLI runs the stock sqlite3 shell on path and returns its rows.
func sqliteCLI(t *testing.T, path, sql string) [][]string {
	t.Helper()
	out, err := exec.Command("sqlite3", path, sql).CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3: %v: %s", err, out)
	}
	var rows [][]string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line != "" {
			rows = append(rows, strings.Split(line, "|"))
		}
	}
	return rows
}

func fileReader(t *testing.T, path string) (pageReader, uint32) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const size = 4096
	return func(pgno uint32) ([]byte, error) {
		return data[int(pgno-1)*size : int(pgno)*size], nil
	}, uint32(len(data) / size)
}

func rootsOf(t *testing.T, path string) map[uint32]string {
	roots := map[uint32]string{1: "sqlite_schema"}
	for _, row := range sqliteCLI(t, path, "SELECT tbl_name, rootpage FROM sqlite_schema WHERE rootpage > 0") {
		n, _ := strconv.Atoi(row[1])
		roots[uint32(n)] = row[0]
	}
	return roots
}

// checkAgainstDbstat compares the map with SQLite's own page census: every
// b-tree page (not overflow) belongs to the right table, and no other page
// is known.
func checkAgainstDbstat(t *testing.T, m *btreeMap, path string) {
	t.Helper()
	table := map[string]string{"sqlite_schema": "sqlite_schema"}
	for _, row := range sqliteCLI(t, path, "SELECT name, tbl_name FROM sqlite_schema") {
		table[row[0]] = strings.ToLower(row[1])
	}
	want := 0
	for _, row := range sqliteCLI(t, path, "SELECT name, pageno, pagetype FROM dbstat") {
		if row[2] == "overflow" {
			continue
		}
		want++
		p, _ := strconv.Atoi(row[1])
		root, ok := m.owner[uint32(p)]
		if !ok {
			t.Fatalf("page %d of %s unknown to the map", p, row[0])
		}
		if got := m.roots[root]; got != table[row[0]] {
			t.Fatalf("page %d: map says %s, dbstat %s", p, got, row[0])
		}
	}
	if len(m.owner) != want {
		t.Fatalf("map knows %d pages, dbstat %d b-tree pages", len(m.owner), want)
	}
}

func TestBtreeMapMatchesDbstat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.db")
	sqliteCLI(t, path, `PRAGMA page_size=4096;
		CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX tv ON t(v);
		CREATE TABLE u(k TEXT PRIMARY KEY, big BLOB) WITHOUT ROWID;
		CREATE TABLE small(x);
		WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<20000)
		INSERT INTO t SELECT i, hex(randomblob(40)) FROM n;
		WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300)
		INSERT INTO u SELECT 'k'||i, randomblob(3000) FROM n;
		INSERT INTO small VALUES (1)`)
	read, pages := fileReader(t, path)
	m, err := newBtreeMap(rootsOf(t, path), pages, read)
	if err != nil {
		t.Fatal(err)
	}
	checkAgainstDbstat(t, m, path)

	// A change to one table: the pages that differ name only that table,
	// and re-walking the trees they touch gives the full walk's map.
	old, _ := os.ReadFile(path)
	sqliteCLI(t, path, `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<3000)
		INSERT INTO t SELECT 100000+i, hex(randomblob(40)) FROM n`)
	now, _ := os.ReadFile(path)
	var changed []uint32
	for p := uint32(1); int(p)*4096 <= len(now); p++ {
		lo, hi := int(p-1)*4096, int(p)*4096
		if hi > len(old) || string(old[lo:hi]) != string(now[lo:hi]) {
			changed = append(changed, p)
		}
	}
	tables, touched, all := m.tablesOf(changed)
	if all || len(tables) != 1 || tables[0] != "t" {
		t.Fatalf("changed pages %v name %v (all %v)", changed, tables, all)
	}
	read, pages = fileReader(t, path)
	for _, root := range touched {
		if err := m.walk(root, pages, read); err != nil {
			t.Fatal(err)
		}
	}
	checkAgainstDbstat(t, m, path)
}

func TestBtreeMapUnknownPageMeansAll(t *testing.T) {
	m := &btreeMap{roots: map[uint32]string{2: "t"}, trees: map[uint32][]uint32{2: {2}}, owner: map[uint32]uint32{2: 2}}
	if _, _, all := m.tablesOf([]uint32{9}); !all {
		t.Fatal("an unplaceable page must mean every table")
	}
	if ts, _, all := m.tablesOf([]uint32{1, 2, 9}); all || len(ts) != 1 {
		t.Fatalf("a known tree's page places the change: %v %v", ts, all)
	}
	if ts, _, all := m.tablesOf([]uint32{1}); all || len(ts) != 0 {
		t.Fatalf("page 1 alone is the header: %v %v", ts, all)
	}
}

func FuzzBtreeMap(f *testing.F) {
	f.Add(make([]byte, 1024))
	p := make([]byte, 1024)
	p[100], p[512] = 5, 2
	p[103], p[104] = 0, 3
	f.Add(p)
	f.Fuzz(func(t *testing.T, data []byte) {
		const size = 512
		pages := uint32(len(data) / size)
		read := func(pgno uint32) ([]byte, error) { return data[int(pgno-1)*size : int(pgno)*size], nil }
		if pages == 0 {
			return
		}
		m, err := newBtreeMap(map[uint32]string{1: "s", pages: "t"}, pages, read)
		if err == nil {
			m.tablesOf([]uint32{1, 2, pages + 1})
		}
		interiorChildren(data, true)
		interiorChildren(data, false)
	})
}
