package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// Errors and limits of the tenant registry.
var (
	// ErrBusy is a database that could not be opened because the server
	// holds Config.MaxOpenDatabases open and none of them became idle
	// within Config.OpenWait. Clients are told protocol.CodeBusy and
	// retry.
	ErrBusy = errors.New("server: too many databases open and none idle; retry later")
	// ErrClosed is a call on a closed server.
	ErrClosed = errors.New("server: closed")
)

// Defaults of the registry's Config fields.
const (
	defaultIdleClose        = 5 * time.Minute
	defaultMaxOpenDatabases = 1_000
	defaultOpenWait         = 2 * time.Second
)

// tenant is one hosted database as the registry knows it. Closed, it is its
// name, its directory and (once someone asked) its credentials: no
// goroutine, no open file. Open, it also has its database.
type tenant struct {
	name, dir string

	accessMu sync.Mutex
	access   *access // loaded on first need (a Hello, AddDatabase), then kept

	mu    sync.Mutex
	life  life
	db    *database     // set while open or closing
	ready chan struct{} // closed when the current opening or closing ends
	err   error         // the last opening's error, for those who waited on it
	timer *time.Timer   // the idle timer, while idle
}

// credentials returns the tenant's access, read from the access store
// with load the first time.
func (t *tenant) credentials(load func(*tenant) (*access, error)) (*access, error) {
	t.accessMu.Lock()
	defer t.accessMu.Unlock()
	if t.access == nil {
		a, err := load(t)
		if err != nil {
			return nil, fmt.Errorf("database %s: %w", t.name, err)
		}
		t.access = a
	}
	return t.access, nil
}

// loadedAccess returns the tenant's access if it was read (nil if not:
// whoever needs it first reads the store's latest record). A record the
// store reports changed is stored there before it reports it, so of a
// report and a first read racing, one of the two sees the change.
func (t *tenant) loadedAccess() *access {
	t.accessMu.Lock()
	defer t.accessMu.Unlock()
	return t.access
}

// registry is the set of hosted databases and which of them are open. It
// opens a database on first use, closes it once it has been idle for
// IdleClose, and keeps at most MaxOpen open, closing the least recently
// used idle one to make room.
//
// Lock order: registry.mu, then tenant.mu (never the other way: a tenant's
// lock is dropped before the registry's is taken), then database locks
// (auth.mu), which are never taken under either of the first two: opening
// and closing a database (files, the writer goroutine, auth.mu) run with
// no registry lock held. tenant.accessMu is a leaf.
type registry struct {
	log       *slog.Logger
	idleClose time.Duration // <0: never
	maxOpen   int           // <=0: no bound
	openWait  time.Duration

	// open and close do the I/O; busy says whether a database still has
	// work queued (it is then not idle). Tests replace them.
	openDB  func(ctx context.Context, t *tenant) (*database, error)
	closeDB func(d *database) error
	busy    func(d *database) bool

	mu        sync.Mutex
	tenants   map[string]*tenant
	open      map[*tenant]struct{} // tenants holding a slot: opening, open or closing
	slotFreed chan struct{}        // closed (and replaced) when a slot frees or a tenant becomes idle
	closed    bool
}

func newRegistry(log *slog.Logger, cfg *Config) *registry {
	return &registry{
		log: log, idleClose: cfg.IdleClose, maxOpen: cfg.MaxOpenDatabases, openWait: cfg.OpenWait,
		tenants: map[string]*tenant{}, open: map[*tenant]struct{}{}, slotFreed: make(chan struct{}),
		busy: func(d *database) bool { return d.pending.Load() > 0 },
	}
}

// add registers a tenant (idempotent) and returns it.
func (r *registry) add(name, dir string) (*tenant, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	t := r.tenants[name]
	if t == nil {
		t = &tenant{name: name, dir: dir}
		r.tenants[name] = t
	}
	return t, nil
}

func (r *registry) lookup(name string) *tenant {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.tenants[name]
}

func (r *registry) names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	names := make([]string, 0, len(r.tenants))
	for n := range r.tenants {
		names = append(names, n)
	}
	return names
}

// counts returns how many databases are hosted and how many are open
// (opening and closing ones included: they hold files).
func (r *registry) counts() (hosted, open int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.tenants), len(r.open)
}

// signal wakes those waiting for a slot. Called with r.mu held.
func (r *registry) signal() {
	close(r.slotFreed)
	r.slotFreed = make(chan struct{})
}

// acquire returns t's database, open, with a reference the caller gives
// back with release (once). Two acquirers of a closed database open it
// once; an acquirer during a close waits for it and opens the database
// again.
func (r *registry) acquire(ctx context.Context, t *tenant) (*database, error) {
	for {
		t.mu.Lock()
		switch t.life.acquire() {
		case stepUse:
			if t.timer != nil {
				t.timer.Stop()
				t.timer = nil
			}
			d := t.db
			t.mu.Unlock()
			return d, nil
		case stepWait:
			ch := t.ready
			opening := t.life.state == tOpening
			t.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if opening {
				// The opening this caller waited on failed: say why,
				// rather than each waiter opening again in turn.
				t.mu.Lock()
				err := t.err
				failed := t.life.state == tClosed
				t.mu.Unlock()
				if failed && err != nil {
					return nil, err
				}
			}
		case stepOpen:
			t.ready, t.err = make(chan struct{}), nil
			t.mu.Unlock()
			return r.openTenant(ctx, t)
		}
	}
}

// openTenant opens t, claimed by this caller (state opening), once a slot
// is free.
func (r *registry) openTenant(ctx context.Context, t *tenant) (*database, error) {
	err := r.takeSlot(ctx, t)
	var d *database
	if err == nil {
		// Not the caller's context: others may wait on this opening,
		// and one of them giving up must not fail it for the rest.
		d, err = r.openDB(context.WithoutCancel(ctx), t)
		if err != nil {
			r.freeSlot(t)
		}
	}
	t.mu.Lock()
	t.life.opened(err == nil, time.Now())
	t.db, t.err = d, err
	close(t.ready)
	t.mu.Unlock()
	return d, err
}

// takeSlot waits until t may hold an open database: fewer than maxOpen are
// open, or an idle one was closed to make room. It gives up with ErrBusy
// after openWait.
func (r *registry) takeSlot(ctx context.Context, t *tenant) error {
	var deadline <-chan time.Time
	for {
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			return ErrClosed
		}
		if r.maxOpen <= 0 || len(r.open) < r.maxOpen {
			r.open[t] = struct{}{}
			r.mu.Unlock()
			return nil
		}
		v := r.victimLocked()
		wake := r.slotFreed
		r.mu.Unlock()
		if v != nil {
			// Closed outside the registry's lock; the slot it frees
			// is taken in the next round (by this caller or another).
			r.closeTenant(v)
			continue
		}
		if deadline == nil {
			tm := time.NewTimer(r.openWait)
			defer tm.Stop()
			deadline = tm.C
		}
		select {
		case <-wake:
		case <-deadline:
			return ErrBusy
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// victimLocked picks the least recently used idle open tenant and moves it
// to closing, or returns nil if none is idle. Called with r.mu held.
func (r *registry) victimLocked() *tenant {
	for {
		ts := make([]*tenant, 0, len(r.open))
		cands := make([]victim, 0, len(r.open))
		for t := range r.open {
			t.mu.Lock()
			cands = append(cands, victim{idle: t.db != nil && t.life.idle(r.busy(t.db)), idleSince: t.life.idleSince})
			t.mu.Unlock()
			ts = append(ts, t)
		}
		i := pickVictim(cands)
		if i < 0 {
			return nil
		}
		v := ts[i]
		v.mu.Lock()
		ok := v.startClosingLocked(r)
		v.mu.Unlock()
		if ok {
			return v
		}
		// Acquired between the look and now: look again.
	}
}

// startClosingLocked moves t to closing if it is idle. Called with t.mu
// held.
func (t *tenant) startClosingLocked(r *registry) bool {
	if t.db == nil || !t.life.startClose(r.busy(t.db)) {
		return false
	}
	t.ready = make(chan struct{})
	if t.timer != nil {
		t.timer.Stop()
		t.timer = nil
	}
	return true
}

// closeTenant closes t, which the caller moved to closing, and frees its
// slot.
func (r *registry) closeTenant(t *tenant) {
	t.mu.Lock()
	d := t.db
	t.mu.Unlock()
	if err := r.closeDB(d); err != nil {
		r.log.Error("close idle database", "db", t.name, "err", err)
	} else {
		r.log.Debug("closed idle database", "db", t.name)
	}
	t.mu.Lock()
	t.life.closed()
	t.db = nil
	close(t.ready)
	t.mu.Unlock()
	r.freeSlot(t)
}

func (r *registry) freeSlot(t *tenant) {
	r.mu.Lock()
	delete(r.open, t)
	r.signal()
	r.mu.Unlock()
}

// release gives back a reference acquire returned. The last one arms the
// idle timer.
func (r *registry) release(t *tenant) {
	t.mu.Lock()
	idle := t.life.release(time.Now())
	if idle && r.idleClose >= 0 {
		gen := t.life.gen
		t.timer = time.AfterFunc(r.idleClose, func() { r.idleTimer(t, gen) })
	}
	t.mu.Unlock()
	if idle {
		// Someone waiting for a slot may now close this one.
		r.mu.Lock()
		r.signal()
		r.mu.Unlock()
	}
}

// idleTimer closes t if it is still idle since the timer of gen was armed.
// A database with pushes still queued is looked at again later.
func (r *registry) idleTimer(t *tenant, gen uint64) {
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return
	}
	t.mu.Lock()
	if t.life.gen != gen || t.life.state != tOpen {
		t.mu.Unlock()
		return
	}
	if t.db != nil && r.busy(t.db) {
		t.timer = time.AfterFunc(r.idleClose, func() { r.idleTimer(t, gen) })
		t.mu.Unlock()
		return
	}
	ok := t.life.idleFor(gen, r.idleClose, false, time.Now()) && t.startClosingLocked(r)
	t.mu.Unlock()
	if ok {
		r.closeTenant(t)
	}
}

// pin acquires t and keeps it open until the registry closes.
func (r *registry) pin(ctx context.Context, t *tenant) (*database, error) {
	d, err := r.acquire(ctx, t)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	t.life.pin()
	t.mu.Unlock()
	r.release(t)
	return d, nil
}

// openDatabases returns the databases open now.
func (r *registry) openDatabases() []*database {
	r.mu.Lock()
	defer r.mu.Unlock()
	var dbs []*database
	for t := range r.open {
		t.mu.Lock()
		if t.life.state == tOpen {
			dbs = append(dbs, t.db)
		}
		t.mu.Unlock()
	}
	return dbs
}

// closeAll closes every open database, held or not, and refuses further
// opens. Openings under way finish first.
func (r *registry) closeAll() error {
	r.mu.Lock()
	r.closed = true
	ts := make([]*tenant, 0, len(r.open))
	for t := range r.open {
		ts = append(ts, t)
	}
	r.mu.Unlock()
	var errs []error
	for _, t := range ts {
		for {
			t.mu.Lock()
			if t.timer != nil {
				t.timer.Stop()
				t.timer = nil
			}
			if t.life.state == tOpening || t.life.state == tClosing {
				ch := t.ready
				t.mu.Unlock()
				<-ch
				continue
			}
			d := t.db
			ok := t.life.forceClose()
			if ok {
				t.ready = make(chan struct{})
			}
			t.mu.Unlock()
			if ok {
				errs = append(errs, r.closeDB(d))
				t.mu.Lock()
				t.life.closed()
				t.db = nil
				close(t.ready)
				t.mu.Unlock()
			}
			break
		}
	}
	r.mu.Lock()
	r.open = map[*tenant]struct{}{}
	r.signal()
	r.mu.Unlock()
	return errors.Join(errs...)
}

// heldDatabase is an open database, the hold on it that keeps it open, and
// who the session that holds it speaks for.
type heldDatabase struct {
	d        *database
	release  func()
	identity Identity
	access   *access // the database's access file, to check revocation after subscribing
}

// errRateLimited is a Hello from an address over its failure budget,
// refused before its credential was checked.
var errRateLimited = errors.New("too many failed credential checks from this address")

// admitDatabase checks a Hello's database and credential and then opens
// the database (in that order: a wrong credential opens nothing). An
// unknown database is refused first; then the authenticator runs, with no
// server, tenant or access lock held; then the client id is bound to the
// identity's user. Refusals are *protocol.RemoteError.
func (s *Server) admitDatabase(ctx context.Context, h *protocol.Hello, remote net.Addr) (heldDatabase, error) {
	t := s.reg.lookup(h.Database)
	if t == nil {
		// Perhaps created on another node a moment ago.
		if t = s.refreshUnknown(ctx, h.Database, remote); t == nil {
			return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeUnknownDatabase, Message: fmt.Sprintf("no database named %q", h.Database)}
		}
	}
	a, err := t.credentials(s.openTenantAccess)
	if err != nil {
		return heldDatabase{}, err
	}
	req := AuthRequest{Database: h.Database, ClientID: h.ClientID, Credential: h.Credential, Remote: remote}
	id, err := s.authenticate(ctx, a, req)
	if errors.Is(err, errWrongCredential) && s.refreshAccess(ctx, t, a) {
		// Perhaps added or rotated on another node a moment ago.
		id, err = s.authenticate(ctx, a, req)
	}
	var ae *AuthError
	switch {
	case errors.Is(err, errRateLimited):
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeRateLimited, Message: fmt.Sprintf("%v; retry later", err)}
	case errors.Is(err, errWrongCredential):
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeUnauthorized, Message: fmt.Sprintf("wrong credential for database %q", h.Database)}
	case errors.As(err, &ae) && ae.Expired:
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeCredentialExpired, Message: ae.Reason}
	case ae != nil:
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeUnauthorized, Message: ae.Reason}
	case err != nil:
		return heldDatabase{}, fmt.Errorf("authenticate %s for %s: %w", h.ClientID, h.Database, err)
	}
	if id.UserID == "" {
		return heldDatabase{}, fmt.Errorf("authenticate %s for %s: the authenticator returned no UserID", h.ClientID, h.Database)
	}
	if !id.Expires.IsZero() && !time.Now().Before(id.Expires) {
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeCredentialExpired, Message: "credential expired"}
	}
	if why := a.revokedReason(id); why != "" {
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeUnauthorized, Message: fmt.Sprintf("%s for database %q", why, h.Database)}
	}
	switch err := a.bind(h.ClientID, id.UserID); {
	case errors.Is(err, errClientBound):
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeUnauthorized, Message: fmt.Sprintf("client id %s belongs to another user", h.ClientID)}
	case err != nil:
		return heldDatabase{}, err
	}
	d, release, err := s.acquire(ctx, h.Database)
	switch {
	case errors.Is(err, ErrBusy):
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeBusy, Message: fmt.Sprintf("database %q cannot be opened now: %d databases are open and none is idle; retry later", h.Database, s.cfg.MaxOpenDatabases)}
	case errors.Is(err, ErrClosed):
		return heldDatabase{}, &protocol.RemoteError{Code: protocol.CodeShuttingDown, Message: "the server is shutting down"}
	case err != nil:
		return heldDatabase{}, err
	}
	return heldDatabase{d: d, release: release, identity: id, access: a}, nil
}

// authenticate runs the configured authenticator, or the database's
// secrets, under the failed-check limiter. A secret already verified
// passes without the limiter (it costs nothing to check); any other check
// needs its address to be within its failure budget.
func (s *Server) authenticate(ctx context.Context, a *access, req AuthRequest) (Identity, error) {
	if s.cfg.Authenticator == nil {
		if c, ok := a.cached(req.Credential); ok {
			return c.identity(), nil
		}
	}
	done, ok := s.limiter.take(req.Remote)
	if !ok {
		return Identity{}, errRateLimited
	}
	var id Identity
	var err error
	if s.cfg.Authenticator == nil {
		var c credential
		if c, err = a.check(req.Credential); err == nil {
			id = c.identity()
		}
	} else {
		id, err = s.cfg.Authenticator.Authenticate(ctx, req)
	}
	var ae *AuthError
	done(!errors.Is(err, errWrongCredential) && !errors.As(err, &ae))
	return id, err
}
