package server

import (
	"testing"

	"github.com/sqlrebase/sqlrebase/protocol"
)

func TestDueAcks(t *testing.T) {
	s1, s2 := &session{}, &session{}
	held := func() []heldAck {
		return []heldAck{
			{s: s1, ack: protocol.Ack{LastMutationID: 1, Version: 5}},
			{s: s2, ack: protocol.Ack{LastMutationID: 9, Version: 6}},
			{s: s1, ack: protocol.Ack{LastMutationID: 2, Version: 6}},
			{s: s2, ack: protocol.Ack{LastMutationID: 10, Version: 8}},
		}
	}
	for _, c := range []struct {
		v          uint64
		due, kept  int
		firstKept  uint64 // the version of the first ack still held
		lastDueMid uint64 // the last due ack's mutation id
	}{
		{v: 4, due: 0, kept: 4, firstKept: 5},
		{v: 5, due: 1, kept: 3, firstKept: 6, lastDueMid: 1},
		{v: 6, due: 3, kept: 1, firstKept: 8, lastDueMid: 2},
		{v: 7, due: 3, kept: 1, firstKept: 8, lastDueMid: 2},
		{v: 8, due: 4, kept: 0, lastDueMid: 10},
	} {
		due, kept := dueAcks(held(), c.v)
		if len(due) != c.due || len(kept) != c.kept {
			t.Errorf("v %d: %d due, %d kept; want %d, %d", c.v, len(due), len(kept), c.due, c.kept)
			continue
		}
		if c.kept > 0 && kept[0].ack.Version != c.firstKept {
			t.Errorf("v %d: first kept at version %d, want %d", c.v, kept[0].ack.Version, c.firstKept)
		}
		if c.due > 0 && due[len(due)-1].ack.LastMutationID != c.lastDueMid {
			t.Errorf("v %d: last due acks %d, want %d (held order kept)", c.v, due[len(due)-1].ack.LastMutationID, c.lastDueMid)
		}
		for _, h := range due {
			if h.ack.Version > c.v {
				t.Errorf("v %d: ack of version %d due", c.v, h.ack.Version)
			}
		}
	}
}
