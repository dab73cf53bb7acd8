package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"
)

// AccessRecord is one database's access record as an AccessStore holds
// it: the JSON of access.json (credentials, client bindings, revocations)
// and the store's revision of it.
type AccessRecord struct {
	// Value is the record's JSON; nil: the database has no record yet
	// (no credential, no binding).
	Value []byte
	// Revision orders a database's records: a later record has a higher
	// revision (0: none yet). Save takes the revision its change was
	// made on, so that a change made on a stale copy is refused.
	Revision uint64
}

// AccessStore is where a server keeps the databases it hosts and each
// one's access record (nil Config.AccessStore: a directory per database
// under Dir/dbs, holding access.json). The cluster package's store is a
// replicated KV bucket, so that every node of a cluster knows every
// database and sees a credential added or revoked on any of them.
//
// The server reads a record once, when it first needs the database's
// credentials, and then keeps it in memory, updated by its own changes
// and by Watch: no Hello waits for the store.
type AccessStore interface {
	// Databases lists the databases the store holds.
	Databases(ctx context.Context) ([]string, error)
	// Create registers db (idempotent: a database that exists keeps its
	// record).
	Create(ctx context.Context, db string) error
	// Load returns db's record as the store knows it.
	Load(ctx context.Context, db string) (AccessRecord, error)
	// Save replaces db's record with value if the record's revision is
	// still rev, and returns the new revision. If another change came
	// first it returns an *AccessConflictError holding the record as it
	// is now; the server applies its change to that one and saves again.
	Save(ctx context.Context, db string, value []byte, rev uint64) (uint64, error)
	// Watch calls fn with every record that changes in the store from now
	// on (made by this server or another), one call at a time, and with
	// every database created; a store that only this server writes may
	// never call it. The returned func stops the calls.
	Watch(fn func(db string, rec AccessRecord)) (stop func())
}

// AccessRefresher is an AccessStore that can read a record afresh, past
// the copy its watch keeps (a round trip). A server asks it only before it
// refuses a Hello, for a database it does not know or a secret that
// matches nothing, so that what another node has just changed is not
// refused for the watch's lag; such Hellos pass the failed-check limiter.
type AccessRefresher interface {
	// Refresh returns db's record as the store holds it now
	// (ErrUnknownDatabase if it holds none).
	Refresh(ctx context.Context, db string) (AccessRecord, error)
}

// ErrAccessConflict is the error of an AccessStore.Save whose revision is
// no longer the record's: another change was saved first.
var ErrAccessConflict = errors.New("server: the access record changed meanwhile")

// AccessConflictError is the error of a Save that lost a race: Current is
// the record as the change that won left it.
type AccessConflictError struct {
	Current AccessRecord
}

func (e *AccessConflictError) Error() string {
	return fmt.Sprintf("%v (now at revision %d)", ErrAccessConflict, e.Current.Revision)
}

// Unwrap makes errors.Is(err, ErrAccessConflict) hold.
func (e *AccessConflictError) Unwrap() error { return ErrAccessConflict }

// storeTimeout bounds one change's calls to the access store: a KV write
// in a cluster rides out a stream leader election (a median 4.7 s,
// RESEARCH.md), the same bound as a version's append.
const storeTimeout = 10 * time.Second

// maxAccessRetries bounds how often a change is applied afresh after
// losing a race: each loss means another change was saved, so a change
// retried this often is in a storm of admin calls, and is refused rather
// than spin.
const maxAccessRetries = 16

// CheckAccessRecord says whether value is an access record a server can
// load (a JSON object of the access file's shape), so that a store can
// refuse a corrupt value instead of replacing a good copy with it.
func CheckAccessRecord(value []byte) error {
	_, err := decodeAccess(value)
	return err
}

// decodeAccess reads an access record. nil is no record (empty: no
// credentials yet); anything else must be a JSON object of the record's
// shape. A JSON null or an empty value is corrupt, not empty: taking
// either for an empty record would forget the revocations.
func decodeAccess(value []byte) (accessFile, error) {
	var f accessFile
	if value != nil {
		if b := bytes.TrimSpace(value); len(b) == 0 || b[0] != '{' {
			return accessFile{}, errors.New("access record is not a JSON object")
		}
		if err := json.Unmarshal(value, &f); err != nil {
			return accessFile{}, fmt.Errorf("access record: %w", err)
		}
	}
	if f.Clients == nil {
		f.Clients = map[string]string{}
	}
	return f, nil
}

// encodeAccess is the record's JSON, as access.json and the cluster's KV
// bucket hold it.
func encodeAccess(f *accessFile) ([]byte, error) {
	return json.MarshalIndent(f, "", "  ")
}

// recordStore is one database's record in a store: what an access loads
// and saves.
type recordStore interface {
	load(ctx context.Context) (AccessRecord, error)
	save(ctx context.Context, value []byte, rev uint64) (uint64, error)
}

// storeRecord is database db's record in an AccessStore.
type storeRecord struct {
	store AccessStore
	db    string
}

func (r storeRecord) load(ctx context.Context) (AccessRecord, error) {
	return r.store.Load(ctx, r.db)
}

func (r storeRecord) save(ctx context.Context, value []byte, rev uint64) (uint64, error) {
	return r.store.Save(ctx, r.db, value, rev)
}

// fileRecord is an access file. It has no revision of its own: one
// server writes it, one change at a time, so its saves never conflict.
type fileRecord string

func (p fileRecord) load(context.Context) (AccessRecord, error) {
	b, err := os.ReadFile(string(p))
	if errors.Is(err, fs.ErrNotExist) {
		return AccessRecord{}, nil
	}
	if err != nil {
		return AccessRecord{}, fmt.Errorf("access: %w", err)
	}
	if b == nil {
		b = []byte{} // an empty file is a corrupt record, not none
	}
	return AccessRecord{Value: b}, nil
}

// save writes value atomically (temporary file, fsync, rename).
func (p fileRecord) save(_ context.Context, value []byte, rev uint64) (uint64, error) {
	path := string(p)
	tmp := path + ".tmp"
	fh, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, fmt.Errorf("access: %w", err)
	}
	_, err = fh.Write(value)
	if err == nil {
		err = fh.Sync()
	}
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return 0, fmt.Errorf("access: save %s: %w", path, err)
	}
	return rev + 1, nil
}

// fileAccessStore is the default AccessStore of a single server: a
// directory per database under dir (Dir/dbs), holding its access.json.
type fileAccessStore struct {
	dir string
}

func (s fileAccessStore) record(db string) fileRecord {
	return fileRecord(filepath.Join(s.dir, db, "access.json"))
}

// Databases lists the database directories under dir.
func (s fileAccessStore) Databases(context.Context) ([]string, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() && validName.MatchString(e.Name()) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Create makes db's directory.
func (s fileAccessStore) Create(_ context.Context, db string) error {
	if err := os.MkdirAll(filepath.Join(s.dir, db), 0o755); err != nil {
		return fmt.Errorf("server: add database %s: %w", db, err)
	}
	return nil
}

func (s fileAccessStore) Load(ctx context.Context, db string) (AccessRecord, error) {
	return s.record(db).load(ctx)
}

func (s fileAccessStore) Save(ctx context.Context, db string, value []byte, rev uint64) (uint64, error) {
	return s.record(db).save(ctx, value, rev)
}

// Watch never calls fn: only this server writes the files.
func (fileAccessStore) Watch(func(string, AccessRecord)) func() { return func() {} }

// openAccessStore starts watching the server's access store and
// registers the databases it holds (in that order, so that a database
// created between the two is not missed: registering is idempotent).
func (s *Server) openAccessStore(ctx context.Context) error {
	s.stopWatch = s.store.Watch(s.accessChanged)
	names, err := s.store.Databases(ctx)
	if err != nil {
		s.stopWatch()
		return err
	}
	for _, name := range names {
		if !validName.MatchString(name) {
			s.log.Warn("access store holds a database with an invalid name; ignored", "db", name)
			continue
		}
		if _, err := s.reg.add(name, s.dbDir(name)); err != nil {
			s.stopWatch()
			return err
		}
	}
	return nil
}

// dbDir is the directory of database name's local files.
func (s *Server) dbDir(name string) string { return filepath.Join(s.cfg.Dir, "dbs", name) }

// accessChanged is the store's report of a record that changed, here or
// on another node: the database becomes known, and if its credentials are
// in memory the new record replaces them (a corrupt one is logged and
// changes nothing) and the sessions it no longer admits end.
func (s *Server) accessChanged(db string, rec AccessRecord) {
	if !validName.MatchString(db) {
		s.log.Warn("access store changed a database with an invalid name; ignored", "db", db)
		return
	}
	t, err := s.reg.add(db, s.dbDir(db))
	if err != nil {
		return // closed
	}
	a := t.loadedAccess()
	if a == nil {
		return // loaded from the store when first needed
	}
	changed, err := a.apply(rec)
	if err != nil {
		s.log.Error("access record not applied; the copy in memory stays", "db", db, "revision", rec.Revision, "err", err)
		return
	}
	if changed {
		s.endRevoked(db, a)
	}
}

// openTenantAccess reads t's access record from the store.
func (s *Server) openTenantAccess(t *tenant) (*access, error) {
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	a, err := openAccess(ctx, storeRecord{s.store, t.name}, s.cfg.CredentialHashIterations)
	if err != nil {
		return nil, err
	}
	// A change saved here after losing a race carries the change that
	// won, which the watch then finds already applied: look at the
	// sessions here.
	a.onRemote = func() { s.endRevoked(t.name, a) }
	return a, nil
}

// refreshUnknown looks for a database the registry does not know in the
// store, past its watch's copy, and registers it if it is there (nil if
// not, or if the store cannot refresh or the address is over its
// failure budget: the Hello is refused as for an unknown database).
func (s *Server) refreshUnknown(ctx context.Context, db string, remote net.Addr) *tenant {
	r, ok := s.store.(AccessRefresher)
	if !ok || !validName.MatchString(db) {
		return nil
	}
	done, ok := s.limiter.take(remote)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	_, err := r.Refresh(ctx, db)
	done(err == nil)
	if err != nil {
		if !errors.Is(err, ErrUnknownDatabase) {
			s.log.Warn("refresh an unknown database's access record", "db", db, "err", err)
		}
		return nil
	}
	t, err := s.reg.add(db, s.dbDir(db))
	if err != nil {
		return nil
	}
	return t
}

// refreshAccess reads t's record afresh, past the store's watch, after a
// secret matched none of a's credentials, and reports whether the record
// changed (then the secret is worth checking again). A change found so
// is applied as the watch would apply it, sessions included.
func (s *Server) refreshAccess(ctx context.Context, t *tenant, a *access) bool {
	r, ok := s.store.(AccessRefresher)
	if !ok {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	rec, err := r.Refresh(ctx, t.name)
	if err != nil {
		s.log.Warn("refresh an access record", "db", t.name, "err", err)
		return false
	}
	changed, err := a.apply(rec)
	if err != nil {
		s.log.Error("access record not applied; the copy in memory stays", "db", t.name, "revision", rec.Revision, "err", err)
		return false
	}
	if changed {
		s.endRevoked(t.name, a)
	}
	return changed
}
