package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/wal"
)

// testServer starts a server on loopback with database "demo" (secret
// "s3cret") and returns it and its address.
func testServer(t testing.TB, dir string, tune func(*Config)) (*Server, string) {
	t.Helper()
	ctx := context.Background()
	cfg := Config{Dir: dir, Mutators: testRegistry(t), Setup: demoSetup, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if tune != nil {
		tune(&cfg)
	}
	srv, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.AddDatabase(ctx, "demo", "s3cret"); err != nil {
		t.Fatal(err)
	}
	addr, err := srv.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return srv, addr
}

// image is a test client's copy of a database, kept as the protocol says:
// versions decoded against the pages it holds, checksums checked. It is an
// independent, minimal replica.
type image struct {
	version uint64
	pages   [][]byte
	sums    *wal.ChecksumTable
}

func newImage() *image {
	b := wal.EmptyDatabase(wal.DefaultPageSize)
	im := &image{sums: wal.NewChecksumTable(wal.DefaultPageSize)}
	for off := 0; off < len(b); off += wal.DefaultPageSize {
		im.pages = append(im.pages, b[off:off+wal.DefaultPageSize])
	}
	im.sums.Resize(uint32(len(im.pages)))
	for i, p := range im.pages {
		im.sums.Set(uint32(i+1), wal.PageChecksum(uint32(i+1), p))
	}
	return im
}

func (im *image) apply(t testing.TB, ev *protocol.EncodedVersion) {
	t.Helper()
	if ev.NeedsBase() && ev.BaseDBSize != uint32(len(im.pages)) {
		t.Fatalf("version %d: base of %d pages, image has %d", ev.Version, ev.BaseDBSize, len(im.pages))
	}
	ps, err := protocol.DecodeVersion(ev, protocol.DefaultLimits, func(p uint32) ([]byte, error) { return im.pages[p-1], nil })
	if err != nil {
		t.Fatal(err)
	}
	if ps.Version != im.version+1 {
		t.Fatalf("version %d on image at %d", ps.Version, im.version)
	}
	if got := im.sums.Preview(ps); got != ps.PostChecksum {
		t.Fatalf("version %d: pages yield checksum %x, want %x", ps.Version, got, ps.PostChecksum)
	}
	im.sums.Apply(ps)
	for uint32(len(im.pages)) < ps.DBSize {
		im.pages = append(im.pages, make([]byte, ps.PageSize))
	}
	im.pages = im.pages[:ps.DBSize]
	for _, p := range ps.Pages {
		im.pages[p.Pgno-1] = p.Data
	}
	im.version = ps.Version
}

// client is a raw protocol client on one stream.
type client struct {
	t      testing.TB
	conn   *quic.Conn
	stream *quic.Stream
	r      *protocol.Reader
	im     *image
}

func dial(t testing.TB, addr, fingerprint string) *quic.Conn {
	t.Helper()
	tlsConf, err := protocol.ClientTLS(fingerprint, "", "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, addr, tlsConf, protocol.QUICConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.CloseWithError(0, "") })
	return conn
}

func openClient(t testing.TB, conn *quic.Conn, hello protocol.Hello) (*client, protocol.Message) {
	t.Helper()
	stream, err := conn.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c := &client{t: t, conn: conn, stream: stream, r: protocol.NewReader(stream, protocol.DefaultLimits), im: newImage()}
	if hello.Protocol == 0 {
		hello.Protocol = protocol.Version
	}
	if hello.Version == 0 && hello.Checksum == 0 {
		hello.Checksum = c.im.sums.Sum()
	}
	if err := protocol.WriteMessage(stream, &hello); err != nil {
		t.Fatal(err)
	}
	return c, c.read()
}

func (c *client) read() protocol.Message {
	c.t.Helper()
	c.stream.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := c.r.Read()
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

// until reads and applies versions until the image reaches v; it returns
// the acks seen.
func (c *client) until(v uint64) []*protocol.Ack {
	c.t.Helper()
	var acks []*protocol.Ack
	for c.im.version < v {
		switch m := c.read().(type) {
		case *protocol.Versions:
			for i := range m.Versions {
				c.im.apply(c.t, &m.Versions[i])
			}
		case *protocol.Ack:
			acks = append(acks, m)
		case *protocol.Error:
			c.t.Fatalf("error from the server: %v", m.Err())
		default:
			c.t.Fatalf("unexpected %T", m)
		}
	}
	return acks
}

// acked reads and applies versions until the server acknowledges id.
func (c *client) acked(id uint64) *protocol.Ack {
	c.t.Helper()
	for {
		switch m := c.read().(type) {
		case *protocol.Versions:
			for i := range m.Versions {
				c.im.apply(c.t, &m.Versions[i])
			}
		case *protocol.Ack:
			if m.LastMutationID >= id {
				if c.im.version < m.Version {
					c.t.Fatalf("ack of version %d before the version (image at %d)", m.Version, c.im.version)
				}
				return m
			}
		case *protocol.Error:
			c.t.Fatalf("error from the server: %v", m.Err())
		default:
			c.t.Fatalf("unexpected %T", m)
		}
	}
}

func (c *client) push(ids ...uint64) {
	c.t.Helper()
	p := &protocol.Push{}
	for _, id := range ids {
		p.Mutations = append(p.Mutations, protocol.Mutation{ID: id, Name: mutators.CreateCategoryOrIncrementIfExists, Args: mutators.CategoryArgs("Food", 1)})
	}
	if err := protocol.WriteMessage(c.stream, p); err != nil {
		c.t.Fatal(err)
	}
}

func welcome(t testing.TB, m protocol.Message) *protocol.Welcome {
	t.Helper()
	w, ok := m.(*protocol.Welcome)
	if !ok {
		if e, ok := m.(*protocol.Error); ok {
			t.Fatalf("refused: %v", e.Err())
		}
		t.Fatalf("got %T, want Welcome", m)
	}
	return w
}

func sumOf(t *testing.T, a *Authority, name string) int {
	t.Helper()
	var n int
	if err := a.db.QueryRow(`SELECT coalesce(sum(count),0) FROM Categories WHERE name = ?`, name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestSessionPushAndVersions(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "alice", Credential: "s3cret"})
	w := welcome(t, m)
	if w.Snapshot || w.LastMutationID != 0 || w.Version != 1 {
		t.Fatalf("welcome %+v", w)
	}
	c.until(1) // catch-up from the change log: the schema version
	c.push(1, 2, 3)
	acks := c.until(2)
	for len(acks) == 0 {
		if a, ok := c.read().(*protocol.Ack); ok {
			acks = append(acks, a)
		}
	}
	if acks[0].LastMutationID != 3 || acks[0].Version != 2 {
		t.Fatalf("ack %+v", acks[0])
	}
	a := srv.Authority("demo")
	if c.im.sums.Sum() != a.Checksum() {
		t.Fatal("the client's image differs from the server's database")
	}
	// A second stream of the same client on the same connection: pushing
	// 2..4 again applies only 4 (duplicates skipped).
	c2, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "alice", Credential: "s3cret", Version: c.im.version, Checksum: c.im.sums.Sum()})
	c2.im = c.im
	if w := welcome(t, m); w.LastMutationID != 3 || w.Version != 2 {
		t.Fatalf("welcome %+v", w)
	}
	c2.push(2, 3, 4)
	c2.until(3)
	if n := sumOf(t, a, "Food"); n != 4 {
		t.Fatalf("Food count %d, want 4 (duplicates applied?)", n)
	}
	// A gap is refused with a clear error, and nothing changes.
	c2.push(9)
	for {
		m := c2.read()
		if e, ok := m.(*protocol.Error); ok {
			if e.Code != protocol.CodeGap || !strings.Contains(e.Message, "want 5") {
				t.Fatalf("gap: %v", e.Err())
			}
			break
		}
	}
	if n := sumOf(t, a, "Food"); n != 4 || a.Version() != 3 {
		t.Fatalf("after the gap: count %d, version %d", n, a.Version())
	}
}

func TestRefusals(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	ctx := context.Background()
	if err := srv.AddDatabase(ctx, "other", "other-secret"); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, addr, srv.Fingerprint())
	cases := []struct {
		name  string
		hello protocol.Hello
		code  protocol.Code
		says  string
	}{
		{"wrong credential", protocol.Hello{Database: "demo", ClientID: "c", Credential: "nope"}, protocol.CodeUnauthorized, `unauthorized: wrong credential for database "demo"`},
		{"unknown database", protocol.Hello{Database: "nosuch", ClientID: "c", Credential: "s3cret"}, protocol.CodeUnknownDatabase, `"nosuch"`},
		{"receive limits below the floor", protocol.Hello{Database: "demo", ClientID: "c", Credential: "s3cret", Receive: protocol.ReceiveLimits{MaxMessage: 1000}}, protocol.CodeLimits, "max message 1000 bytes"},
		{"protocol version", protocol.Hello{Protocol: 99, Database: "demo", ClientID: "c", Credential: "s3cret"}, protocol.CodeProtocolVersion, "protocol 99"},
		{"credential of another database", protocol.Hello{Database: "demo", ClientID: "c", Credential: "other-secret"}, protocol.CodeUnauthorized, "unauthorized"},
	}
	for _, c := range cases {
		_, m := openClient(t, conn, c.hello)
		e, ok := m.(*protocol.Error)
		if !ok || e.Code != c.code || !strings.Contains(e.Err().Error(), c.says) {
			t.Errorf("%s: got %#v", c.name, m)
		}
	}
	// A client id is bound to the user that first used it (an unnamed
	// secret's user is its credential id).
	if err := srv.AddDatabase(ctx, "demo", "second-secret"); err != nil {
		t.Fatal(err)
	}
	_, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "bob", Credential: "s3cret"})
	welcome(t, m)
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "bob", Credential: "second-secret"})
	if e, ok := m.(*protocol.Error); !ok || e.Code != protocol.CodeUnauthorized || !strings.Contains(e.Message, "client id bob belongs to another user") {
		t.Fatalf("impersonation: %#v", m)
	}
	if srv.Authority("demo").Version() != 1 {
		t.Fatal("a refusal changed the database")
	}
	// A wrong fingerprint fails the handshake.
	tlsConf, _ := protocol.ClientTLS("sha256:"+strings.Repeat("ab", 32), "", "")
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := quic.DialAddr(dctx, addr, tlsConf, protocol.QUICConfig()); err == nil || !strings.Contains(err.Error(), "fingerprint") {
		t.Fatalf("wrong fingerprint: %v", err)
	}
}

// TestGarbage: malformed, truncated and oversized input closes only that
// stream; the server stays up and other clients go on.
func TestGarbage(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.Limits.MaxMessage = 1 << 20 })
	good := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, good, protocol.Hello{Database: "demo", ClientID: "good", Credential: "s3cret"})
	welcome(t, m)
	c.until(1)
	hello := protocol.AppendFrame(nil, &protocol.Hello{Protocol: protocol.Version, Database: "demo", ClientID: "bad", Credential: "s3cret", Checksum: newImage().sums.Sum()})
	garbage := [][]byte{
		{0, 0, 0, 5, 99, 1, 2, 3, 4},                      // unknown type
		{0, 0, 0, 0},                                      // empty message
		{0xff, 0xff, 0xff, 0xff},                          // oversized length
		{0, 0, 0, 9, byte(protocol.TypePush), 0xff, 0xff}, // truncated, then the stream ends
		append(append([]byte(nil), hello...), 0, 0, 0, 3, byte(protocol.TypePush), 0x80, 0x80), // bad varint after a good hello
		append(append([]byte(nil), hello...), protocol.AppendFrame(nil, &protocol.Ack{})...),   // a message not valid from a client
	}
	for i, g := range garbage {
		bad := dial(t, addr, srv.Fingerprint())
		s, err := bad.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		s.Write(g)
		s.Close()
		// The server answers with an Error (after a Welcome, for the cases
		// with a good hello) and ends the stream.
		r := protocol.NewReader(s, protocol.DefaultLimits)
		s.SetReadDeadline(time.Now().Add(10 * time.Second))
		var last protocol.Message
		for {
			m, err := r.Read()
			if err != nil {
				if last == nil {
					t.Fatalf("garbage %d: no error message before %v", i, err)
				}
				break
			}
			last = m
		}
		if e, ok := last.(*protocol.Error); !ok || (e.Code != protocol.CodeMalformed && e.Code != protocol.CodeTooLarge && e.Code != protocol.CodeUnexpected) {
			t.Fatalf("garbage %d: last message %#v", i, last)
		}
	}
	c.push(1)
	c.until(2)
	if c.im.sums.Sum() != srv.Authority("demo").Checksum() {
		t.Fatal("the good client diverged")
	}
}

// TestWireSize: the version carrying a one-row update of an existing row
// travels in at most 512 bytes (the mutation, the client's last id and the
// version number each touch a page).
func TestWireSize(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	c, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "w", Credential: "s3cret"})
	welcome(t, m)
	// Fill the table over many pages first, so that the update touches one
	// leaf among many, as in a real app.
	a := srv.Authority("demo")
	if _, err := a.Exec(context.Background(), func(tx mutators.Tx) error {
		_, err := tx.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 5000)
			INSERT INTO Categories(name, count) SELECT 'cat-' || i, i FROM n`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.push(1)
	c.acked(1)
	rec, err := srv.EncodedVersion("demo", a.Version())
	if err != nil {
		t.Fatal(err)
	}
	ps, _ := protocol.DecodeEncodedVersion(rec, protocol.DefaultLimits)
	wire := len(protocol.AppendVersionsFrame(nil, rec))
	t.Logf("single-row update: %d pages, %d bytes on the wire (codec %d)", len(ps.Pgnos), wire, ps.Codec)
	if wire > 512 {
		t.Fatalf("a one-row update takes %d bytes", len(rec))
	}
	if c.im.sums.Sum() != a.Checksum() {
		t.Fatal("diverged")
	}
}

// TestSnapshotAndRetention: a client behind the retention window gets a
// snapshot, then live versions, and ends checksum-equal.
func TestSnapshotAndRetention(t *testing.T) {
	dir := t.TempDir()
	srv, addr := testServer(t, dir, func(c *Config) {
		c.SegmentVersions = 4
		c.Retention = Retention{Versions: 8}
	})
	conn := dial(t, addr, srv.Fingerprint())
	w, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "writer", Credential: "s3cret"})
	welcome(t, m)
	for id := uint64(1); id <= 30; id++ {
		w.push(id)
		w.acked(id) // one version each
	}
	files, _ := filepath.Glob(filepath.Join(dir, "dbs", "demo", "log", "*"+segmentSuffix))
	if len(files) > 4 {
		t.Fatalf("retention kept %d segments", len(files))
	}
	late, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "late", Credential: "s3cret"})
	if !welcome(t, m).Snapshot {
		t.Fatal("a replica behind the log was not sent a snapshot")
	}
	var raw []byte
	var chunk *protocol.SnapshotChunk
	for chunk == nil || chunk.First+chunk.Count-1 < chunk.DBSize {
		var ok bool
		if chunk, ok = late.read().(*protocol.SnapshotChunk); !ok {
			t.Fatal("want snapshot chunks")
		}
		b, err := chunk.Pages(protocol.DefaultLimits)
		if err != nil {
			t.Fatal(err)
		}
		raw = append(raw, b...)
	}
	im := &image{version: chunk.Version, sums: wal.NewChecksumTable(chunk.PageSize)}
	im.sums.Resize(chunk.DBSize)
	for i := uint32(0); i < chunk.DBSize; i++ {
		p := raw[int(i)*int(chunk.PageSize) : int(i+1)*int(chunk.PageSize)]
		im.pages = append(im.pages, p)
		im.sums.Set(i+1, wal.PageChecksum(i+1, p))
	}
	if im.sums.Sum() != chunk.Checksum {
		t.Fatal("snapshot image does not match its checksum")
	}
	late.im = im
	w.push(31)
	w.acked(31)
	late.until(w.im.version)
	if late.im.sums.Sum() != srv.Authority("demo").Checksum() {
		t.Fatal("diverged after snapshot")
	}
	// A client with the right version but a wrong checksum is not sent
	// deltas it cannot apply: it gets a snapshot.
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "odd", Credential: "s3cret", Version: 30, Checksum: 12345})
	if !welcome(t, m).Snapshot {
		t.Fatal("a diverged replica was not sent a snapshot")
	}
}

// TestRestart: the change log survives a restart; a client catches up
// through it; the server reopens its databases and credentials.
func TestRestart(t *testing.T) {
	dir := t.TempDir()
	srv, addr := testServer(t, dir, nil)
	c, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "r", Credential: "s3cret"})
	welcome(t, m)
	c.push(1, 2)
	c.until(2)
	fp := srv.Fingerprint()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	srv2, err := Open(context.Background(), Config{Dir: dir, Mutators: testRegistry(t), Setup: demoSetup, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	if srv2.Fingerprint() != fp {
		t.Fatal("the certificate changed across a restart")
	}
	addr2, err := srv2.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conn := dial(t, addr2, fp)
	w, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "r", Credential: "s3cret"})
	if wl := welcome(t, m); wl.Snapshot || wl.LastMutationID != 2 {
		t.Fatalf("welcome after restart %+v", wl)
	}
	w.until(2)
	w.push(3)
	w.until(3)
	if w.im.sums.Sum() != srv2.Authority("demo").Checksum() {
		t.Fatal("diverged after restart")
	}
	_ = bytes.Equal
	_ = errors.Is
	_ = fmt.Sprint
}

// TestSlowClient: a client that reads nothing is cut off once its bounded
// queue overflows, and does not hold up anyone else's versions.
func TestSlowClient(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.SessionQueue = 8; c.Metrics = reg })
	slow, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "slow", Credential: "s3cret"})
	welcome(t, m)
	fast, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "fast", Credential: "s3cret"})
	welcome(t, m)
	// Big versions, so that the slow client's stream flow-control window
	// fills and its sender blocks: 200 versions of a 64 KiB blob each.
	a := srv.Authority("demo")
	start := time.Now()
	// The fast client reads as versions come; its reader must not be the
	// test goroutine that makes them.
	fastDone := make(chan error, 1)
	go func() {
		for fast.im.version < 201 {
			fast.stream.SetReadDeadline(time.Now().Add(20 * time.Second))
			m, err := fast.r.Read()
			if err != nil {
				fastDone <- err
				return
			}
			vs, ok := m.(*protocol.Versions)
			if !ok {
				fastDone <- fmt.Errorf("fast client got %#v", m)
				return
			}
			for i := range vs.Versions {
				ps, err := protocol.DecodeVersion(&vs.Versions[i], protocol.DefaultLimits, func(p uint32) ([]byte, error) { return fast.im.pages[p-1], nil })
				if err != nil {
					fastDone <- err
					return
				}
				fast.im.sums.Apply(ps)
				for uint32(len(fast.im.pages)) < ps.DBSize {
					fast.im.pages = append(fast.im.pages, nil)
				}
				fast.im.pages = fast.im.pages[:ps.DBSize]
				for _, p := range ps.Pages {
					fast.im.pages[p.Pgno-1] = p.Data
				}
				fast.im.version = ps.Version
			}
		}
		fastDone <- nil
	}()
	for i := 0; i < 200; i++ {
		if _, err := a.Exec(context.Background(), func(tx mutators.Tx) error {
			_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES (randomblob(65536), 1)`) // incompressible
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-fastDone; err != nil {
		t.Fatal(err)
	}
	t.Logf("the fast client had all 200 versions after %v", time.Since(start))
	if fast.im.sums.Sum() != a.Checksum() {
		t.Fatal("fast client diverged")
	}
	a.mu.Lock()
	n := len(pinnedDB(t, srv, "demo").subs)
	a.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d subscribers, want only the fast one", n)
	}
	// When the slow client finally reads, it finds the reason at the end.
	for {
		slow.stream.SetReadDeadline(time.Now().Add(20 * time.Second))
		m, err := slow.r.Read()
		var reset *quic.StreamError
		if errors.As(err, &reset) && reset.ErrorCode == quic.StreamErrorCode(protocol.CodeSlowClient) {
			break // cut off mid-message: the reason is the reset's code
		}
		if err != nil {
			t.Fatalf("the slow client's stream ended without a reason: %v", err)
		}
		if e, ok := m.(*protocol.Error); ok {
			if e.Code != protocol.CodeSlowClient {
				t.Fatalf("reason %v", e.Err())
			}
			break
		}
	}
	// Counted: its queue overflowed, and its sender's blocked write may
	// time out after that too.
	queue, _ := scrape(t, reg, metricSlow, "reason", "queue")
	write, _ := scrape(t, reg, metricSlow, "reason", "write")
	if queue+write < 1 || queue > 1 || write > 1 {
		t.Fatalf("slow-client cut-offs: queue %v, write %v", queue, write)
	}
	t.Logf("cut-offs: queue %v, write %v", queue, write)
}

// TestCatchUpChoosesTheCheaper: a replica gets the versions it lacks
// unless they weigh more than the whole database; then, as for a new
// replica of a database with a long history, a snapshot.
func TestCatchUpChoosesTheCheaper(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	a := srv.Authority("demo")
	for i := 0; i < 1000; i++ {
		if _, err := a.Exec(context.Background(), func(tx mutators.Tx) error {
			_, err := tx.Exec(`INSERT INTO Categories(name, count) VALUES ('Food', 1) ON CONFLICT(name) DO UPDATE SET count = count + 1`)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	d := pinnedDB(t, srv, "demo")
	a.mu.Lock()
	t.Logf("log of versions 1..%d: %d bytes; database: %d bytes", a.version, d.clog.size(1, a.version), int64(a.dbSize)*int64(a.pageSize))
	a.mu.Unlock()
	conn := dial(t, addr, srv.Fingerprint())
	_, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "new", Credential: "s3cret"})
	if !welcome(t, m).Snapshot {
		t.Fatal("a new replica was sent 1000 versions (70 KB) instead of a snapshot of 8 pages")
	}
	// One version behind: the version, not a snapshot.
	v := a.Version()
	prev := checksumBefore(t, srv, v)
	_, m = openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "behind", Credential: "s3cret", Version: v - 1, Checksum: prev})
	if welcome(t, m).Snapshot {
		t.Fatal("a replica one version behind was sent a snapshot")
	}
}

// checksumBefore is the database checksum at version v-1, from version
// v-1's record in the change log.
func checksumBefore(t *testing.T, srv *Server, v uint64) uint64 {
	t.Helper()
	rec, err := srv.EncodedVersion("demo", v-1)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := protocol.DecodeEncodedVersion(rec, protocol.DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	return ev.PostChecksum
}

// TestLimits: a client beyond its in-flight mutations is refused with
// CodeTooManyPending and nothing is applied; a connection beyond the
// per-address limit is closed with CodeTooManyConns, and the first one
// goes on.
func TestLimits(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), func(c *Config) { c.MaxInFlight = 2; c.MaxConnsPerAddr = 1 })
	a := srv.Authority("demo")
	conn := dial(t, addr, srv.Fingerprint())
	c, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "greedy", Credential: "s3cret"})
	welcome(t, m)
	c.push(1, 2, 3)
	for {
		if e, ok := c.read().(*protocol.Error); ok {
			if e.Code != protocol.CodeTooManyPending {
				t.Fatalf("over the in-flight limit: %v", e.Err())
			}
			break
		}
	}
	if a.Version() != 1 || sumOf(t, a, "Food") != 0 {
		t.Fatalf("a refused push changed the database: version %d", a.Version())
	}

	// A second connection from the same address.
	tlsConf, _ := protocol.ClientTLS(srv.Fingerprint(), "", "")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var err error
	if second, derr := quic.DialAddr(ctx, addr, tlsConf, protocol.QUICConfig()); derr != nil {
		err = derr
	} else {
		defer second.CloseWithError(0, "")
		var s *quic.Stream
		if s, err = second.OpenStreamSync(ctx); err == nil {
			protocol.WriteMessage(s, &protocol.Hello{Protocol: protocol.Version, Database: "demo", ClientID: "x", Credential: "s3cret"})
			_, err = protocol.NewReader(s, protocol.DefaultLimits).Read()
		}
	}
	var ae *quic.ApplicationError
	if !errors.As(err, &ae) || ae.ErrorCode != quic.ApplicationErrorCode(protocol.CodeTooManyConns) {
		t.Fatalf("a connection over the per-address limit: %v", err)
	}
	// The first connection still serves.
	ok, m := openClient(t, conn, protocol.Hello{Database: "demo", ClientID: "fine", Credential: "s3cret"})
	welcome(t, m)
	ok.push(1)
	ok.acked(1)
}
