package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/vfs"
	"github.com/sqlrebase/sqlrebase/wal"
)

// Tests of the sync loop's handling of what the server sends, without a
// network: versions encoded as the server encodes them, decoded in one
// batch against the replica's pages, and malformed sequences refused
// without harm.

// encodeChain encodes the page sets as the server does: each a delta
// against the images of the version before, starting from the replica's
// pages.
func encodeChain(t *testing.T, r *Replica, sets []*wal.PageSet) []protocol.EncodedVersion {
	t.Helper()
	images := map[uint32][]byte{}
	r.writeMu.Lock()
	dbSize := r.files.Pages()
	for p := uint32(1); p <= dbSize; p++ {
		b, err := r.files.ReadPage(p)
		if err != nil {
			r.writeMu.Unlock()
			t.Fatal(err)
		}
		images[p] = b
	}
	r.writeMu.Unlock()
	var out []protocol.EncodedVersion
	for _, ps := range sets {
		ev, err := protocol.EncodeVersion(ps, dbSize, func(pgno uint32) []byte { return images[pgno] })
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
		for _, p := range ps.Pages {
			images[p.Pgno] = p.Data
		}
		dbSize = ps.DBSize
	}
	return out
}

// TestDecodeBatchAgainstEarlierVersions: several delta-encoded versions,
// each touching pages the one before changed, decode in one batch (the base
// of each is the batch's newer image, not the main file's) and rebase to
// the server's checksum.
func TestDecodeBatchAgainstEarlierVersions(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	// A client of the authority changes the same rows again and again,
	// and grows the database, so later versions depend on earlier ones.
	src := openReplica(t, filepath.Join(t.TempDir(), "src.db"), reg)
	catchUp(t, a, src)
	start := r.Status().Version
	for i := range 12 {
		mustMutate(t, src, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", int64(i)))
		if i%3 == 0 {
			mustMutate(t, src, "exec", execArgs(fmt.Sprintf("INSERT INTO Categories(name, count) VALUES('%s', 1)", strings.Repeat(fmt.Sprint(i), 900))))
		}
		push(t, a, src)
		catchUp(t, a, src)
	}
	sets, err := a.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	evs := encodeChain(t, r, sets)
	dict := 0
	for _, ev := range evs {
		if ev.NeedsBase() {
			dict++
		}
	}
	if dict == 0 {
		t.Fatal("no version was delta-encoded: the test does not test the batch base")
	}
	// Pending work survives, replayed on top.
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Rent", 3))
	if err := r.rebaseRemote(context.Background(), evs); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.Version != a.Version() || st.Checksum != a.Checksum() {
		t.Fatalf("after the batch: %+v, server at %d %016x", st, a.Version(), a.Checksum())
	}
	if got := categories(t, r.DB()); got["Rent"] != 3 || got["Food"] != 66 {
		t.Fatalf("rows: %v", got)
	}
}

// TestDecodeRefusals: a batch that does not follow the replica's version,
// or a delta against another database size, is refused and changes nothing.
func TestDecodeRefusals(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	catchUp(t, a, r)
	src := openReplica(t, filepath.Join(t.TempDir(), "src.db"), reg)
	catchUp(t, a, src)
	start := r.Status().Version
	for i := range 3 {
		mustMutate(t, src, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", int64(i+1)))
		push(t, a, src)
		catchUp(t, a, src)
	}
	sets, err := a.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	evs := encodeChain(t, r, sets)
	mustMutate(t, r, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Rent", 1))
	before := r.Status()
	wrongBase := append([]protocol.EncodedVersion(nil), evs...)
	for i := range wrongBase {
		if wrongBase[i].NeedsBase() {
			wrongBase[i].BaseDBSize++
		}
	}
	lying := append([]protocol.EncodedVersion(nil), evs...)
	lying[len(lying)-1].PostChecksum ^= 1
	for name, batch := range map[string][]protocol.EncodedVersion{
		"gap":          evs[1:],
		"repeat":       append(append([]protocol.EncodedVersion(nil), evs...), evs[len(evs)-1]),
		"wrong base":   wrongBase,
		"lying":        lying,
		"out of order": {evs[1], evs[0]},
	} {
		err := r.rebaseRemote(context.Background(), batch)
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		t.Logf("%s: %v", name, err)
		if st := r.Status(); st != before {
			t.Fatalf("%s: status %+v, before %+v", name, st, before)
		}
		if got := categories(t, r.DB())["Rent"]; got != 1 {
			t.Fatalf("%s: pending mutation lost: Rent = %d", name, got)
		}
	}
	// A flipped payload byte of the last version either does not decode,
	// decodes to the same pages (zstd has slack), or is caught by the
	// checksum: never applied. (In an earlier version of the batch it may
	// be harmless: a later version can overwrite the page it spoilt.)
	good, err := r.decodeVersions(evs)
	if err != nil {
		t.Fatal(err)
	}
	last := len(evs) - 1
	for i := range evs[last].Payload {
		c := append([]protocol.EncodedVersion(nil), evs...)
		c[last].Payload = append([]byte(nil), c[last].Payload...)
		c[last].Payload[i] ^= 0xff
		sets, err := r.decodeVersions(c)
		if err != nil || samePages(sets[last], good[last]) {
			continue
		}
		if err := r.rebaseRemote(context.Background(), c); err == nil {
			t.Fatalf("payload with byte %d flipped was applied", i)
		}
		if st := r.Status(); st != before {
			t.Fatalf("flip %d: status %+v, before %+v", i, st, before)
		}
	}
	if err := r.rebaseRemote(context.Background(), evs); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.Checksum != a.Checksum() {
		t.Fatalf("after the good batch: %+v", st)
	}
}

func samePages(a, b *wal.PageSet) bool {
	if len(a.Pages) != len(b.Pages) {
		return false
	}
	for i := range a.Pages {
		if a.Pages[i].Pgno != b.Pages[i].Pgno || !bytes.Equal(a.Pages[i].Data, b.Pages[i].Data) {
			return false
		}
	}
	return true
}

// TestSnapshotChunks: chunks assemble into one snapshot page set; chunks out
// of order, of another image, or unannounced end the session with an error
// (never a panic), and a snapshot followed by delta versions decodes the
// deltas against the snapshot's pages.
func TestSnapshotChunks(t *testing.T) {
	reg := testRegistry(t)
	a := newAuthority(t, reg)
	src := openReplica(t, filepath.Join(t.TempDir(), "src.db"), reg)
	catchUp(t, a, src)
	for i := range 5 {
		mustMutate(t, src, "exec", execArgs(fmt.Sprintf("INSERT INTO Categories(name, count) VALUES('%s', 1)", strings.Repeat(fmt.Sprint(i), 1500))))
	}
	push(t, a, src)
	snap, err := a.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	chunks := func(per int) []*protocol.SnapshotChunk {
		var out []*protocol.SnapshotChunk
		for first := 0; first < len(snap.Pages); first += per {
			var raw []byte
			for _, p := range snap.Pages[first:min(first+per, len(snap.Pages))] {
				raw = append(raw, p.Data...)
			}
			c, err := protocol.EncodeSnapshotChunk(snap.Version, snap.PageSize, snap.DBSize, snap.PostChecksum, uint32(first+1), raw)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, c)
		}
		return out
	}
	cs := chunks(2)
	if len(cs) < 3 {
		t.Fatalf("only %d chunks", len(cs))
	}
	r := openReplica(t, filepath.Join(t.TempDir(), "r.db"), reg)
	var progress []uint32
	r.net = &netState{changed: make(chan struct{}), remote: Remote{OnSnapshotProgress: func(done, total uint32) { progress = append(progress, done) }}}
	defer func() { r.net = nil }()
	// Refusals.
	bad := map[string][]protocol.Message{
		"unannounced":  nil,
		"out of order": {cs[1]},
		"skips":        {cs[0], cs[2]},
		"other image": {cs[0], func() *protocol.SnapshotChunk {
			c := *cs[1]
			c.Checksum++
			return &c
		}()},
		"versions inside": {cs[0], &protocol.Versions{}},
	}
	for name, msgs := range bad {
		ss := &session{r: r, snapshot: name != "unannounced"}
		if name == "unannounced" {
			msgs = []protocol.Message{cs[0]}
		}
		var err error
		for _, m := range msgs {
			if err = ss.handle(m); err != nil {
				break
			}
		}
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		t.Logf("%s: %v", name, err)
	}
	// The good sequence, then the versions after the snapshot.
	progress = nil
	ss := &session{r: r, snapshot: true}
	for _, c := range cs {
		if ss.ready != nil {
			t.Fatal("snapshot ready before its last chunk")
		}
		if err := ss.handle(c); err != nil {
			t.Fatal(err)
		}
	}
	if ss.ready == nil || ss.snapshot {
		t.Fatal("snapshot not complete after its last chunk")
	}
	if len(progress) != len(cs) || progress[len(progress)-1] != snap.DBSize {
		t.Fatalf("progress %v of %d", progress, snap.DBSize)
	}
	// Versions after the snapshot, deltas against the snapshot's images.
	start := a.Version()
	catchUp(t, a, src)
	mustMutate(t, src, mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs("Food", 4))
	push(t, a, src)
	sets, err := a.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	images := map[uint32][]byte{}
	for _, p := range snap.Pages {
		images[p.Pgno] = p.Data
	}
	var evs []protocol.EncodedVersion
	dbSize := snap.DBSize
	for _, ps := range sets {
		ev, err := protocol.EncodeVersion(ps, dbSize, func(pgno uint32) []byte { return images[pgno] })
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, ev)
		for _, p := range ps.Pages {
			images[p.Pgno] = p.Data
		}
		dbSize = ps.DBSize
	}
	ss.versions = evs
	if err := ss.rebase(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.Version != a.Version() || st.Checksum != a.Checksum() {
		t.Fatalf("after snapshot and versions: %+v, server %d %016x", st, a.Version(), a.Checksum())
	}
	if _, err := os.Stat(r.path + "-snapshot"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the snapshot file outlived its install: %v", err)
	}
	// The same snapshot again is older than the replica now: refused.
	ss = &session{r: r, snapshot: true}
	for _, c := range cs {
		if err := ss.handle(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := ss.rebase(context.Background()); !errors.Is(err, vfs.ErrVersion) {
		t.Fatalf("an older snapshot: %v, want ErrVersion", err)
	}
}

// TestOldServerRefusal: a server of protocol 3 or older answers our Hello
// in its own framing (a uint32 length prefix), with "too large", since it
// reads the uvarint length as a huge uint32. The replica reads that as
// the fatal CodeProtocolVersion, not as a retryable error.
func TestOldServerRefusal(t *testing.T) {
	var old bytes.Buffer
	if err := protocol.WriteLegacyMessage(&old, &protocol.Error{Code: protocol.CodeTooLarge, Message: "message of 1006632961 bytes, limit 67108864"}); err != nil {
		t.Fatal(err)
	}
	in := &inbox{msgs: make(chan protocol.Message, 4), errc: make(chan error, 1)}
	readLoop(context.Background(), &old, in, protocol.DefaultLimits)
	select {
	case m := <-in.msgs:
		e, ok := m.(*protocol.Error)
		if !ok || e.Code != protocol.CodeProtocolVersion || !e.Code.Fatal() || !strings.Contains(e.Message, "protocol 3 or older") {
			t.Fatalf("got %#v", m)
		}
	default:
		t.Fatal("no message from the old server's answer")
	}
}
