package cluster

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

var _ server.VersionLog = (*Owner)(nil)

// demoServer is serverAt on a fresh data directory.
func demoServer(t *testing.T, vl server.VersionLog) *server.Server {
	t.Helper()
	return serverAt(t, t.TempDir(), vl)
}

func inc(client string, id uint64) []server.Mutation {
	return []server.Mutation{{ClientID: client, ID: id, Name: mutators.CreateCategoryOrIncrementIfExists, Args: mutators.CategoryArgs("Food", 1)}}
}

// TestOwnerIsTheServersVersionLog runs a real server whose versions go to
// a real JetStream through the Owner: each is in the stream, as the change
// log has it, before the push returns; the node holds the lease; and once
// another writer takes the subject, the next version is fenced and the
// database stops.
func TestOwnerIsTheServersVersionLog(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwner(l, ls, nil, "n1", quiet)
	defer o.Close(ctx)
	srv := demoServer(t, o)
	a := srv.Authority("demo.db") // opens it: version 1, the schema, goes to the stream
	if a == nil {
		t.Fatal("the database did not open")
	}
	for id := uint64(1); id <= 3; id++ {
		if _, _, err := a.Push(ctx, inc("alice", id)); err != nil {
			t.Fatal(err)
		}
	}
	es, err := l.Read(ctx, "demo.db", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 4 {
		t.Fatalf("the stream holds %d versions, want 4", len(es))
	}
	for i, e := range es {
		v := uint64(i + 1)
		wire, err := srv.EncodedVersion("demo.db", v)
		if err != nil {
			t.Fatal(err)
		}
		if e.Version != v || e.Owner != o.Token() || len(e.Rec) < 8 || !bytes.Equal(e.Rec[8:], wire) {
			t.Fatalf("entry %d: version %d by %q, %d bytes; want version %d by %q, the change log's record", i, e.Version, e.Owner, len(e.Rec), v, o.Token())
		}
	}
	if who, _, err := ls.Holder(ctx, "demo.db"); err != nil || who != o.Token() || !o.Owns("demo.db") {
		t.Fatalf("lease holder %q (%v), owns %v; want %q", who, err, o.Owns("demo.db"), o.Token())
	}
	// The lease outlives its TTL while the owner renews it.
	time.Sleep(2 * time.Second)
	if _, _, err := a.Push(ctx, inc("alice", 4)); err != nil {
		t.Fatalf("push after two lease TTLs: %v", err)
	}
	// Another writer believes it owns the database and appends first.
	rival, err := l.NewAppender(ctx, "demo.db", "rival")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rival.Append(ctx, 6, []byte("rival")); err != nil {
		t.Fatal(err)
	}
	_, _, err = a.Push(ctx, inc("alice", 5))
	if !errors.Is(err, ErrFenced) {
		t.Fatalf("push after the rival's append: %v, want ErrFenced", err)
	}
	if _, _, err := a.Push(ctx, inc("alice", 6)); err == nil {
		t.Fatal("the fenced database took another push")
	}
	if o.Owns("demo.db") {
		t.Fatal("the fenced owner still claims the database")
	}
	if who, _, _ := ls.Holder(ctx, "demo.db"); who != "" {
		t.Fatalf("the fenced owner kept its lease (holder %q)", who)
	}
	last, err := l.Last(ctx, "demo.db")
	if err != nil || last.Owner != "rival" || last.Version != 6 {
		t.Fatalf("the stream's tail %+v, %v: the fenced version must not be in it", last, err)
	}
}

// TestOwnerRefusesADatabaseLeasedElsewhere: a node cannot open for writing
// a database another node owns: it follows it instead, and refuses the
// administrative calls that write (server.ErrNotOwner).
func TestOwnerRefusesADatabaseLeasedElsewhere(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Acquire(ctx, "demo.db", "n2-elsewhere"); err != nil {
		t.Fatal(err)
	}
	o := NewOwner(l, ls, nil, "n1", quiet)
	defer o.Close(ctx)
	srv := demoServer(t, o)
	err = srv.WithAuthority(ctx, "demo.db", func(*server.Authority) error { return nil })
	if !errors.Is(err, server.ErrNotOwner) {
		t.Fatalf("open of a database leased elsewhere: %v, want server.ErrNotOwner", err)
	}
	if es, _ := l.Read(ctx, "demo.db", 0, 10); len(es) != 0 {
		t.Fatalf("the stream got %d versions from a node without the lease", len(es))
	}
}

// TestOwnerCloseReleasesItsLeases: after Close another node acquires at
// once, without waiting for the TTL.
func TestOwnerCloseReleasesItsLeases(t *testing.T) {
	_, nc, js := single(t)
	ctx := bounded(t, 30*time.Second)
	l, err := OpenLog(ctx, nc, js, LogConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := OpenLeases(ctx, js, LeaseConfig{TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwner(l, ls, nil, "n1", quiet)
	if err := o.Append(ctx, "db", 1, make([]byte, 8)); err != nil {
		t.Fatal(err)
	}
	if err := o.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Acquire(ctx, "db", "n2"); err != nil {
		t.Fatalf("acquire after the owner closed: %v", err)
	}
	if err := o.Append(ctx, "db", 2, make([]byte, 8)); err == nil {
		t.Fatal("a closed owner appended")
	}
}
