package wal

import (
	"fmt"
	"slices"
)

// Merge combines consecutive page sets (each Version = previous+1, same
// PageSize) into one with the same effect as applying them in order, so a
// replica that is several versions behind can catch up in one step. The
// result has Version, PostChecksum and DBSize of the last set, PreChecksum
// and Flags of the first, and for each page up to the final DBSize the newest
// data.
//
// A page that a later set brings back after an earlier set truncated it away
// reads as zeros in the sequential result, so Merge includes it explicitly as
// a zero page; otherwise a replica would keep its stale pre-truncation data.
// Page data aliases the inputs (zero pages share one buffer): do not modify.
// Each input must be valid; Merge does not check checksums.
func Merge(sets ...*PageSet) (*PageSet, error) {
	if len(sets) == 0 {
		return nil, fmt.Errorf("merge: no page sets: %w", ErrInvalid)
	}
	first := sets[0]
	pageSize := first.PageSize
	data := make(map[uint32][]byte)
	var zero []byte
	var size uint32
	for i, s := range sets {
		if err := s.Validate(); err != nil {
			return nil, fmt.Errorf("merge: set %d (version %d): %w", i, s.Version, err)
		}
		if i > 0 {
			if prev := sets[i-1].Version; s.Version != prev+1 {
				return nil, fmt.Errorf("merge: version %d follows %d: %w", s.Version, prev, ErrInvalid)
			}
			if s.PageSize != pageSize {
				return nil, fmt.Errorf("merge: version %d has page size %d, want %d: %w", s.Version, s.PageSize, pageSize, ErrInvalid)
			}
		}
		switch {
		case s.Flags&FlagSnapshot != 0:
			clear(data)
		case i == 0:
			// The size before the first set is unknown; the applier's own
			// Resize handles growth relative to it.
		case s.DBSize < size:
			for pgno := range data {
				if pgno > s.DBSize {
					delete(data, pgno)
				}
			}
		case s.DBSize > size:
			if zero == nil {
				zero = make([]byte, pageSize)
			}
			for i := size; i < s.DBSize; i++ { // i < DBSize cannot wrap
				data[i+1] = zero
			}
		}
		size = s.DBSize
		for _, p := range s.Pages {
			data[p.Pgno] = p.Data
		}
	}
	last := sets[len(sets)-1]
	out := &PageSet{
		Version:      last.Version,
		Flags:        first.Flags,
		PageSize:     pageSize,
		DBSize:       last.DBSize,
		PreChecksum:  first.PreChecksum,
		PostChecksum: last.PostChecksum,
		Pages:        make([]Page, 0, len(data)),
	}
	for pgno, d := range data {
		out.Pages = append(out.Pages, Page{Pgno: pgno, Data: d})
	}
	slices.SortFunc(out.Pages, func(a, b Page) int {
		switch {
		case a.Pgno < b.Pgno:
			return -1
		case a.Pgno > b.Pgno:
			return 1
		}
		return 0
	})
	return out, nil
}
