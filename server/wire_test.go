package server

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// wireTarget is issue 13's bound on a one-row update's Versions message,
// length prefix included, with the post checksum kept.
const wireTarget = 32

// wirePart is one field of a Versions message and the bytes it takes.
type wirePart struct {
	name  string
	bytes int
}

// wireBreakdown walks a one-version Versions frame field by field (the
// record format of docs/PROTOCOL.md, protocol 4) and names what every
// byte is for. It fails on anything but a frame of one record.
func wireBreakdown(frame []byte) ([]wirePart, error) {
	b := frame
	var parts []wirePart
	take := func(name string, n int) error {
		if n <= 0 || n > len(b) {
			return fmt.Errorf("%s: %d bytes of %d", name, n, len(b))
		}
		parts, b = append(parts, wirePart{name, n}), b[n:]
		return nil
	}
	uv := func(name string) (uint64, error) {
		v, n := binary.Uvarint(b)
		return v, take(name, n)
	}
	if _, err := uv("frame length prefix"); err != nil {
		return nil, err
	}
	if err := take("message type", 1); err != nil {
		return nil, err
	}
	if n, err := uv("version count"); err != nil || n != 1 {
		return nil, fmt.Errorf("version count %d: %v", n, err)
	}
	if _, err := uv("version number"); err != nil {
		return nil, err
	}
	head, err := uv("head (codec, page size, flags)")
	if err != nil {
		return nil, err
	}
	if _, err := uv("db size"); err != nil {
		return nil, err
	}
	if head&(1<<6) != 0 {
		if _, err := uv("base db size"); err != nil {
			return nil, err
		}
	}
	if err := take("post checksum", 8); err != nil {
		return nil, err
	}
	n, err := uv("page count")
	if err != nil {
		return nil, err
	}
	for i := uint64(0); i < n; i++ {
		if _, err := uv("page numbers"); err != nil {
			return nil, err
		}
	}
	if protocol.Codec(head&7) != protocol.CodecPatch {
		l, err := uv("payload length")
		if err != nil {
			return nil, err
		}
		return parts, take(fmt.Sprintf("payload (codec %d)", head&7), int(l))
	}
	for i := uint64(0); i < n; i++ {
		runs, err := uv("patch run counts")
		if err != nil {
			return nil, err
		}
		for r := uint64(0); r < runs; r++ {
			h, err := uv("patch run headers (offset, length)")
			if err != nil {
				return nil, err
			}
			length := int(h&3) + 1
			if h&3 == 3 {
				ext, err := uv("patch run headers (offset, length)")
				if err != nil {
					return nil, err
				}
				length = 4 + int(ext)
			}
			if err := take("patch bytes (the new bytes)", length); err != nil {
				return nil, err
			}
		}
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("%d bytes after the record", len(b))
	}
	return parts, nil
}

// summarize adds up parts of the same name, in first-seen order.
func summarize(parts []wirePart) (string, int) {
	var order []string
	sums := map[string]int{}
	total := 0
	for _, p := range parts {
		if _, ok := sums[p.name]; !ok {
			order = append(order, p.name)
		}
		sums[p.name] += p.bytes
		total += p.bytes
	}
	var sb strings.Builder
	for _, name := range order {
		fmt.Fprintf(&sb, "  %-36s %3d B\n", name, sums[name])
	}
	fmt.Fprintf(&sb, "  %-36s %3d B", "total", total)
	return sb.String(), total
}

// TestWireOneRowUpdate: the bench's one-row update (bench/network.go: an
// UPDATE of one row's counter in a table of 2,000 rows over many pages)
// travels in at most wireTarget bytes, frame included, each byte
// accounted for; and the replica side (an independent image) decodes it
// and proves it with the post checksum. It fails if the size regresses.
func TestWireOneRowUpdate(t *testing.T) {
	srv, addr := testServer(t, t.TempDir(), nil)
	c, m := openClient(t, dial(t, addr, srv.Fingerprint()), protocol.Hello{Database: "demo", ClientID: "w", Credential: "s3cret"})
	welcome(t, m)
	a := srv.Authority("demo")
	ctx := context.Background()
	if _, err := a.Exec(ctx, func(tx mutators.Tx) error {
		_, err := tx.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
			INSERT INTO Categories(name, count) SELECT 'cat-' || i, i FROM n`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		ps, err := a.Exec(ctx, func(tx mutators.Tx) error {
			_, err := tx.Exec(`UPDATE Categories SET count = count + 1 WHERE name = 'cat-1000'`)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		c.until(ps.Version)
		if c.im.sums.Sum() != a.Checksum() {
			t.Fatal("the client's image diverged")
		}
		rec, err := srv.EncodedVersion("demo", ps.Version)
		if err != nil {
			t.Fatal(err)
		}
		frame := protocol.AppendVersionsFrame(nil, rec)
		parts, err := wireBreakdown(frame)
		if err != nil {
			t.Fatalf("version %d: % x: %v", ps.Version, frame, err)
		}
		table, total := summarize(parts)
		if total != len(frame) {
			t.Fatalf("breakdown of %d bytes for a frame of %d", total, len(frame))
		}
		if i == 0 {
			t.Logf("one-row update, version %d, %d pages changed, %d pages in the database:\n%s", ps.Version, len(ps.Pages), ps.DBSize, table)
		}
		if total > wireTarget {
			t.Fatalf("a one-row update takes %d bytes on the wire, target %d:\n%s", total, wireTarget, table)
		}
	}
}
