package cluster

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// LogConfig configures the version stream. Zero values take the defaults
// named.
type LogConfig struct {
	// Stream is the stream's name (DefaultStream).
	Stream string
	// Replicas is the stream's replication: 3 in a cluster (the Jepsen
	// analysis of NATS 2.12.1: R3 survives what R1 cannot), 1 on a single
	// node (1).
	Replicas int
}

// Log is the version stream: every database's versions, one subject each.
type Log struct {
	nc     *nats.Conn // forwarded pushes (forward.go) go over it
	js     jetstream.JetStream
	stream jetstream.Stream
	max    int64 // the connection's maximum payload
}

// Entry is one version in the log.
type Entry struct {
	Seq     uint64 // the message's stream sequence
	Version uint64 // the database version it holds
	Owner   string // the token of the Appender that wrote it
	Rec     []byte // the encoded version (protocol.EncodedVersion's binary form)
	msgID   string
}

// OpenLog creates the version stream, or updates its configuration, and
// returns it. A cluster answers only once its meta leader is elected, so it
// retries until ctx ends.
func OpenLog(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, cfg LogConfig) (*Log, error) {
	if cfg.Stream == "" {
		cfg.Stream = DefaultStream
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	scfg := jetstream.StreamConfig{
		Name:        cfg.Stream,
		Description: "sqlrebase: each database's versions on its own subject",
		Subjects:    []string{SubjectPrefix + ">"},
		Replicas:    cfg.Replicas,
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		// Versions go only when trimmed behind a snapshot (TrimBefore).
		MaxMsgs: -1, MaxBytes: -1, MaxAge: 0, MaxMsgsPerSubject: -1,
		Discard:    jetstream.DiscardNew,
		DenyDelete: true, // a hole in a subject would break the version chain
		Duplicates: 2 * time.Minute,
		// No direct gets: they may be answered by a follower that lags,
		// and the fence's tail must be the leader's.
		AllowDirect: false,
	}
	s, err := retry(ctx, func(ctx context.Context) (jetstream.Stream, error) {
		return js.CreateOrUpdateStream(ctx, scfg)
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: open stream %s: %w", cfg.Stream, err)
	}
	return &Log{nc: nc, js: js, stream: s, max: nc.MaxPayload()}, nil
}

// retry calls fn with a bounded context (2 s) until it succeeds, fails
// for good, or ctx ends. Every read of the stream goes through it: a
// request that the leader being replaced drops is never answered, and
// with the caller's own context (a restore's is 10 minutes) it waited that
// long (TestClusterFailover: a new owner's restore that never finished
// after the stream's leader moved under it, and no confirmation for 45 s).
func retry[T any](ctx context.Context, fn func(context.Context) (T, error)) (T, error) {
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		v, err := fn(actx)
		cancel()
		if err == nil || ctx.Err() != nil || !transient(err) {
			return v, err
		}
		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(apiRetry):
		}
	}
}

// transient reports whether an API error may go away by itself (no meta
// leader yet, no stream leader during an election, a timeout).
func transient(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		// 10008: JetStream is not ready in this cluster (no meta leader);
		// 503: temporarily unavailable.
		// 10005: no suitable peers for placement (the cluster's nodes have
		// not all reported to the meta leader yet, right after a start:
		// TestFailoverThreeNodes failed on it once in CI).
		return apiErr.ErrorCode == codeClusterNotAvailable || apiErr.ErrorCode == codeNoPeers || apiErr.Code == 503
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabled)
}

// entry turns a stream message into an Entry, checking its headers.
func entry(m *jetstream.RawStreamMsg) (Entry, error) {
	v, err := strconv.ParseUint(m.Header.Get(headerVersion), 10, 64)
	if err != nil || v == 0 {
		return Entry{}, fmt.Errorf("%w: %s seq %d", ErrBadEntry, m.Subject, m.Sequence)
	}
	return Entry{Seq: m.Sequence, Version: v, Owner: m.Header.Get(headerOwner), Rec: m.Data, msgID: m.Header.Get(jetstream.MsgIDHeader)}, nil
}

// Last is the last entry on db's subject; the zero Entry if it has none.
func (l *Log) Last(ctx context.Context, db string) (Entry, error) {
	m, err := retry(ctx, func(ctx context.Context) (*jetstream.RawStreamMsg, error) {
		return l.stream.GetLastMsgForSubject(ctx, Subject(db))
	})
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return Entry{}, nil
	}
	if err != nil {
		return Entry{}, fmt.Errorf("cluster: last version of %s: %w", db, err)
	}
	return entry(m)
}

// Read returns db's entries at stream sequence from or after, in order, at
// most max of them (fewer at the end of the subject).
func (l *Log) Read(ctx context.Context, db string, from uint64, max int) ([]Entry, error) {
	subj := Subject(db)
	var out []Entry
	for len(out) < max {
		m, err := retry(ctx, func(ctx context.Context) (*jetstream.RawStreamMsg, error) {
			return l.stream.GetMsg(ctx, max64(from, 1), jetstream.WithGetMsgSubject(subj))
		})
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return out, fmt.Errorf("cluster: read %s from seq %d: %w", db, from, err)
		}
		e, err := entry(m)
		if err != nil {
			return out, err
		}
		out = append(out, e)
		from = m.Sequence + 1
	}
	return out, nil
}

func max64(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// TrimBefore removes db's entries before stream sequence seq, keeping the
// entry at seq. Call it only with the sequence of a snapshot that is
// stored (Snapshots.Put returned): the entries behind a snapshot are what
// a new owner no longer needs. The subject's last entry is never removed,
// so the fence, which compares with it, keeps working.
func (l *Log) TrimBefore(ctx context.Context, db string, seq uint64) error {
	last, err := l.Last(ctx, db)
	if err != nil {
		return err
	}
	if seq > last.Seq {
		seq = last.Seq
	}
	if seq <= 1 {
		return nil
	}
	if err := l.stream.Purge(ctx, jetstream.WithPurgeSubject(Subject(db)), jetstream.WithPurgeSequence(seq)); err != nil {
		return fmt.Errorf("cluster: trim %s before seq %d: %w", db, seq, err)
	}
	return nil
}

// Appender is one owner's writer to one database's subject. Every append
// carries Nats-Expected-Last-Subject-Sequence, the subject's last sequence
// as this Appender knows it: JetStream refuses the append if anyone else
// wrote since, and that refusal is the fence (docs/CLUSTER.md). After any
// failed append the Appender refuses all later ones: the owner reopens the
// database from the stream and makes a new one.
type Appender struct {
	log     *Log
	db      string
	subject string
	owner   string

	mu          sync.Mutex // serialises appends: one at a time per subject
	lastSeq     uint64
	lastVersion uint64
	err         error // sticky: ErrFenced or ErrAppendFailed
}

// NewAppender makes db's writer for the owner whose lease token is owner.
// It starts from the subject's current last entry.
func (l *Log) NewAppender(ctx context.Context, db, owner string) (*Appender, error) {
	last, err := l.Last(ctx, db)
	if err != nil {
		return nil, err
	}
	return &Appender{log: l, db: db, subject: Subject(db), owner: owner, lastSeq: last.Seq, lastVersion: last.Version}, nil
}

// Last returns the stream sequence and version of the last entry this
// Appender knows of (0, 0: none).
func (a *Appender) Last() (seq, version uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lastSeq, a.lastVersion
}

// Err is the error that stopped the Appender, nil while it works.
func (a *Appender) Err() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.err
}

// Append writes version's encoded record and returns its stream sequence
// once JetStream has acknowledged it (on a replicated stream: stored on a
// quorum). version must follow the last one (any version on an empty
// subject). Only after Append returns nil may the version be acknowledged
// to clients or broadcast.
func (a *Appender) Append(ctx context.Context, version uint64, rec []byte) (uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.err != nil {
		return 0, a.err
	}
	if a.lastSeq != 0 && version != a.lastVersion+1 {
		return 0, fmt.Errorf("%w: %s: version %d after %d", ErrVersionOrder, a.db, version, a.lastVersion)
	}
	if a.log.max > 0 && int64(len(rec)) > a.log.max-1024 {
		return 0, fmt.Errorf("%w: %s version %d is %d bytes (max payload %d)", ErrTooLarge, a.db, version, len(rec), a.log.max)
	}
	id := fmt.Sprintf("%s/%d/%s", a.db, version, a.owner)
	seq, err := a.publish(ctx, version, rec, id)
	if err != nil && isWrongLastSeq(err) {
		// Re-read the tail before calling it a fence: on R3 a correct
		// expected sequence is now and then refused with 10164
		// (RESEARCH.md: 30 in 100,000).
		seq, err = a.resolve(ctx, version, rec, id, err)
	}
	if err != nil {
		if !errors.Is(err, ErrFenced) {
			err = fmt.Errorf("%w: %s version %d: %w", ErrAppendFailed, a.db, version, err)
		}
		a.err = err
		return 0, err
	}
	a.lastSeq, a.lastVersion = seq, version
	return seq, nil
}

// publish sends the version, fenced, and waits for its acknowledgement,
// sending it again every appendAttempt without one (retryPublish) until
// ctx ends. A publish in flight when the stream's leader dies is never
// answered: the leader that would have answered is gone, and the one
// elected after it (4 to 9 s later: nats-server's fixed Raft election
// timeout) never saw it. Waiting out ctx on that one message held the
// owner's writer for the whole version log timeout (10 s) and then dropped
// the database (TestClusterFailover: a confirmation 10.4 s after the kill
// of a node that was not the owner but led the stream). Sent again with
// the same Nats-Msg-Id and the same expected last subject sequence, it
// cannot land twice: JetStream checks the id against its duplicate window
// before the sequence, and answers a duplicate with the first one's
// sequence (TestAppendRidesOutTheStreamLeadersDeath).
func (a *Appender) publish(ctx context.Context, version uint64, rec []byte, id string) (uint64, error) {
	m := &nats.Msg{Subject: a.subject, Data: rec, Header: nats.Header{}}
	m.Header.Set(headerVersion, strconv.FormatUint(version, 10))
	m.Header.Set(headerOwner, a.owner)
	for {
		actx, cancel := context.WithTimeout(ctx, appendAttempt)
		ack, err := a.log.js.PublishMsg(actx, m, jetstream.WithMsgID(id), jetstream.WithExpectLastSequencePerSubject(a.lastSeq))
		cancel()
		if err == nil {
			return ack.Sequence, nil
		}
		if ctx.Err() != nil || !retryPublish(err) {
			return 0, err
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			// Refused at once (no leader to answer yet): pause, as an
			// attempt that timed out has.
			select {
			case <-ctx.Done():
				return 0, err
			case <-time.After(apiRetry):
			}
		}
	}
}

// retryPublish reports whether a publish that failed with err may be sent
// again: no answer within the attempt, no responder (no leader yet), or
// JetStream's "temporarily unavailable", or "duplicate message id is in
// process" (an earlier attempt is being stored: the next one is answered
// with its sequence). A refusal (a wrong last sequence, a message too
// large) is an answer, and final.
func retryPublish(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode == codeClusterNotAvailable || apiErr.ErrorCode == codeDuplicateInProcess
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse)
}

// resolve decides a wrong-last-sequence refusal by the subject's tail: our
// own message there means an earlier attempt landed; the tail where we
// expected it means a spurious refusal (retried once, with the same id, so
// it cannot write twice); anything else is a fence.
func (a *Appender) resolve(ctx context.Context, version uint64, rec []byte, id string, cause error) (uint64, error) {
	last, err := a.log.Last(ctx, a.db)
	if err != nil {
		return 0, fmt.Errorf("%w (and reading the tail: %w)", cause, err)
	}
	switch {
	case last.msgID == id:
		return last.Seq, nil
	case last.Seq == a.lastSeq:
		seq, err := a.publish(ctx, version, rec, id)
		if err != nil && isWrongLastSeq(err) {
			return 0, fmt.Errorf("%w: %s: refused twice at seq %d: %w", ErrFenced, a.db, a.lastSeq, err)
		}
		return seq, err
	default:
		return 0, fmt.Errorf("%w: %s: expected last seq %d, the subject is at %d (version %d by %q)",
			ErrFenced, a.db, a.lastSeq, last.Seq, last.Version, last.Owner)
	}
}

// isWrongLastSeq reports whether err is JetStream's refusal of an expected
// last sequence: 10071, or 10164 from a replicated stream.
func isWrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}
