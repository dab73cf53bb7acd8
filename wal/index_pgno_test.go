package wal

import "testing"

// TestIndexPgnoOffset pins the page array's layout at the region
// boundaries, as wal.c's walFramePage and walHashGet lay it out: region 0
// holds frames 1..4062 after the 136-byte header, every later region 4096
// frames from its start. (vfs's View test checks it against SQLite's own
// -shm, across a boundary.)
func TestIndexPgnoOffset(t *testing.T) {
	for _, c := range []struct {
		frame uint32
		off   int64
		first uint32
	}{
		{1, 136, 1},
		{2, 140, 1},
		{4062, 136 + 4*4061, 1},
		{4063, 32768, 4063},
		{4064, 32772, 4063},
		{8158, 32768 + 4*4095, 4063},
		{8159, 65536, 8159},
		{8159 + 4096, 3 * 32768, 8159 + 4096},
	} {
		off, first := IndexPgnoOffset(c.frame)
		if off != c.off || first != c.first {
			t.Errorf("IndexPgnoOffset(%d) = %d, %d; want %d, %d", c.frame, off, first, c.off, c.first)
		}
	}
	if got := FrameOffset(4096, 1); got != 32+24 {
		t.Errorf("FrameOffset(4096, 1) = %d, want 56", got)
	}
	if got := FrameOffset(512, 3); got != 32+2*(24+512)+24 {
		t.Errorf("FrameOffset(512, 3) = %d", got)
	}
}
