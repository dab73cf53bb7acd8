package server

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"time"

	sqlite3 "github.com/ncruces/go-sqlite3"
	sqlitedriver "github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/vfs"
)

// Follower is a LocalCache through which a node that does not own a
// database still serves it (docs/CLUSTER.md, "Forwarding and fan-out"):
// it keeps a copy of the database that follows the log, answers Hellos and
// fans the log's versions out to its own replicas from it, and hands its
// replicas' pushes to the owner. A database opens as a follower when
// LocalCache.Fresh says another node owns it (ErrNotOwner), and turns into
// the owner (its sessions reconnect) once Holder says nobody holds it.
type Follower interface {
	LocalCache
	// Holder names who holds db's lease: "" if nobody does, and a node
	// may take the database over.
	Holder(ctx context.Context, db string) (string, error)
	// Image builds db's latest image at path (the log's snapshot and every
	// version after it, each checked) and says what it holds.
	Image(ctx context.Context, db, path string) (FollowImage, error)
	// Follow calls apply with each of db's log records after version
	// after, in version order, as the log gets them, until ctx ends or
	// apply fails (its error is returned). A record is what
	// VersionLog.Append was given. ErrFollowGap: the log no longer holds
	// version after+1 (it was trimmed behind a snapshot): take an Image.
	Follow(ctx context.Context, db string, after uint64, apply func(version uint64, rec []byte) error) error
	// Versions calls apply with db's log records after version after,
	// through version through (0: through the last the log holds now), in
	// order, and returns once it has (or at the first failure): a read of
	// what the log holds now, where Follow waits for more. ErrFollowGap:
	// the log does not hold them all.
	Versions(ctx context.Context, db string, after, through uint64, apply func(version uint64, rec []byte) error) error
	// Forward hands pushes to db's owner and returns its answer to each,
	// in order. ErrNotOwner: no node answers for db now.
	Forward(ctx context.Context, db string, pushes []ForwardedPush) ([]ForwardedResult, error)
}

// TakeoverDeferrer is a Follower that may ask a node to wait before it
// takes a free database over, so that a better-placed node takes it first
// (in a cluster: one that does not lead the log's Raft groups, whose death
// would then cost an election as well as the lease). TakeoverDelay is how
// long the lease must have been seen free before this node tries; 0: at
// once. The node still takes it over after the wait if nobody else did.
type TakeoverDeferrer interface {
	TakeoverDelay(ctx context.Context, db string) time.Duration
}

// LeaseReleaser is a VersionLog that holds something for each database
// this node writes (a cluster's lease), which the server gives back when
// the database closes here (idle, or the server stops): thousands of idle
// databases must not keep their leases renewed by the node that last
// wrote them. The next node to open the database takes it.
type LeaseReleaser interface {
	Release(db string)
}

// FollowImage is what Follower.Image built.
type FollowImage struct {
	Version  uint64
	Checksum uint64
}

// ForwardedPush is one session's Push, handed from the node that holds the
// session to the database's owner, with who the session speaks for (the
// forwarding node authenticated it).
type ForwardedPush struct {
	ClientID  string
	UserID    string
	Claims    map[string]any
	Mutations []protocol.Mutation
}

// ForwardedResult is the owner's answer to one ForwardedPush: an Ack
// (Code 0: the push's mutations up to LastMutationID are in Version), or
// the Error the session gets (Code and Message).
type ForwardedResult struct {
	LastMutationID uint64
	Version        uint64
	Code           protocol.Code
	Message        string
}

// Errors of the follower side.
var (
	// ErrNotOwner is LocalCache.Fresh's error (wrapped) when another node
	// owns the database, and Server.ServeForwarded's when this node does
	// not.
	ErrNotOwner = errors.New("server: another node owns the database")
	// ErrFollowGap is Follower.Follow's error when the log no longer holds
	// the next version.
	ErrFollowGap = errors.New("server: the log no longer holds the next version")
	// errFollowChain is a followed version that does not apply to the
	// copy (its number or checksum before is not the copy's): the copy is
	// rebuilt from an image.
	errFollowChain = errors.New("server: a followed version does not follow the copy")
	// errFollowerStopped is an apply after the follower was stopped.
	errFollowerStopped = errors.New("server: follower stopped")
	// errOwnerChanged ends a forward whose owner's lease went free or
	// changed hands while it was in flight (watchLease).
	errOwnerChanged = errors.New("server: the database's lease went free or changed hands during the forward")
)

// Limits of the follower.
const (
	// leaseCheckEvery is how often a follower asks whether the database's
	// lease is free: a third of the cluster's default lease TTL (3 s), so
	// that a dead owner's database is taken over about a second after its
	// lease expires.
	leaseCheckEvery = time.Second
	// followRetry is the pause before following again after a failure.
	followRetry = 500 * time.Millisecond
	// followReadyWait is how long a Hello waits for a new follower's first
	// version before it is refused (retryable): an image of a small
	// database takes tens of milliseconds.
	followReadyWait = 5 * time.Second
	// forwardTimeout bounds a forwarded batch's round trip to the owner:
	// the version log's own bound, since the owner answers only once its
	// append is acknowledged, which may wait out a stream leader election.
	// (4 s was tried: with the owner's append waiting for an election
	// every forward then timed out, each time ending the sessions, and in
	// TestClusterFailover no replica was confirmed for 45 s.)
	forwardTimeout = versionLogTimeout
	// heldAckLimit is how long an ack may wait for its version to reach
	// the follower's copy: the owner appended the version before it
	// answered, so only a stuck consumer keeps it away this long.
	heldAckLimit = 10 * time.Second
	// followCatchUpPoll is how often a Hello from a client ahead of the
	// copy looks again: a copy applies a followed version in about a
	// millisecond or less, so a few milliseconds add little to the wait.
	followCatchUpPoll = 5 * time.Millisecond
)

// followerFile is the name, in a database's directory, of the follower's
// copy: a vfs.Replica file (with its apply journal), never the owner's
// db.sqlite, so that turning owner and follower in turn never mixes the
// two files' bookkeeping.
const followerFile = "follow.sqlite"

// follower is a database's state while this node follows it: its copy,
// a read-only SQLite connection to it (the last mutation ids a Welcome
// carries), and the acks waiting for their version to arrive. Guarded by
// the database's auth.mu, like the rest of the database.
type follower struct {
	path  string
	files *vfs.Replica
	db    *sql.DB
	conn  *sql.Conn
	// acks are the acks of forwarded pushes whose version the copy does
	// not hold yet: each goes out right after its version, so that a
	// replica never sees an ack before the version it names.
	acks []heldAck

	cancel context.CancelFunc
	done   chan struct{} // closed when the follow and lease goroutines have ended
	// ready is closed once the copy holds a version: until then a Hello
	// waits for it (briefly), rather than be welcomed to the empty file.
	ready     chan struct{}
	readySent bool
	// image is the image of an install that failed with the copy
	// poisoned, open (its name removed) for the Repair that copies it
	// again; nil if none.
	image *os.File
}

// markReadyLocked closes ready once the copy holds a version.
func (f *follower) markReadyLocked() {
	if !f.readySent && f.files.Version() > 0 {
		f.readySent = true
		close(f.ready)
	}
}

type heldAck struct {
	s     *session
	ack   protocol.Ack
	since time.Time
}

// openFollower opens the follower's copy in dir (version 0, empty, if it
// does not exist yet; a copy that does not check out is started afresh).
func openFollower(ctx context.Context, dir string) (*follower, error) {
	f := &follower{path: filepath.Join(dir, followerFile), ready: make(chan struct{})}
	files, err := vfs.OpenReplica(f.path, vfs.Normal)
	if errors.Is(err, vfs.ErrDiverged) {
		// A copy torn by a crash: it is only a cache, start it afresh.
		removeFollowerFiles(f.path)
		files, err = vfs.OpenReplica(f.path, vfs.Normal)
	}
	if err != nil {
		return nil, fmt.Errorf("server: open the follower's copy: %w", err)
	}
	f.files = files
	f.markReadyLocked()
	dsn := "file:" + (&url.URL{Path: f.path}).EscapedPath() + "?vfs=" + vfs.Name
	f.db, err = sqlitedriver.Open(dsn, func(c *sqlite3.Conn) error {
		_, err := c.Config(sqlite3.DBCONFIG_NO_CKPT_ON_CLOSE, true)
		return err
	})
	if err == nil {
		f.conn, err = f.db.Conn(ctx)
	}
	if err != nil {
		f.close()
		return nil, fmt.Errorf("server: open the follower's copy: %w", err)
	}
	return f, nil
}

// adoptCopy replaces the owner's database file at dst (and its WAL and
// index) with a copy of the follower's at src: the copy's main file is,
// byte for byte, the owner's database at the copy's version (vfs.Replica's
// rule), and it holds no local writes. The copy is written beside dst and
// synced before it is renamed over it; dst's WAL goes first, so a crash in
// between leaves an older file, which the open's check against the log
// finds stale like any other.
func adoptCopy(src, dst string) error {
	tmp := dst + ".adopt"
	if err := copySynced(src, tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("server: copy the follower's file: %w", wrapFull(err))
	}
	for _, sfx := range []string{"-wal", "-shm"} {
		if err := os.Remove(dst + sfx); err != nil && !errors.Is(err, fs.ErrNotExist) {
			os.Remove(tmp)
			return fmt.Errorf("server: adopt the follower's file: %w", err)
		}
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("server: adopt the follower's file: %w", err)
	}
	return nil
}

// copySynced copies the file src to dst (replaced) and syncs it.
func copySynced(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// removeFollowerFiles deletes a follower copy and everything beside it.
func removeFollowerFiles(path string) {
	for _, sfx := range []string{"", "-wal", "-shm", "-apply0", "-apply1"} {
		os.Remove(path + sfx)
	}
}

func (f *follower) close() error {
	f.dropImage()
	var errs []error
	if f.conn != nil {
		errs = append(errs, f.conn.Close())
	}
	if f.db != nil {
		errs = append(errs, f.db.Close())
	}
	if f.files != nil {
		errs = append(errs, f.files.Close())
	}
	return errors.Join(errs...)
}

// startFollowerLocked makes the database a follower of the log: it opens
// the copy and starts following. Called with auth.mu held, with the
// authority closed.
func (d *database) startFollowerLocked(ctx context.Context, dir string) error {
	f, err := openFollower(ctx, dir)
	if err != nil {
		return err
	}
	if d.clog.last() != f.files.Version() {
		if err := d.clog.reset(); err != nil {
			f.close()
			return err
		}
	}
	fctx, cancel := context.WithCancel(context.Background())
	f.cancel, f.done = cancel, make(chan struct{})
	d.fol = f
	go d.runFollower(fctx, f)
	d.log.Info("following the database: another node owns it", "version", f.files.Version())
	return nil
}

// stopFollower ends f's goroutines and waits for them. Called without
// auth.mu: they take it.
func (f *follower) stop() {
	f.cancel()
	<-f.done
}

// runFollower follows the log into f's copy until ctx ends, and asks the
// writer to take the database over once its lease is free.
func (d *database) runFollower(ctx context.Context, f *follower) {
	defer close(f.done)
	fl := d.cfg.VersionLog.(Follower)
	leaseDone := make(chan struct{})
	go func() {
		defer close(leaseDone)
		d.watchLease(ctx, fl)
	}()
	defer func() { <-leaseDone }()
	for ctx.Err() == nil {
		apply := func(v uint64, rec []byte) error { return d.applyFollowed(ctx, f, v, rec) }
		d.auth.mu.Lock()
		after := f.files.Version()
		d.auth.mu.Unlock()
		// Catch up to the log's tail with direct reads first, then follow
		// it live: on a node that restarted a moment before, the log's
		// consumer could not be made for 5-10 s (its JetStream not yet
		// current with the meta leader), and meanwhile the copy stood
		// still and every Hello was refused as ahead of it
		// (TestClusterFailover), where the direct reads answered.
		err := fl.Versions(ctx, d.name, after, 0, apply)
		if err == nil {
			d.auth.mu.Lock()
			after = f.files.Version()
			d.auth.mu.Unlock()
			err = fl.Follow(ctx, d.name, after, apply)
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrFollowGap) || errors.Is(err, errFollowChain) {
			d.log.Info("rebuilding the follower's copy from the log", "after", after, "why", err)
			err = d.installImage(ctx, f, fl)
			if err == nil {
				continue
			}
		}
		d.log.Warn("following the database's log", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(followRetry):
		}
	}
}

// watchLease asks, every leaseCheckEvery, whether the database's lease is
// free, and if it is, asks the writer to take the database over.
//
// A forward in flight that began before the lease was seen free, or held
// by another node than at the check before, is ended at once: it went to
// an owner that is gone, and would otherwise hold the writer (and the
// take-over it runs) for forwardTimeout. Ending it is safe whatever the
// owner did with it: the pushes' sessions are told to reconnect, and a
// mutation the owner ran is not run twice when pushed again (its id).
func (d *database) watchLease(ctx context.Context, fl Follower) {
	t := time.NewTicker(leaseCheckEvery)
	defer t.Stop()
	last, known := "", false
	var freeSince time.Time // when the lease was first seen free (zero: held)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.expireHeldAcks()
		asked := time.Now()
		hctx, cancel := context.WithTimeout(ctx, versionLogTimeout)
		holder, err := fl.Holder(hctx, d.name)
		cancel()
		if err != nil {
			continue
		}
		if holder == "" || known && holder != last {
			if d.inflight.cancelBefore(asked, fmt.Errorf("%w (now held by %q)", errOwnerChanged, holder)) {
				d.log.Info("ended a forward in flight: the owner's lease is free or changed hands", "holder", holder)
			}
		}
		last, known = holder, true
		if holder != "" {
			freeSince = time.Time{}
			continue
		}
		if freeSince.IsZero() {
			freeSince = asked
		}
		if td, ok := fl.(TakeoverDeferrer); ok {
			dctx, cancel := context.WithTimeout(ctx, versionLogTimeout)
			wait := td.TakeoverDelay(dctx, d.name)
			cancel()
			if time.Since(freeSince) < wait {
				continue
			}
		}
		d.requestTakeover()
	}
}

// expireHeldAcks ends the sessions whose ack has waited longer than
// heldAckLimit for its version: the copy is stuck behind the log, and the
// replica does better to reconnect (elsewhere, if need be) than to wait.
func (d *database) expireHeldAcks() {
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	f := d.fol
	if f == nil {
		return
	}
	kept := f.acks[:0]
	for _, h := range f.acks {
		if time.Since(h.since) > heldAckLimit {
			h.s.fail(protocol.CodeInternal, fmt.Sprintf("version %d did not reach this node in %v; reconnect", h.ack.Version, heldAckLimit))
			continue
		}
		kept = append(kept, h)
	}
	f.acks = kept
}

// requestTakeover asks the writer to try to take the database over.
func (d *database) requestTakeover() {
	select {
	case d.takeover <- struct{}{}:
	default:
	}
}

// installImage replaces f's copy with the log's latest image.
func (d *database) installImage(ctx context.Context, f *follower, fl Follower) error {
	if err := d.repairCopy(ctx, f); err != nil {
		return err
	}
	tmp := f.path + ".image"
	defer os.Remove(tmp)
	ictx, cancel := context.WithTimeout(ctx, restoreTimeout)
	img, err := fl.Image(ictx, d.name, tmp)
	cancel()
	if err != nil {
		return fmt.Errorf("server: image for the follower: %w", err)
	}
	src, err := os.Open(tmp)
	if err != nil {
		return err
	}
	kept := false
	defer func() {
		if !kept {
			src.Close()
		}
	}()
	var hdr [100]byte
	if _, err := io.ReadFull(src, hdr[:]); err != nil {
		return fmt.Errorf("server: image for the follower: %w", err)
	}
	pageSize := uint32(binary.BigEndian.Uint16(hdr[16:18]))
	if pageSize == 1 {
		pageSize = 65536
	}
	st, err := src.Stat()
	if err != nil {
		return err
	}
	if pageSize < 512 || st.Size()%int64(pageSize) != 0 {
		return fmt.Errorf("server: image for the follower: %d bytes of %d-byte pages", st.Size(), pageSize)
	}
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	if d.fol != f {
		return errFollowerStopped
	}
	err = f.files.InstallSnapshot(ctx, vfs.SnapshotImage{Src: src, Version: img.Version, PageSize: pageSize, Pages: uint32(st.Size() / int64(pageSize)), Checksum: img.Checksum})
	if err != nil {
		if errors.Is(err, vfs.ErrPoisoned) {
			// The copy is poisoned (a full disk, say) until a Repair,
			// which copies this image again: keep it open (its name goes)
			// until one works (repairCopy).
			f.dropImage()
			f.image, kept = src, true
		}
		return fmt.Errorf("server: install the follower's image: %w", err)
	}
	// The change log's versions end before the image: start it afresh.
	if err := d.clog.reset(); err != nil {
		return err
	}
	d.failHeldAcksLocked(f, "the node's copy of the database was rebuilt; reconnect")
	// The subscribers are at versions before the image, which no version
	// offered from now on follows: they reconnect and are welcomed to the
	// image (TestFollowerRebuiltFromAnImageMovesItsSessionsOn; they were
	// left behind for good).
	for s := range d.subs {
		s.fail(protocol.CodeInternal, "the node's copy of the database was rebuilt; reconnect")
	}
	d.subs = map[*session]struct{}{}
	f.markReadyLocked()
	d.log.Info("follower's copy rebuilt from the log", "version", img.Version)
	return nil
}

// repairCopy repairs f's copy if a failed write left it poisoned (an
// image install or a followed version on a full disk): until then every
// install and apply fails at once, with the poisoning error, for ever
// (found by the chaos suite's cluster mode: a follower whose image install
// met a full disk served nothing again). On failure (the disk still full)
// it stays poisoned; the follower tries again after followRetry.
func (d *database) repairCopy(ctx context.Context, f *follower) error {
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	if d.fol != f {
		return errFollowerStopped
	}
	if f.files.Poisoned() == nil {
		f.dropImage()
		return nil
	}
	if err := f.files.Repair(ctx); err != nil {
		return fmt.Errorf("server: repair the follower's copy: %w", wrapFull(err))
	}
	f.dropImage()
	d.log.Info("follower's copy repaired", "version", f.files.Version())
	return nil
}

// dropImage closes the image a failed install kept for its repair.
func (f *follower) dropImage() {
	if f.image != nil {
		f.image.Close()
		f.image = nil
	}
}

// applyFollowed applies one followed version to f's copy, logs it, offers
// it to the subscribers and sends the acks that waited for it.
func (d *database) applyFollowed(ctx context.Context, f *follower, v uint64, rec []byte) error {
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	if d.fol != f {
		return errFollowerStopped
	}
	have := f.files.Version()
	if v <= have {
		return nil // delivered again after a reconnect of the consumer
	}
	if v != have+1 || len(rec) < logPrefix || binary.LittleEndian.Uint64(rec) != f.files.Checksum() {
		return fmt.Errorf("%w: version %d onto version %d", errFollowChain, v, have)
	}
	ev, err := protocol.DecodeEncodedVersion(rec[logPrefix:], protocol.DefaultLimits)
	if err != nil {
		return fmt.Errorf("%w: version %d: %w", errFollowChain, v, err)
	}
	if ev.Version != v {
		return fmt.Errorf("%w: the record of version %d holds version %d", errFollowChain, v, ev.Version)
	}
	ps, err := protocol.DecodeVersion(&ev, protocol.DefaultLimits, f.files.ReadPage)
	if err != nil {
		return fmt.Errorf("%w: version %d: %w", errFollowChain, v, err)
	}
	ps.PreChecksum = f.files.Checksum()
	if err := f.files.Rebase(ctx, ps); err != nil {
		if errors.Is(err, vfs.ErrPoisoned) {
			if rerr := f.files.Repair(ctx); rerr != nil {
				return fmt.Errorf("server: follower apply of version %d: %w (repair: %w)", v, err, rerr)
			}
		}
		return fmt.Errorf("%w: version %d: %w", errFollowChain, v, err)
	}
	if err := d.clog.append(v, rec, time.Now()); err != nil {
		d.log.Error("change log append failed; the log starts afresh", "version", v, "err", err)
		d.clog.reset()
	}
	wire := rec[logPrefix:]
	for s := range d.subs {
		if !s.offer(item{version: v, rec: wire}) {
			delete(d.subs, s)
		}
	}
	var due []heldAck
	due, f.acks = dueAcks(f.acks, v)
	for _, h := range due {
		ack := h.ack
		h.s.offer(item{ack: &ack})
	}
	f.markReadyLocked()
	return nil
}

// dueAcks splits held acks into those due once the copy holds version v
// (their version is v or older), in the order they were held, and those
// that still wait. kept reuses held's array.
func dueAcks(held []heldAck, v uint64) (due, kept []heldAck) {
	kept = held[:0]
	for _, h := range held {
		if h.ack.Version <= v {
			due = append(due, h)
		} else {
			kept = append(kept, h)
		}
	}
	return due, kept
}

// failHeldAcksLocked ends the sessions whose acks wait on f (their pushes
// are done on the owner; the retry after reconnecting is a duplicate).
func (d *database) failHeldAcksLocked(f *follower, msg string) {
	for _, h := range f.acks {
		h.s.fail(protocol.CodeInternal, msg)
	}
	f.acks = nil
}

// followerWelcome is subscribe's view of a follower's copy.
func (f *follower) welcome(ctx context.Context, clientID string) (version, checksum uint64, pageSize, dbSize uint32, lmid uint64, err error) {
	lmid, err = mutators.LastMutationID(ctx, f.conn, clientID)
	if err != nil {
		return 0, 0, 0, 0, 0, err
	}
	return f.files.Version(), f.files.Checksum(), f.files.PageSize(), f.files.Pages(), lmid, nil
}

// snapshot copies f's copy aside and returns a reader of the copy, which
// it removes on Close: the follower goes on applying meanwhile. Called with
// auth.mu held.
func (f *follower) snapshot() (*SnapshotReader, error) {
	src, err := os.Open(f.path)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	tmp, err := os.CreateTemp(filepath.Dir(f.path), followerFile+".snap-*")
	if err != nil {
		return nil, fmt.Errorf("server: follower snapshot: %w", wrapFull(err))
	}
	pageSize, pages := f.files.PageSize(), f.files.Pages()
	if _, err := io.CopyN(tmp, src, int64(pageSize)*int64(pages)); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("server: follower snapshot: %w", wrapFull(err))
	}
	return &SnapshotReader{f: tmp, remove: tmp.Name(), Version: f.files.Version(), PageSize: pageSize, DBSize: pages, Checksum: f.files.Checksum()}, nil
}

// forward hands a batch of pushes to the owner in one request (while it
// is answered, the next pushes gather for the next one, as a group commit
// does) and delivers each answer: an Error at once, an ack once the copy
// holds its version. It returns, unanswered, the pushes of a forward that
// found no owner (see parkable), for the writer to park and forward again.
// Runs on the writer.
func (d *database) forward(ctx context.Context, reqs []pushRequest) []pushRequest {
	fl := d.cfg.VersionLog.(Follower)
	own := reqs[:0:0]
	for _, r := range reqs {
		if r.s == nil {
			// Forwarded here while this node owned the database, which it
			// no longer does: never forwarded twice.
			r.answer(ForwardedResult{Code: protocol.CodeInternal, Message: "the node no longer owns the database; retry"})
			continue
		}
		own = append(own, r)
	}
	if reqs = own; len(reqs) == 0 {
		return nil
	}
	pushes := make([]ForwardedPush, len(reqs))
	for i, r := range reqs {
		pushes[i] = ForwardedPush{ClientID: r.s.clientID, UserID: r.s.identity.UserID, Claims: r.s.identity.Claims, Mutations: r.mutations}
	}
	// A forward to an owner that died is never answered: it would hold
	// this writer, and with it the take-over the writer runs, for the
	// whole forwardTimeout (TestClusterFailover: the first confirmation
	// 10.2 s after the owner's SIGKILL, the lease gone after 3.0 s). So
	// watchLease ends it as soon as it sees the lease change hands.
	cctx, cancelCause := context.WithCancelCause(ctx)
	fctx, cancel := context.WithTimeout(cctx, forwardTimeout)
	d.inflight.start(cancelCause)
	res, err := fl.Forward(fctx, d.name, pushes)
	d.inflight.end()
	cancel()
	cancelCause(nil)
	if cause := context.Cause(cctx); errors.Is(cause, errOwnerChanged) {
		err = cause
	}
	if err == nil && len(res) != len(reqs) {
		err = fmt.Errorf("server: the owner answered %d of %d pushes", len(res), len(reqs))
	}
	if err != nil {
		if errors.Is(err, ErrNotOwner) {
			d.requestTakeover()
		}
		if parkable(err) {
			d.log.Debug("forward found no owner; parked", "pushes", len(reqs), "err", err)
			return reqs
		}
		d.log.Warn("forward pushes to the owner", "pushes", len(reqs), "err", err)
		for _, r := range reqs {
			r.answer(ForwardedResult{Code: protocol.CodeInternal, Message: "the database's owner did not answer; reconnect"})
		}
		return nil
	}
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	for i, r := range reqs {
		res := res[i]
		f := d.fol
		if res.Code != 0 || f == nil || f.files.Version() >= res.Version {
			r.answer(res)
			continue
		}
		r.s.inflight.Add(-int64(len(r.mutations)))
		f.acks = append(f.acks, heldAck{s: r.s, ack: protocol.Ack{LastMutationID: res.LastMutationID, Version: res.Version}, since: time.Now()})
	}
	return nil
}

// takeOver turns a followed database into an owned one, if this node can
// take its lease: the follower stops, its sessions are ended with a
// retryable code (they reconnect and catch up from the owner's file), and
// the authority opens through the LocalCache check, which takes the lease
// and restores the file from the log. If another node took the lease
// first, the database follows again. Runs on the writer.
func (d *database) takeOver(ctx context.Context) {
	f := d.following()
	if f == nil {
		d.retryStopped(ctx)
		return
	}
	// Only once the lease is free: a forward that found no owner while
	// the dead owner's lease runs out must not end every session here.
	hctx, cancel := context.WithTimeout(ctx, versionLogTimeout)
	holder, err := d.cfg.VersionLog.(Follower).Holder(hctx, d.name)
	cancel()
	if err != nil || holder != "" {
		return
	}
	f.stop()
	a := d.auth
	a.mu.Lock()
	defer a.mu.Unlock()
	for s := range d.subs {
		s.fail(protocol.CodeInternal, "this node takes the database over; reconnect")
	}
	d.subs = map[*session]struct{}{}
	d.failHeldAcksLocked(f, "this node takes the database over; reconnect")
	copyVersion := f.files.Version()
	f.close()
	d.fol = nil
	if copyVersion > 0 {
		// The copy is at (or near) the stream's tail, where the owner's
		// file of this node is as old as when it last owned the database:
		// open from the copy, and the open finds it fresh, or applies the
		// few versions after it, where it replayed the whole stream after
		// the last snapshot (1,100 to 3,000 versions, up to a second, in
		// TestClusterFailover). A copy that is not a version of the
		// stream is set aside and restored from the log as before.
		if err := adoptCopy(f.path, a.path); err != nil {
			d.log.Warn("could not start the owner's file from the follower's copy; restoring it from the log", "err", err)
		}
	}
	octx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	err = d.openChecked(octx, a)
	if errors.Is(err, ErrNotOwner) {
		if err = d.startFollowerLocked(octx, d.dir); err == nil {
			return
		}
	}
	if err != nil {
		a.broken = fmt.Errorf("server: take the database over: %w", err)
		d.stopped = true
		d.log.Warn("could not take the database over; it stays stopped until a Hello finds it can open", "err", err)
		return
	}
	if d.clog.last() != a.version {
		if err := d.refillLogLocked(octx, a.version); err != nil {
			a.broken = fmt.Errorf("server: take over: %w", err)
			return
		}
	}
	d.log.Info("took the database over", "version", a.version)
}

// openSnapshot opens a reader of the whole database for a new subscriber:
// the owner's file, pinned at its version, or a copy of a follower's copy.
func (d *database) openSnapshot(ctx context.Context) (*SnapshotReader, error) {
	d.auth.mu.Lock()
	f := d.fol
	if f != nil {
		defer d.auth.mu.Unlock()
		return f.snapshot()
	}
	d.auth.mu.Unlock()
	return d.auth.OpenSnapshot(ctx)
}

// owning returns the database's authority, or ErrNotOwner while it is
// followed: the administrative calls run only where it is owned.
func (d *database) owning() (*Authority, error) {
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	if d.fol != nil {
		return nil, fmt.Errorf("%w: %s is followed here", ErrNotOwner, d.name)
	}
	return d.auth, nil
}

// ServeForwarded runs pushes another node forwarded for db (its Follower
// sent them; Follower.Forward's other end), as if they had come from
// sessions here, and returns each one's answer. ErrNotOwner if this node
// follows db instead of owning it.
func (s *Server) ServeForwarded(ctx context.Context, db string, pushes []ForwardedPush) ([]ForwardedResult, error) {
	d, release, err := s.acquire(ctx, db)
	if err != nil {
		return nil, err
	}
	defer release()
	if _, err := d.owning(); err != nil {
		return nil, err
	}
	reqs := make([]pushRequest, len(pushes))
	for i := range pushes {
		p := &pushes[i]
		if p.ClientID == "" || len(p.ClientID) > 128 || p.UserID == "" {
			return nil, fmt.Errorf("server: forwarded push %d: client id %q, user %q", i, p.ClientID, p.UserID)
		}
		reqs[i] = pushRequest{mutations: p.Mutations, fwd: p, reply: make(chan ForwardedResult, 1)}
		if len(p.Mutations) == 0 {
			reqs[i].reply <- ForwardedResult{}
			continue
		}
		if err := d.push(ctx, reqs[i]); err != nil {
			return nil, err
		}
	}
	out := make([]ForwardedResult, len(reqs))
	for i, r := range reqs {
		select {
		case out[i] = <-r.reply:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return out, nil
}

// following returns the database's follower, nil while it is owned here.
func (d *database) following() *follower {
	d.auth.mu.Lock()
	defer d.auth.mu.Unlock()
	return d.fol
}

// waitFollowerReady waits, for a Hello from a client at version have,
// until a follower's copy holds a version, and at least have (at most
// followReadyWait, and no longer than ctx): a copy at version 0 has
// nothing to welcome a replica to, and one behind the client would tell it
// that the server's history is behind it, a fatal error, where the copy
// only lags: a node back on its directory with an old copy, or a copy a
// few versions behind the log while the client synced on a node further
// along (TestFollowerBehindAReplicaDoesNotStopIt, found by the chaos
// suite's cluster mode). A copy still behind after the wait is refused
// with a retryable error: the client tries again, or another node.
func (d *database) waitFollowerReady(ctx context.Context, have uint64) error {
	f := d.following()
	if f == nil {
		return nil
	}
	t := time.NewTimer(followReadyWait)
	defer t.Stop()
	select {
	case <-f.ready:
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return &protocol.RemoteError{Code: protocol.CodeInternal, Message: "this node has no copy of the database yet; retry"}
	}
	// Polled: the wait is rare (a client that moved onto a lagging copy),
	// and it keeps the apply path free of wake-up bookkeeping.
	tick := time.NewTicker(followCatchUpPoll)
	defer tick.Stop()
	for {
		d.auth.mu.Lock()
		v := f.files.Version()
		done := d.fol != f || v >= have
		d.auth.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return followerBehind(v, have)
		}
	}
}

// followerBehind is the retryable refusal of a Hello from a client ahead
// of this node's copy.
func followerBehind(v, have uint64) error {
	return &protocol.RemoteError{Code: protocol.CodeInternal, Message: fmt.Sprintf("this node's copy of the database (version %d) is behind the client (version %d); retry", v, have)}
}

// Limits of refilling the change log from the version log.
const (
	// refillVersions is how many versions before the database's an empty
	// change log is refilled with: replicas a fail-over moves to this
	// node are at most a few hundred versions behind the stream's tail
	// (TestClusterFailover: within 300 of it, at 9 replicas making 25
	// increments a second each).
	refillVersions = 1024
	// refillTimeout bounds a refill (it runs under auth.mu, and Hellos
	// wait for it): a restore read 581 versions in 0.3 s in
	// TestClusterFailover the same way (direct gets).
	refillTimeout = 2 * time.Second
)

// refillStart says where a refill of a change log whose last version is
// last (0: empty) begins, to end at version: after its own last version
// if that is at most refillVersions behind, else (reset: the log is
// emptied first) refillVersions before version. Pure.
func refillStart(last, version uint64) (after uint64, reset bool) {
	if last != 0 && last <= version && version-last <= refillVersions {
		return last, false
	}
	return version - min(version, refillVersions), last != 0
}

// refillLogLocked makes the change log end at version, the database's,
// where the version log can tell what came before it: it appends the
// stream's records from where refillStart says, so that the replicas that
// reconnect after a take-over or restore catch up from the log. Before,
// the log started afresh at version, and each of them was sent a snapshot
// of the whole database (TestClusterFailover: nine snapshots at every
// fail-over). Where the version log cannot (no cluster, a gap, a timeout),
// the log starts afresh, as before. Its error is only that of a reset.
// Called with auth.mu held.
func (d *database) refillLogLocked(ctx context.Context, version uint64) error {
	if fl, ok := d.cfg.VersionLog.(Follower); ok {
		after, reset := refillStart(d.clog.last(), version)
		if reset {
			if err := d.clog.reset(); err != nil {
				return fmt.Errorf("reset the change log: %w", err)
			}
		}
		if after >= version {
			return nil
		}
		err := d.refillFrom(ctx, fl, after, version)
		if err == nil {
			d.log.Info("continued the change log from the version log", "from", after+1, "to", version)
			return nil
		}
		d.log.Info("could not continue the change log from the version log; it starts afresh", "after", after, "version", version, "err", err)
	}
	if err := d.clog.reset(); err != nil {
		return fmt.Errorf("reset the change log: %w", err)
	}
	return nil
}

// refillFrom appends the version log's records of after+1..version to the
// change log.
func (d *database) refillFrom(ctx context.Context, fl Follower, after, version uint64) error {
	ctx, cancel := context.WithTimeout(ctx, refillTimeout)
	defer cancel()
	return fl.Versions(ctx, d.name, after, version, func(v uint64, rec []byte) error {
		if len(rec) < logPrefix {
			return fmt.Errorf("the record of version %d has %d bytes", v, len(rec))
		}
		return d.clog.append(v, rec, time.Now())
	})
}
