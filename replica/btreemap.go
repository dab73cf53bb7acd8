package replica

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
)

// btreeMap maps the pages of a database file to the table whose b-tree
// (or one of whose indexes' b-trees) they belong to, so that a server
// version's changed pages say which tables it changed. It knows the
// interior pages of every tree and the leaves they point to; it never reads
// a leaf. Overflow and freelist pages are unknown to it.
//
// It is a pure piece: it reads pages through a pageReader and is updated
// incrementally, by re-walking only the trees a version touched.
type btreeMap struct {
	roots map[uint32]string   // root page -> table (lower case)
	trees map[uint32][]uint32 // root page -> every page of its tree it knows
	owner map[uint32]uint32   // page -> root page of its tree
}

// pageReader reads page pgno (1-based) of the database file.
type pageReader func(pgno uint32) ([]byte, error)

// maxTreePages bounds one walk, so that a corrupt file that makes a cycle
// or a huge fan-out ends with an error rather than running away.
const maxTreePages = 1 << 24

// newBtreeMap walks every tree: roots maps each b-tree's root page to its
// table (an index's table for an index). pages is the file's size in pages.
func newBtreeMap(roots map[uint32]string, pages uint32, read pageReader) (*btreeMap, error) {
	m := &btreeMap{roots: map[uint32]string{}, trees: map[uint32][]uint32{}, owner: map[uint32]uint32{}}
	for root, table := range roots {
		m.roots[root] = strings.ToLower(table)
		if err := m.walk(root, pages, read); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// walk (re)reads the tree rooted at root and records its pages.
func (m *btreeMap) walk(root, pages uint32, read pageReader) error {
	for _, p := range m.trees[root] {
		if m.owner[p] == root {
			delete(m.owner, p)
		}
	}
	seen := map[uint32]bool{}
	var list []uint32
	todo := []uint32{root}
	for len(todo) > 0 {
		pg := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if pg == 0 || pg > pages || seen[pg] {
			return fmt.Errorf("b-tree %d: bad or repeated child page %d", root, pg)
		}
		if len(seen) >= maxTreePages {
			return fmt.Errorf("b-tree %d: more than %d pages", root, maxTreePages)
		}
		seen[pg] = true
		list = append(list, pg)
		data, err := read(pg)
		if err != nil {
			return fmt.Errorf("b-tree %d: read page %d: %w", root, pg, err)
		}
		kids, err := interiorChildren(data, pg == 1)
		if err != nil {
			return fmt.Errorf("b-tree %d: page %d: %w", root, pg, err)
		}
		todo = append(todo, kids...)
	}
	m.trees[root] = list
	for _, p := range list {
		m.owner[p] = root
	}
	return nil
}

// interiorChildren returns the child pages of an interior b-tree page
// (none for a leaf). first is page 1, whose b-tree header follows the
// 100-byte file header. It never panics on garbage.
func interiorChildren(data []byte, first bool) ([]uint32, error) {
	off := 0
	if first {
		off = 100
	}
	if len(data) < off+12 {
		return nil, fmt.Errorf("page too short")
	}
	switch data[off] {
	case 10, 13: // index / table leaf
		return nil, nil
	case 2, 5: // index / table interior
	default:
		return nil, fmt.Errorf("not a b-tree page (type %d)", data[off])
	}
	n := int(binary.BigEndian.Uint16(data[off+3:]))
	ptrs := off + 12
	if ptrs+2*n > len(data) {
		return nil, fmt.Errorf("%d cells do not fit", n)
	}
	kids := make([]uint32, 0, n+1)
	for i := 0; i < n; i++ {
		c := int(binary.BigEndian.Uint16(data[ptrs+2*i:]))
		if c+4 > len(data) {
			return nil, fmt.Errorf("cell %d out of the page", i)
		}
		kids = append(kids, binary.BigEndian.Uint32(data[c:]))
	}
	return append(kids, binary.BigEndian.Uint32(data[off+8:])), nil
}

// tablesOf says which tables the changed pages belong to, and which trees
// to re-walk. all is the conservative answer: a page the map does not know
// changed and no known page of a tree did (the change cannot be placed).
// Page 1 is only the file header here: a schema change moves the cookie,
// which the caller checks first.
func (m *btreeMap) tablesOf(changed []uint32) (tables []string, touched []uint32, all bool) {
	set, roots := map[string]bool{}, map[uint32]bool{}
	unknown := false
	for _, p := range changed {
		if p == 1 {
			continue
		}
		root, ok := m.owner[p]
		if !ok {
			unknown = true
			continue
		}
		roots[root] = true
		set[m.roots[root]] = true
	}
	if unknown && len(roots) == 0 {
		return nil, nil, true
	}
	for t := range set {
		tables = append(tables, t)
	}
	for r := range roots {
		touched = append(touched, r)
	}
	sort.Strings(tables)
	sort.Slice(touched, func(i, j int) bool { return touched[i] < touched[j] })
	return tables, touched, false
}
