package cluster

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/server"
	"github.com/sqlrebase/sqlrebase/wal"
)

// SnapshotConfig configures the snapshot object store. Zero values take
// the defaults named.
type SnapshotConfig struct {
	// Bucket is the object store's name (DefaultSnapshotBucket).
	Bucket string
	// Replicas is its replication (1; 3 in a cluster).
	Replicas int
}

// Snapshots is the object store of the databases' snapshots: one object
// per database, replaced by each new snapshot.
type Snapshots struct {
	obs    jetstream.ObjectStore
	stream jetstream.Stream // the object store's own stream, whose chunks Get reads
	bucket string
}

// Names of the object store's stream and of an object's chunk subject,
// as the object store's specification (NATS ADR-20) fixes them.
const (
	objectStream = "OBJ_%s"     // OBJ_<bucket>
	objectChunks = "$O.%s.C.%s" // $O.<bucket>.C.<object's NUID>
)

// SnapshotInfo describes one snapshot: the database image at Version,
// whose version message in the log has stream sequence Seq.
type SnapshotInfo struct {
	DB       string
	Version  uint64
	Seq      uint64 // the stream sequence of Version's entry: the log is needed only after it
	Checksum uint64 // the whole-database checksum (wal.PageChecksum XORed over the pages)
	PageSize uint32
	Pages    uint32
	Digest   string // the object store's SHA-256 of the bytes (set by Put and Info)
}

// OpenSnapshots creates the snapshot object store, or opens it, retrying
// until ctx ends while a cluster elects its meta leader.
func OpenSnapshots(ctx context.Context, js jetstream.JetStream, cfg SnapshotConfig) (*Snapshots, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = DefaultSnapshotBucket
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	obs, err := retry(ctx, func(ctx context.Context) (jetstream.ObjectStore, error) {
		return js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
			Bucket:      cfg.Bucket,
			Description: "sqlrebase: the latest snapshot of each database",
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
		})
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: open snapshot store %s: %w", cfg.Bucket, err)
	}
	stream, err := retry(ctx, func(ctx context.Context) (jetstream.Stream, error) {
		return js.Stream(ctx, fmt.Sprintf(objectStream, cfg.Bucket))
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: open snapshot store %s's stream: %w", cfg.Bucket, err)
	}
	return &Snapshots{obs: obs, stream: stream, bucket: cfg.Bucket}, nil
}

// Put stores image (info.Pages pages of info.PageSize bytes) as db's
// snapshot, replacing the one before. It computes the checksum of the
// pages as they stream by, and an image that does not give info.Checksum,
// or has another size, is refused with ErrSnapshotChecksum before it
// replaces anything: the object store drops a put whose reader fails. Only
// after Put returns may the log be trimmed before info.Seq.
func (s *Snapshots) Put(ctx context.Context, info SnapshotInfo, image io.Reader) (SnapshotInfo, error) {
	if !wal.ValidPageSize(info.PageSize) || info.Version == 0 || info.Seq == 0 {
		return SnapshotInfo{}, fmt.Errorf("cluster: snapshot of %s: bad info %+v", info.DB, info)
	}
	meta := jetstream.ObjectMeta{Name: token(info.DB), Metadata: map[string]string{
		"db":        info.DB,
		"version":   strconv.FormatUint(info.Version, 10),
		"seq":       strconv.FormatUint(info.Seq, 10),
		"checksum":  strconv.FormatUint(info.Checksum, 16),
		"page-size": strconv.FormatUint(uint64(info.PageSize), 10),
		"pages":     strconv.FormatUint(uint64(info.Pages), 10),
	}}
	oi, err := s.obs.Put(ctx, meta, newPageChecker(image, info))
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("cluster: put snapshot of %s at version %d: %w", info.DB, info.Version, err)
	}
	info.Digest = oi.Digest
	return info, nil
}

// Info describes db's snapshot; ErrNoSnapshot if it has none.
func (s *Snapshots) Info(ctx context.Context, db string) (SnapshotInfo, error) {
	oi, err := retry(ctx, func(ctx context.Context) (*jetstream.ObjectInfo, error) { return s.obs.GetInfo(ctx, token(db)) })
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return SnapshotInfo{}, fmt.Errorf("%w: %s", ErrNoSnapshot, db)
	}
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("cluster: snapshot of %s: %w", db, err)
	}
	return parseInfo(db, oi)
}

func parseInfo(db string, oi *jetstream.ObjectInfo) (SnapshotInfo, error) {
	md := oi.Metadata
	version, e1 := strconv.ParseUint(md["version"], 10, 64)
	seq, e2 := strconv.ParseUint(md["seq"], 10, 64)
	sum, e3 := strconv.ParseUint(md["checksum"], 16, 64)
	ps, e4 := strconv.ParseUint(md["page-size"], 10, 32)
	pages, e5 := strconv.ParseUint(md["pages"], 10, 32)
	if err := errors.Join(e1, e2, e3, e4, e5); err != nil || md["db"] != db || !wal.ValidPageSize(uint32(ps)) ||
		uint64(oi.Size) != ps*pages {
		return SnapshotInfo{}, fmt.Errorf("cluster: snapshot of %s: bad metadata %v (size %d): %v", db, md, oi.Size, err)
	}
	return SnapshotInfo{DB: db, Version: version, Seq: seq, Checksum: sum, PageSize: uint32(ps), Pages: uint32(pages), Digest: oi.Digest}, nil
}

// Get opens db's snapshot: its info and a reader of the image. The reader
// checks the pages against the checksum as they stream by and ends with
// ErrSnapshotChecksum instead of io.EOF if they do not give it (or if the
// bytes do not give the object store's digest), so a caller that reads to
// io.EOF has an image it can trust. A snapshot replaced while it is read
// ends the reader with ErrSnapshotReplaced. The reader's reads are bound
// to ctx. The caller closes the reader.
func (s *Snapshots) Get(ctx context.Context, db string) (SnapshotInfo, io.ReadCloser, error) {
	oi, err := retry(ctx, func(ctx context.Context) (*jetstream.ObjectInfo, error) { return s.obs.GetInfo(ctx, token(db)) })
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return SnapshotInfo{}, nil, fmt.Errorf("%w: %s", ErrNoSnapshot, db)
	}
	if err != nil {
		return SnapshotInfo{}, nil, fmt.Errorf("cluster: get snapshot of %s: %w", db, err)
	}
	info, err := parseInfo(db, oi)
	if err != nil {
		return SnapshotInfo{}, nil, err
	}
	want, err := jetstream.DecodeObjectDigest(oi.Digest)
	if err != nil || oi.NUID == "" {
		return SnapshotInfo{}, nil, fmt.Errorf("cluster: snapshot of %s: bad object info (digest %q, nuid %q): %v", db, oi.Digest, oi.NUID, err)
	}
	cr := &chunkReader{ctx: ctx, stream: s.stream, subject: fmt.Sprintf(objectChunks, s.bucket, oi.NUID),
		info: info, size: oi.Size, want: want, digest: sha256.New(), next: 1}
	return info, io.NopCloser(newPageChecker(cr, info)), nil
}

// chunkReader reads an object's chunks from the object store's stream,
// one direct get each, as Log.Read reads versions. nats.go's own
// ObjectStore.Get reads them with an ordered push consumer instead, and
// when a put of a new snapshot under the same name purges the old one's
// chunks part way through, that consumer waits for chunks that are gone
// for as long as its context lasts (TestOwnerWritesSnapshotsAndTrims hung
// 60 s so, when a third snapshot was stored while a restore read the
// second). Here the next chunk's get finds no message, which is
// ErrSnapshotReplaced at once.
type chunkReader struct {
	ctx     context.Context
	stream  jetstream.Stream
	subject string
	info    SnapshotInfo
	size    uint64 // the object's size in bytes
	want    []byte // its SHA-256
	digest  hash.Hash
	next    uint64 // the stream sequence to look for the next chunk from
	got     uint64 // bytes read
	buf     []byte // the rest of the chunk being read
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.got >= r.size {
			if !bytes.Equal(r.digest.Sum(nil), r.want) {
				return 0, fmt.Errorf("%w: %s at version %d: its bytes do not give the object store's digest", ErrSnapshotChecksum, r.info.DB, r.info.Version)
			}
			return 0, io.EOF
		}
		m, err := retry(r.ctx, func(ctx context.Context) (*jetstream.RawStreamMsg, error) {
			return r.stream.GetMsg(ctx, r.next, jetstream.WithGetMsgSubject(r.subject))
		})
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return 0, fmt.Errorf("%w: %s at version %d, after %d of %d bytes", ErrSnapshotReplaced, r.info.DB, r.info.Version, r.got, r.size)
		}
		if err != nil {
			return 0, fmt.Errorf("cluster: read snapshot of %s: %w", r.info.DB, err)
		}
		r.next = m.Sequence + 1
		r.got += uint64(len(m.Data))
		if r.got > r.size {
			return 0, fmt.Errorf("%w: %s at version %d: more than its %d bytes", ErrSnapshotChecksum, r.info.DB, r.info.Version, r.size)
		}
		r.digest.Write(m.Data)
		r.buf = m.Data
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// pageChecker passes an image through, computing the whole-database
// checksum page by page, and turns the end of the image into
// ErrSnapshotChecksum if the pages or their checksum are not the ones
// claimed.
type pageChecker struct {
	r     io.Reader
	info  SnapshotInfo
	page  []byte // the page being filled
	fill  int
	pgno  uint32 // pages done
	sum   uint64
	ended error
}

func newPageChecker(r io.Reader, info SnapshotInfo) *pageChecker {
	return &pageChecker{r: r, info: info, page: make([]byte, info.PageSize)}
}

func (c *pageChecker) Read(p []byte) (int, error) {
	if c.ended != nil {
		return 0, c.ended
	}
	n, err := c.r.Read(p)
	for b := p[:n]; len(b) > 0; {
		k := copy(c.page[c.fill:], b)
		c.fill += k
		b = b[k:]
		if c.fill == len(c.page) {
			c.pgno++
			c.sum ^= wal.PageChecksum(c.pgno, c.page)
			c.fill = 0
		}
	}
	if c.pgno > c.info.Pages {
		c.ended = fmt.Errorf("%w: %s: more than %d pages", ErrSnapshotChecksum, c.info.DB, c.info.Pages)
		return n, c.ended
	}
	if errors.Is(err, io.EOF) {
		switch {
		case c.fill != 0 || c.pgno != c.info.Pages:
			c.ended = fmt.Errorf("%w: %s: %d pages and %d bytes, want %d pages", ErrSnapshotChecksum, c.info.DB, c.pgno, c.fill, c.info.Pages)
		case c.sum != c.info.Checksum:
			c.ended = fmt.Errorf("%w: %s at version %d: pages give %016x, want %016x", ErrSnapshotChecksum, c.info.DB, c.info.Version, c.sum, c.info.Checksum)
		default:
			c.ended = io.EOF
		}
		return n, c.ended
	}
	return n, err
}

// writeSnapshot stores db's image at its latest version as its snapshot
// and trims the stream behind it. The image is pinned (OpenSnapshot:
// checkpointed into the main file, which no checkpoint touches until the
// reader closes) at a version this owner knows to be in the stream: the
// authority's version under its lock is always one whose append was
// acknowledged (a refused one stops the authority). The snapshot records
// that version's stream sequence, and its checksum must be the one the
// stream's entry says; a snapshot no newer than the stored one is not
// written (a deposed owner's late snapshot must not replace a new
// owner's, behind which the stream may already be trimmed).
func (o *Owner) writeSnapshot(ctx context.Context, src SnapshotSource, db string, w *owned) (SnapshotInfo, error) {
	var info SnapshotInfo
	err := src.WithAuthority(ctx, db, func(a *server.Authority) error {
		sr, err := a.OpenSnapshot(ctx)
		if err != nil {
			return err
		}
		defer sr.Close()
		if !w.lease.Valid() || w.ap.Err() != nil {
			return fmt.Errorf("%w: %s: not the owner any more", ErrLeaseLost, db)
		}
		at, ok := w.appendedAt(sr.Version)
		if !ok {
			e, err := entryOf(ctx, o.log, db, sr.Version)
			if err != nil {
				return err
			}
			sum, err := postChecksum(e)
			if err != nil {
				return err
			}
			at = appendedVersion{version: e.Version, seq: e.Seq, checksum: sum}
		}
		if at.checksum != sr.Checksum {
			return fmt.Errorf("%w: %s: image at version %d has checksum %016x, the stream's entry %016x", ErrBrokenChain, db, sr.Version, sr.Checksum, at.checksum)
		}
		if cur, err := o.snaps.Info(ctx, db); err == nil && cur.Version >= sr.Version {
			info = cur
			return nil
		} else if err != nil && !errors.Is(err, ErrNoSnapshot) {
			return err
		}
		info, err = o.snaps.Put(ctx, SnapshotInfo{DB: db, Version: sr.Version, Seq: at.seq, Checksum: sr.Checksum, PageSize: sr.PageSize, Pages: sr.DBSize}, &imageReader{sr: sr})
		return err
	})
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("cluster: snapshot of %s: %w", db, err)
	}
	if err := o.log.TrimBefore(ctx, db, info.Seq); err != nil {
		return info, err
	}
	return info, nil
}

// imageReadPages is how many pages imageReader reads at a time (1 MiB of
// 4 KiB pages): the object store cuts its chunks itself.
const imageReadPages = 256

// imageReader streams a pinned image, page range by page range.
type imageReader struct {
	sr   *server.SnapshotReader
	next uint32 // pages done
	buf  []byte
}

func (r *imageReader) Read(p []byte) (int, error) {
	if len(r.buf) == 0 {
		if r.next >= r.sr.DBSize {
			return 0, io.EOF
		}
		k := min(imageReadPages, r.sr.DBSize-r.next)
		b, err := r.sr.ReadPages(r.next+1, k)
		if err != nil {
			return 0, err
		}
		r.buf, r.next = b, r.next+k
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}
