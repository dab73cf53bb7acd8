package mutators

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strings"
)

// The reserved tables live inside the replicated database so that the
// server's acknowledgements (which mutations of which client it has applied,
// which it rejected, and the database version) travel with the data they
// describe: a replica that receives a state also receives, atomically, the
// facts it needs to drop settled mutations from its pending queue. Only the
// server writes them; mutators must not touch them.
const (
	// ReservedPrefix starts the name of every reserved table. Matching is
	// case-insensitive because SQLite table names are.
	ReservedPrefix = "_sqlrebase_"
	// TableClients holds, per client, the id of the last mutation the server
	// has settled (applied or rejected).
	TableClients = ReservedPrefix + "clients"
	// TableRejections holds the error message of each rejected mutation and
	// the version at which it was rejected.
	TableRejections = ReservedPrefix + "rejections"
	// TableActivity holds, per client, when the server last took a push
	// from it (Unix seconds, rounded down to the hour so that a busy
	// client rewrites its row at most once an hour). The server collects
	// the records of clients away longer than its ClientTTL.
	TableActivity = ReservedPrefix + "client_activity"
	// TableMeta holds integer metadata; key 'version' is the database
	// version, raised by the server with every change it publishes.
	TableMeta = ReservedPrefix + "meta"
)

// ReservedSchema creates the reserved tables. It is idempotent, so the
// server can run it on every start.
const ReservedSchema = `CREATE TABLE IF NOT EXISTS ` + TableClients + ` (
	client_id TEXT PRIMARY KEY,
	last_mutation_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ` + TableRejections + ` (
	client_id TEXT NOT NULL,
	mutation_id INTEGER NOT NULL,
	name TEXT NOT NULL,
	error TEXT NOT NULL,
	version INTEGER NOT NULL,
	PRIMARY KEY (client_id, mutation_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ` + TableActivity + ` (
	client_id TEXT PRIMARY KEY,
	last_push INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ` + TableMeta + ` (
	key TEXT PRIMARY KEY,
	value INTEGER NOT NULL
);`

// versionKey is the TableMeta key of the database version.
const versionKey = "version"

// ErrOutOfRange is returned when a uint64 does not fit SQLite's signed
// 64-bit INTEGER, or a stored value is negative.
var ErrOutOfRange = errors.New("mutators: value out of range for SQLite INTEGER")

// IsReserved reports whether table names a reserved table (or would, if it
// existed): its name starts with [ReservedPrefix], ignoring case.
func IsReserved(table string) bool {
	return len(table) >= len(ReservedPrefix) && strings.EqualFold(table[:len(ReservedPrefix)], ReservedPrefix)
}

// Version returns the database version, 0 if it was never set. A replica
// at version 0 has an empty database without the reserved tables, so a
// missing table is not an error.
func Version(ctx context.Context, q Querier) (uint64, error) {
	var v int64
	err := q.QueryRowContext(ctx, `SELECT value FROM `+TableMeta+` WHERE key = ?`, versionKey).Scan(&v)
	if err != nil {
		if missing, merr := absent(ctx, q, TableMeta, err); missing {
			return 0, nil
		} else if merr != nil {
			return 0, fmt.Errorf("mutators: read version: %w", merr)
		}
	}
	if v < 0 {
		return 0, fmt.Errorf("mutators: read version: %d: %w", v, ErrOutOfRange)
	}
	return uint64(v), nil
}

// SetVersion sets the database version. The reserved tables must exist
// (see [ReservedSchema]).
func SetVersion(ctx context.Context, q Querier, v uint64) error {
	iv, err := toInt64(v)
	if err != nil {
		return fmt.Errorf("mutators: set version %d: %w", v, err)
	}
	_, err = q.ExecContext(ctx, `INSERT INTO `+TableMeta+`(key, value) VALUES (?, ?)
		ON CONFLICT(key) DO UPDATE SET value = excluded.value`, versionKey, iv)
	if err != nil {
		return fmt.Errorf("mutators: set version %d: %w", v, err)
	}
	return nil
}

// LastMutationID returns the id of clientID's last settled mutation, 0 if
// the server has settled none (or the reserved tables do not exist yet).
func LastMutationID(ctx context.Context, q Querier, clientID string) (uint64, error) {
	var id int64
	err := q.QueryRowContext(ctx, `SELECT last_mutation_id FROM `+TableClients+` WHERE client_id = ?`, clientID).Scan(&id)
	if err != nil {
		if missing, merr := absent(ctx, q, TableClients, err); missing {
			return 0, nil
		} else if merr != nil {
			return 0, fmt.Errorf("mutators: read last mutation id of %q: %w", clientID, merr)
		}
	}
	if id < 0 {
		return 0, fmt.Errorf("mutators: read last mutation id of %q: %d: %w", clientID, id, ErrOutOfRange)
	}
	return uint64(id), nil
}

// SetLastMutationID records id as clientID's last settled mutation
// (inserting or replacing). The reserved tables must exist.
func SetLastMutationID(ctx context.Context, q Querier, clientID string, id uint64) error {
	iv, err := toInt64(id)
	if err != nil {
		return fmt.Errorf("mutators: set last mutation id of %q to %d: %w", clientID, id, err)
	}
	_, err = q.ExecContext(ctx, `INSERT INTO `+TableClients+`(client_id, last_mutation_id) VALUES (?, ?)
		ON CONFLICT(client_id) DO UPDATE SET last_mutation_id = excluded.last_mutation_id`, clientID, iv)
	if err != nil {
		return fmt.Errorf("mutators: set last mutation id of %q to %d: %w", clientID, id, err)
	}
	return nil
}

// RecordRejection records that the server rejected clientID's mutation id
// (named name) with message msg at database version. Recording the same
// mutation again replaces the earlier entry, so a retried server
// transaction is harmless. The reserved tables must exist.
func RecordRejection(ctx context.Context, q Querier, clientID string, id uint64, name, msg string, version uint64) error {
	iid, err := toInt64(id)
	if err != nil {
		return fmt.Errorf("mutators: record rejection of %q/%d: %w", clientID, id, err)
	}
	iver, err := toInt64(version)
	if err != nil {
		return fmt.Errorf("mutators: record rejection of %q/%d at version %d: %w", clientID, id, version, err)
	}
	_, err = q.ExecContext(ctx, `INSERT INTO `+TableRejections+`(client_id, mutation_id, name, error, version)
		VALUES (?, ?, ?, ?, ?)
		ON CONFLICT(client_id, mutation_id) DO UPDATE SET
			name = excluded.name, error = excluded.error, version = excluded.version`,
		clientID, iid, name, msg, iver)
	if err != nil {
		return fmt.Errorf("mutators: record rejection of %q/%d: %w", clientID, id, err)
	}
	return nil
}

// Rejections returns the rejection messages of clientID's mutations with
// after < id <= upTo, keyed by mutation id. A replica calls it when a new
// state settles its mutations, to tell the app which of them failed. A
// missing table yields an empty map.
func Rejections(ctx context.Context, q Querier, clientID string, after, upTo uint64) (map[uint64]string, error) {
	out := make(map[uint64]string)
	if upTo <= after {
		return out, nil
	}
	// Clamp rather than fail: ids above MaxInt64 cannot be stored, so
	// there is nothing there to find.
	lo := clampInt64(after)
	hi := clampInt64(upTo)
	rows, err := q.QueryContext(ctx, `SELECT mutation_id, error FROM `+TableRejections+`
		WHERE client_id = ? AND mutation_id > ? AND mutation_id <= ? ORDER BY mutation_id`, clientID, lo, hi)
	if err != nil {
		if missing, _ := absent(ctx, q, TableRejections, err); missing {
			return out, nil
		}
		return nil, fmt.Errorf("mutators: read rejections of %q: %w", clientID, err)
	}
	defer rows.Close()
	for rows.Next() {
		var id int64
		var msg string
		if err := rows.Scan(&id, &msg); err != nil {
			return nil, fmt.Errorf("mutators: read rejections of %q: %w", clientID, err)
		}
		if id < 0 {
			return nil, fmt.Errorf("mutators: read rejections of %q: id %d: %w", clientID, id, ErrOutOfRange)
		}
		out[uint64(id)] = msg
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("mutators: read rejections of %q: %w", clientID, err)
	}
	return out, nil
}

// Settlement returns what LastMutationID and then Rejections(after, that
// id) return, in one statement and so one read transaction: a replica
// settling its mutations after a rebase asks for both, and the first
// statement after a drop pays for the read transaction (the wal-index and
// page 1 again). Missing reserved tables are answered as the two would.
func Settlement(ctx context.Context, q Querier, clientID string, after uint64) (lmid uint64, rejected map[uint64]string, err error) {
	rows, err := q.QueryContext(ctx, `SELECT c.last_mutation_id, r.mutation_id, r.error FROM `+TableClients+` AS c
		LEFT JOIN `+TableRejections+` AS r ON r.client_id = c.client_id AND r.mutation_id > ? AND r.mutation_id <= c.last_mutation_id
		WHERE c.client_id = ? ORDER BY r.mutation_id`, clampInt64(after), clientID)
	if err != nil {
		// A table is missing (or something else is wrong): the two
		// queries say which, as they always have.
		if lmid, err = LastMutationID(ctx, q, clientID); err != nil {
			return 0, nil, err
		}
		rejected, err = Rejections(ctx, q, clientID, after, lmid)
		return lmid, rejected, err
	}
	defer rows.Close()
	rejected = make(map[uint64]string)
	var id int64
	for rows.Next() {
		var mid sql.NullInt64
		var msg sql.NullString
		if err := rows.Scan(&id, &mid, &msg); err != nil {
			return 0, nil, fmt.Errorf("mutators: read settlement of %q: %w", clientID, err)
		}
		if id < 0 || (mid.Valid && mid.Int64 < 0) {
			return 0, nil, fmt.Errorf("mutators: read settlement of %q: id %d, rejected %d: %w", clientID, id, mid.Int64, ErrOutOfRange)
		}
		if mid.Valid {
			rejected[uint64(mid.Int64)] = msg.String
		}
	}
	if err := rows.Err(); err != nil {
		return 0, nil, fmt.Errorf("mutators: read settlement of %q: %w", clientID, err)
	}
	return uint64(id), rejected, nil
}

// ActivityGranularity is what TouchClient rounds a push time down to.
const ActivityGranularity = 3600 // seconds

// TouchClient records that the server took a push from clientID at unix
// (seconds). The time is rounded down to ActivityGranularity and only
// ever raised, so most calls write nothing. The reserved tables must exist.
func TouchClient(ctx context.Context, q Querier, clientID string, unix int64) error {
	t := unix - unix%ActivityGranularity
	_, err := q.ExecContext(ctx, `INSERT INTO `+TableActivity+`(client_id, last_push) VALUES (?, ?)
		ON CONFLICT(client_id) DO UPDATE SET last_push = excluded.last_push WHERE last_push < excluded.last_push`, clientID, t)
	if err != nil {
		return fmt.Errorf("mutators: record push time of %q: %w", clientID, err)
	}
	return nil
}

// CollectClients deletes the records (last mutation id, rejections,
// activity) of every client whose last push was before the unix time
// before, and returns how many clients it collected. A client with a
// record and no activity row (one from before activity was recorded) is
// given now as its last push first, so that it gets the whole time to
// come back. The reserved tables must exist.
func CollectClients(ctx context.Context, q Querier, now, before int64) (int, error) {
	if _, err := q.ExecContext(ctx, `INSERT OR IGNORE INTO `+TableActivity+`(client_id, last_push)
		SELECT client_id, ? FROM `+TableClients, now-now%ActivityGranularity); err != nil {
		return 0, fmt.Errorf("mutators: adopt clients without activity: %w", err)
	}
	gone := `SELECT client_id FROM ` + TableActivity + ` WHERE last_push < ?`
	for _, t := range []string{TableRejections, TableClients} {
		if _, err := q.ExecContext(ctx, `DELETE FROM `+t+` WHERE client_id IN (`+gone+`)`, before); err != nil {
			return 0, fmt.Errorf("mutators: collect %s: %w", t, err)
		}
	}
	res, err := q.ExecContext(ctx, `DELETE FROM `+TableActivity+` WHERE last_push < ?`, before)
	if err != nil {
		return 0, fmt.Errorf("mutators: collect %s: %w", TableActivity, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("mutators: collect %s: %w", TableActivity, err)
	}
	return int(n), nil
}

// HasActivityTable reports whether the database has TableActivity (one
// made before it existed lacks it until the server upgrades it).
func HasActivityTable(ctx context.Context, q Querier) (bool, error) {
	var n int
	if err := q.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?`, TableActivity).Scan(&n); err != nil {
		return false, fmt.Errorf("mutators: look for %s: %w", TableActivity, err)
	}
	return n > 0, nil
}

// absent interprets err from a statement on table: missing reports that
// the table does not exist (so the caller treats it as empty); otherwise
// the returned error is err itself, or nil if err was only "no rows". The
// table is looked up in sqlite_schema rather than by matching the error's
// text, which is not a stable interface.
func absent(ctx context.Context, q Querier, table string, err error) (missing bool, _ error) {
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	var n int
	serr := q.QueryRowContext(ctx,
		`SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ? COLLATE NOCASE`, table).Scan(&n)
	if serr != nil {
		return false, fmt.Errorf("%w (and checking for table %s: %v)", err, table, serr)
	}
	if n == 0 {
		return true, nil
	}
	return false, err
}

func toInt64(v uint64) (int64, error) {
	if v > math.MaxInt64 {
		return 0, ErrOutOfRange
	}
	return int64(v), nil
}

func clampInt64(v uint64) int64 {
	if v > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(v)
}

// Rejection returns the mutator name and error of clientID's mutation id
// if the server rejected it (ok), from the rejections table; ok is false
// if the table holds no such row (or does not exist yet).
func Rejection(ctx context.Context, q Querier, clientID string, id uint64) (name, msg string, ok bool, err error) {
	if id > math.MaxInt64 {
		return "", "", false, nil
	}
	err = q.QueryRowContext(ctx, `SELECT name, error FROM `+TableRejections+` WHERE client_id = ? AND mutation_id = ?`, clientID, int64(id)).Scan(&name, &msg)
	if err == nil {
		return name, msg, true, nil
	}
	// No such row (absent: nil), or no such table yet (missing): not rejected.
	if _, merr := absent(ctx, q, TableRejections, err); merr != nil {
		return "", "", false, fmt.Errorf("mutators: read the rejection of %q's mutation %d: %w", clientID, id, merr)
	}
	return "", "", false, nil
}
