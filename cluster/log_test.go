package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestSubjectMapsDotsOneToOne(t *testing.T) {
	if got := Subject("a.b"); got != "sqlrebase.v.a=b" {
		t.Fatalf("Subject(a.b) = %q", got)
	}
	if Subject("a.b") == Subject("a_b") || Subject("a.b") == Subject("a-b") {
		t.Fatal("two names share a subject")
	}
}

func TestLogAppendReadSingleNode(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	a, err := l.NewAppender(ctx, "app.one", "owner-1")
	if err != nil {
		t.Fatal(err)
	}
	other, err := l.NewAppender(ctx, "other", "owner-1")
	if err != nil {
		t.Fatal(err)
	}
	// Versions of two databases interleave in the shared stream; each
	// subject's fence only sees its own.
	for v := uint64(5); v < 10; v++ {
		if _, err := a.Append(ctx, v, fmt.Appendf(nil, "rec %d", v)); err != nil {
			t.Fatalf("append %d: %v", v, err)
		}
		if _, err := other.Append(ctx, v-4, []byte("x")); err != nil {
			t.Fatalf("append other %d: %v", v-4, err)
		}
	}
	if _, err := a.Append(ctx, 11, nil); !errors.Is(err, ErrVersionOrder) {
		t.Fatalf("append 11 after 9: %v, want ErrVersionOrder", err)
	}
	if a.Err() != nil {
		t.Fatalf("an out-of-order call stopped the appender: %v", a.Err())
	}
	es, err := l.Read(ctx, "app.one", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 5 {
		t.Fatalf("read %d entries, want 5", len(es))
	}
	for i, e := range es {
		v := uint64(5 + i)
		if e.Version != v || !bytes.Equal(e.Rec, fmt.Appendf(nil, "rec %d", v)) || e.Owner != "owner-1" {
			t.Fatalf("entry %d = %+v", i, e)
		}
		if i > 0 && e.Seq <= es[i-1].Seq {
			t.Fatalf("sequences not increasing: %d then %d", es[i-1].Seq, e.Seq)
		}
	}
	// Read from the middle, bounded by max.
	mid, err := l.Read(ctx, "app.one", es[2].Seq, 2)
	if err != nil || len(mid) != 2 || mid[0].Version != 7 || mid[1].Version != 8 {
		t.Fatalf("read from seq %d: %+v, %v", es[2].Seq, mid, err)
	}
	// A new appender (a restarted owner) continues from the tail.
	b, err := l.NewAppender(ctx, "app.one", "owner-2")
	if err != nil {
		t.Fatal(err)
	}
	if seq, v := b.Last(); seq != es[4].Seq || v != 9 {
		t.Fatalf("new appender's tail = %d, %d; want %d, 9", seq, v, es[4].Seq)
	}
	if _, err := b.Append(ctx, 10, []byte("rec 10")); err != nil {
		t.Fatal(err)
	}
}

// TestFencing is two owners of one database against one real JetStream:
// both believe they own it, and only one's appends succeed. The other is
// refused with ErrFenced, and stops.
func TestFencing(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	old, err := l.NewAppender(ctx, "db", "old-owner")
	if err != nil {
		t.Fatal(err)
	}
	for v := uint64(1); v <= 3; v++ {
		if _, err := old.Append(ctx, v, []byte("old")); err != nil {
			t.Fatal(err)
		}
	}
	// The new owner takes over (its lease: see the lease tests) and
	// appends first; the old one has not noticed.
	cur, err := l.NewAppender(ctx, "db", "new-owner")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cur.Append(ctx, 4, []byte("new")); err != nil {
		t.Fatal(err)
	}
	_, err = old.Append(ctx, 4, []byte("old"))
	if !errors.Is(err, ErrFenced) {
		t.Fatalf("deposed owner's append: %v, want ErrFenced", err)
	}
	// It stays stopped, even for a version that would follow.
	if _, err := old.Append(ctx, 5, []byte("old")); !errors.Is(err, ErrFenced) {
		t.Fatalf("deposed owner's next append: %v, want ErrFenced", err)
	}
	if _, err := cur.Append(ctx, 5, []byte("new")); err != nil {
		t.Fatalf("owner's append after the fence: %v", err)
	}
	es, err := l.Read(ctx, "db", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 5 || es[3].Owner != "new-owner" || es[4].Owner != "new-owner" {
		t.Fatalf("log = %+v", es)
	}
}

// TestFencingRace has two owners append the same versions at once, many
// times: at each version exactly one wins, and the loser stops.
func TestFencingRace(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 60*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	for round := range 20 {
		db := fmt.Sprintf("race%d", round)
		var as [2]*Appender
		for i := range as {
			if as[i], err = l.NewAppender(ctx, db, fmt.Sprintf("owner-%d", i)); err != nil {
				t.Fatal(err)
			}
		}
		errs := make(chan error, 2)
		for i := range as {
			go func() {
				var err error
				for v := uint64(1); v <= 5 && err == nil; v++ {
					_, err = as[i].Append(ctx, v, []byte{byte(i)})
				}
				errs <- err
			}()
		}
		e1, e2 := <-errs, <-errs
		if (e1 == nil) == (e2 == nil) {
			t.Fatalf("round %d: errors %v and %v: want exactly one owner to win", round, e1, e2)
		}
		if lose := errors.Join(e1, e2); !errors.Is(lose, ErrFenced) {
			t.Fatalf("round %d: loser's error %v, want ErrFenced", round, lose)
		}
		es, err := l.Read(ctx, db, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		// Versions 1..5 once each, all by the winner: the loser's first
		// refused append stopped it.
		if len(es) != 5 || es[0].Owner != es[4].Owner || es[1].Owner != es[4].Owner {
			t.Fatalf("round %d: log = %+v", round, es)
		}
		for i, e := range es {
			if e.Version != uint64(i+1) {
				t.Fatalf("round %d: entry %d is version %d", round, i, e.Version)
			}
		}
	}
}

// TestFencingThreeNodes runs the fence on an R3 stream of a 3-node
// cluster: two owners on different nodes, one of whom was deposed.
func TestFencingThreeNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	nodes := trio(t)
	ctx := bounded(t, 60*time.Second)
	nc1, js1 := connect(t, nodes[0])
	nc2, js2 := connect(t, nodes[1])
	l1, err := OpenLog(ctx, nc1, js1, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	l2, err := OpenLog(ctx, nc2, js2, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	old, err := l1.NewAppender(ctx, "db", "on-n1")
	if err != nil {
		t.Fatal(err)
	}
	for v := uint64(1); v <= 50; v++ {
		if _, err := old.Append(ctx, v, []byte("n1")); err != nil {
			t.Fatalf("append %d on R3: %v", v, err)
		}
	}
	cur, err := l2.NewAppender(ctx, "db", "on-n2")
	if err != nil {
		t.Fatal(err)
	}
	if _, v := cur.Last(); v != 50 {
		t.Fatalf("the new owner on n2 sees version %d, want 50", v)
	}
	if _, err := cur.Append(ctx, 51, []byte("n2")); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Append(ctx, 51, []byte("n1")); !errors.Is(err, ErrFenced) {
		t.Fatalf("deposed owner on n1: %v, want ErrFenced", err)
	}
	// Every node reads the same log.
	l3nc, l3js := connect(t, nodes[2])
	l3, err := OpenLog(ctx, l3nc, l3js, LogConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	es, err := l3.Read(ctx, "db", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 51 || es[50].Owner != "on-n2" || es[49].Owner != "on-n1" {
		t.Fatalf("n3 reads %d entries, last %+v", len(es), es[len(es)-1])
	}
}
