package server

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/protocol"
)

// Config configures a Server. Zero values take the defaults named.
type Config struct {
	// Dir holds the databases (Dir/dbs/NAME/), the certificate and key.
	Dir string
	// Mutators is the app's registry: the same mutators its replicas run.
	Mutators *mutators.Registry
	// Setup creates the app's schema in a new database, as version 1.
	Setup func(ctx context.Context, tx mutators.Tx) error
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// OnBatch, if set, is called after each batch the writer of a database
	// ran, with the version it made (the current one if it made none) and
	// each mutation's outcome. It runs on the writer goroutine: keep it
	// short. Apps use it for metrics and audit logs, the demo for its
	// transcript.
	OnBatch func(db string, version uint64, results []Result)

	// CertFile and KeyFile name a certificate to present. Empty: a
	// self-signed one in Dir (created on first start), whose Fingerprint
	// replicas pin.
	CertFile, KeyFile string
	// Hosts are names and addresses a created certificate is made for.
	Hosts []string

	// MinAppVersion is the oldest app build (replica.Options.AppVersion)
	// this server syncs with (0: any, including clients that state none).
	// An older client is refused with a fatal "upgrade required" and keeps
	// its pending mutations for its upgraded build to push. Raise it in
	// the contract step of a migration, once no client needs the old
	// mutators or columns.
	MinAppVersion uint64

	// ClientTTL is how long after a client's last push the server keeps
	// its records (last mutation id, rejections) in the reserved tables
	// (0: DefaultClientTTL, 30 days; negative: forever). They are collected
	// in a batch, at most once per CollectEvery; a client that comes back
	// later stops with replica.ErrClientCollected.
	ClientTTL time.Duration
	// Now is the clock of push times and collections (nil: time.Now), for
	// tests.
	Now func() time.Time

	// Limits bound what clients may send (zero fields: protocol.DefaultLimits).
	Limits protocol.Limits
	// MaxInFlight bounds a client's pushed, unacknowledged mutations (10,000).
	MaxInFlight int
	// MaxConnsPerAddr bounds QUIC connections from one IP address (64).
	MaxConnsPerAddr int
	// GroupCommit is the most mutations one transaction takes (4,000).
	GroupCommit int
	// SessionQueue and SessionQueueBytes bound what may wait for one
	// client (1,024 items, 64 MiB); beyond, it is cut off as too slow.
	SessionQueue      int
	SessionQueueBytes int
	// MutatorTimeout bounds how long one mutator may run (5 s; negative:
	// no limit). Every client of a database waits while one of its
	// mutators runs; one past the limit is rejected with "time limit
	// exceeded" and the batch goes on.
	MutatorTimeout time.Duration
	// SelfCheck re-reads each database after every commit and compares it
	// with the checksum shipped to replicas (see Authority.Verify). Costly:
	// for debugging.
	SelfCheck bool
	// Retention bounds each change log (zero: DefaultRetention(), 256 MiB
	// or 7 days); segments roll every SegmentVersions versions (10,000)
	// or SegmentBytes bytes (64 MiB).
	Retention       Retention
	SegmentVersions int
	SegmentBytes    int64

	// IdleClose is how long a database stays open once nothing holds it
	// (no session, no queued push, no admin call) before it is closed and
	// costs only its name and credentials again (5 min; negative: never).
	// A database is opened on its first Hello or admin call.
	IdleClose time.Duration
	// MaxOpenDatabases bounds how many databases are open at once (1,000;
	// negative: no bound). To open one more, the least recently used idle
	// one is closed; if none is idle, a Hello waits up to OpenWait (2 s)
	// for one and is then refused with protocol.CodeBusy, which clients
	// retry.
	MaxOpenDatabases int
	OpenWait         time.Duration
	// CredentialHashIterations is the PBKDF2-SHA256 work factor of a
	// credential AddDatabase stores (100,000, about 20 ms a credential).
	// It guards weak, operator-chosen secrets against a stolen access
	// file; random tokens of 128 bits or more gain nothing from it, and
	// an operator adding thousands of databases with such tokens may
	// lower it. Stored credentials keep the factor they were made with.
	CredentialHashIterations int

	// Authenticator decides whether a Hello may open a database and as
	// whom (nil: the database's shared secrets, as AddDatabase and the
	// admin API store them, each secret's name its UserID). It runs with
	// no server lock held. Whatever it is, the server then binds the
	// client id to the UserID and refuses revoked users and credentials.
	Authenticator Authenticator
	// AuthFailureBurst and AuthFailureEvery bound failed credential
	// checks per client address (IPv4 address or IPv6 /64): an address
	// may fail AuthFailureBurst (10) checks in a row and earns one more
	// every AuthFailureEvery (1 s). Beyond, its Hellos are refused with
	// protocol.CodeRateLimited before any check runs, unless their
	// secret is one the server already verified.
	AuthFailureBurst int
	AuthFailureEvery time.Duration

	// AccessStore, if set, is where the databases and their credentials
	// are kept (nil: Dir/dbs/NAME/access.json). The cluster package's
	// store shares them between the nodes of a cluster.
	AccessStore AccessStore

	// VersionLog, if set, receives every version of every database before
	// it is acknowledged or sent to any replica (nil: a single node, whose
	// local change log is enough). The cluster package's implementation
	// appends to a replicated stream behind the database's lease. An
	// append that fails stops the database: its clients get a retryable
	// error, and it serves nothing more until it is reopened (at once, if
	// the VersionLog is a LocalCache that can restore it).
	VersionLog VersionLog

	// Metrics, if set, is where the server registers its Prometheus
	// collectors (see Server.Handler and the README's table). Series are
	// server-wide unless MetricsPerDatabase labels them "db": a label per
	// tenant grows the series count with the tenants.
	Metrics            prometheus.Registerer
	MetricsPerDatabase bool

	metrics *metrics // the collectors (always made; registered on Metrics)
	// writeTimeout is how long a session's write may stay blocked before
	// the client is cut off (zero: the writeTimeout constant); tests
	// shorten it.
	writeTimeout time.Duration
}

func (c *Config) defaults() {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	d := protocol.DefaultLimits
	setDefault(&c.Limits.MaxMessage, d.MaxMessage)
	setDefault(&c.Limits.MaxBatch, d.MaxBatch)
	setDefault(&c.Limits.MaxString, d.MaxString)
	setDefault(&c.Limits.MaxArgs, d.MaxArgs)
	setDefault(&c.Limits.MaxPages, d.MaxPages)
	setDefault(&c.Limits.MaxVersions, d.MaxVersions)
	setDefault(&c.Limits.MaxPageBytes, d.MaxPageBytes)
	setDefault(&c.MaxInFlight, 10_000)
	setDefault(&c.MaxConnsPerAddr, 64)
	setDefault(&c.GroupCommit, 4_000)
	setDefault(&c.SessionQueue, 1024)
	setDefault(&c.SessionQueueBytes, 64<<20)
	if c.writeTimeout <= 0 {
		c.writeTimeout = writeTimeout
	}
	setDefault(&c.SegmentVersions, 10_000)
	if c.Retention == (Retention{}) {
		c.Retention = DefaultRetention()
	}
	if c.SegmentBytes == 0 {
		c.SegmentBytes = 64 << 20
	}
	if c.IdleClose == 0 {
		c.IdleClose = defaultIdleClose
	}
	setDefault(&c.MaxOpenDatabases, defaultMaxOpenDatabases)
	if c.OpenWait <= 0 {
		c.OpenWait = defaultOpenWait
	}
	setDefault(&c.CredentialHashIterations, hashIterations)
}

func setDefault(p *int, v int) {
	if *p == 0 {
		*p = v
	}
}

// Errors of the server's administrative calls.
var (
	// ErrUnknownDatabase names a database the server does not host.
	ErrUnknownDatabase = errors.New("server: unknown database")
	// ErrInvalid is an administrative call with an argument out of range
	// (a database or user name, an empty secret).
	ErrInvalid = errors.New("server: invalid argument")
	// ErrStale is the error of opening a database whose local file its
	// LocalCache refused even after restoring it from the log: the file
	// is not served.
	ErrStale = errors.New("server: the local file is not the version log's tail")
)

// Server hosts databases and serves replicas over QUIC.
type Server struct {
	cfg  Config
	log  *slog.Logger
	cert tls.Certificate

	reg       *registry       // the hosted databases, opened on use and closed when idle
	store     AccessStore     // the databases and their credentials
	stopWatch func()          // stops store's reports of changes
	limiter   *failureLimiter // failed credential checks per address

	mu       sync.Mutex // guards the fields below; never held with a registry lock
	perAddr  map[string]int
	conns    map[*quic.Conn]struct{}
	listener *quic.Listener
	udp      net.PacketConn
	tr       *quic.Transport
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	closed   bool
}

var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Open opens the server's data directory, creating it and a self-signed
// certificate if needed, and registers every database already in it. None
// is opened yet: each opens on its first Hello or admin call, and closes
// after Config.IdleClose without use.
func Open(ctx context.Context, cfg Config) (*Server, error) {
	cfg.defaults()
	if cfg.Mutators == nil {
		return nil, errors.New("server: Config.Mutators is required")
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "dbs"), 0o755); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, perAddr: map[string]int{}, conns: map[*quic.Conn]struct{}{}}
	s.reg = newRegistry(s.log, &s.cfg)
	s.store = cfg.AccessStore
	if s.store == nil {
		s.store = fileAccessStore{dir: filepath.Join(cfg.Dir, "dbs")}
	}
	s.limiter = newFailureLimiter(cfg.AuthFailureEvery, cfg.AuthFailureBurst, defaultAuthLimiterAddrs)
	s.reg.openDB = func(ctx context.Context, t *tenant) (*database, error) {
		if err := os.MkdirAll(t.dir, 0o755); err != nil {
			return nil, fmt.Errorf("server: open database %s: %w", t.name, err)
		}
		d, err := openDatabase(ctx, t.name, t.dir, &s.cfg, s.log)
		if err == nil {
			s.log.Debug("opened database", "db", t.name)
		}
		return d, err
	}
	s.reg.closeDB = func(d *database) error { return d.close() }
	certFile, keyFile := cfg.CertFile, cfg.KeyFile
	if certFile == "" && keyFile == "" {
		certFile, keyFile = filepath.Join(cfg.Dir, "cert.pem"), filepath.Join(cfg.Dir, "key.pem")
	} else if certFile == "" || keyFile == "" {
		return nil, errors.New("server: give both a certificate and a key file, or neither")
	}
	var err error
	if s.cert, _, err = protocol.LoadOrCreateCertificate(certFile, keyFile, cfg.Hosts); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if s.cfg.metrics, err = newMetrics(s, cfg.Metrics, cfg.MetricsPerDatabase); err != nil {
		return nil, err
	}
	if err := s.openAccessStore(ctx); err != nil {
		s.cfg.metrics.unregister()
		return nil, err
	}
	return s, nil
}

// AddDatabase creates the database if it does not exist, and adds a
// credential for it (stored hashed; adding the same secret again does
// nothing). It does not open the database: the first Hello or admin call
// does, and creates its file (the schema of Config.Setup as version 1).
func (s *Server) AddDatabase(ctx context.Context, name, secret string) error {
	if err := s.CreateDatabase(ctx, name); err != nil {
		return err
	}
	_, err := s.AddSecret(ctx, name, "", secret)
	return err
}

// CreateDatabase registers a database (idempotent) with no credential
// yet. Like AddDatabase it opens nothing.
func (s *Server) CreateDatabase(ctx context.Context, name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("%w: database name %q: use 1 to 64 letters, digits, '_', '-', '.'", ErrInvalid, name)
	}
	if err := s.store.Create(ctx, name); err != nil {
		return err
	}
	_, err := s.reg.add(name, s.dbDir(name))
	return err
}

// tenant returns the named database's tenant, or ErrUnknownDatabase.
func (s *Server) tenant(name string) (*tenant, error) {
	if t := s.reg.lookup(name); t != nil {
		return t, nil
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownDatabase, name)
}

// acquire opens the named database if needed and holds it open until
// release is called (once).
func (s *Server) acquire(ctx context.Context, name string) (*database, func(), error) {
	t, err := s.tenant(name)
	if err != nil {
		return nil, nil, err
	}
	d, err := s.reg.acquire(ctx, t)
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	return d, func() { once.Do(func() { s.reg.release(t) }) }, nil
}

// Authority returns a database's authority (for tools, tests and
// administrative changes with Exec, which replicas receive like any other
// version), or nil if there is no such database or it cannot be opened
// (the error is logged). It opens the database if needed and pins it open
// until the server closes: the *Authority stays valid. For a short
// administrative call that lets the database close when idle again, use
// WithAuthority.
func (s *Server) Authority(name string) *Authority {
	t, err := s.tenant(name)
	if err != nil {
		return nil
	}
	d, err := s.reg.pin(context.Background(), t)
	if err == nil {
		_, err = d.owning()
	}
	if err != nil {
		s.log.Error("open database", "db", name, "err", err)
		return nil
	}
	return d.auth
}

// WithAuthority opens a database if needed and runs fn with its
// authority, holding the database open until fn returns (and not longer:
// fn must not keep the *Authority).
func (s *Server) WithAuthority(ctx context.Context, name string, fn func(*Authority) error) error {
	d, release, err := s.acquire(ctx, name)
	if err != nil {
		return err
	}
	defer release()
	a, err := d.owning()
	if err != nil {
		return err
	}
	return fn(a)
}

// Databases lists the hosted databases, open or not.
func (s *Server) Databases() []string { return s.reg.names() }

// DatabaseCounts says how many databases the server hosts and how many of
// them are open now (for metrics: an open database holds files and a
// goroutine, a closed one only its name and credentials).
func (s *Server) DatabaseCounts() (hosted, open int) { return s.reg.counts() }

// resetKey derives the QUIC stateless reset key from the private key.
func (s *Server) resetKey() *quic.StatelessResetKey {
	der, err := x509.MarshalPKCS8PrivateKey(s.cert.PrivateKey)
	if err != nil {
		return nil // no reset key: clients notice a restart by timeout
	}
	key := quic.StatelessResetKey(sha256.Sum256(append([]byte("sqlrebase stateless reset key\x00"), der...)))
	return &key
}

// Fingerprint is the pin of the server's certificate.
func (s *Server) Fingerprint() string { return protocol.Fingerprint(s.cert.Certificate[0]) }

// EncodedVersion returns version v of a database as it travels (for
// measuring the wire size), if the change log still holds it.
func (s *Server) EncodedVersion(db string, v uint64) ([]byte, error) {
	d, release, err := s.acquire(context.Background(), db)
	if err != nil {
		return nil, err
	}
	defer release()
	recs, err := d.readLog(v, v, 1)
	if err != nil {
		return nil, err
	}
	return recs[0], nil
}

// Listen starts serving QUIC on addr ("host:port"; port 0 picks one) and
// returns the bound address.
func (s *Server) Listen(ctx context.Context, addr string) (string, error) {
	udp, err := net.ListenPacket("udp", addr)
	if err != nil {
		return "", fmt.Errorf("server: listen %s: %w", addr, err)
	}
	return s.Serve(ctx, udp)
}

// Serve serves QUIC on an open packet connection, which the server then
// owns, and returns its address.
func (s *Server) Serve(ctx context.Context, udp net.PacketConn) (string, error) {
	// A stateless reset key that survives restarts: a server restarted
	// after a crash then resets the connections its previous life had,
	// and clients reconnect at once instead of waiting out the idle
	// timeout. It is derived from the private key, so it is as secret as
	// that and needs no file of its own.
	tr := &quic.Transport{Conn: udp, StatelessResetKey: s.resetKey()}
	ln, err := tr.Listen(protocol.ServerTLS(s.cert), protocol.QUICConfig())
	if err != nil {
		tr.Close()
		udp.Close()
		return "", fmt.Errorf("server: %w", err)
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		cancel()
		ln.Close()
		udp.Close()
		return "", ErrClosed
	}
	s.listener, s.udp, s.tr, s.cancel = ln, udp, tr, cancel
	s.mu.Unlock()
	s.wg.Add(1)
	go s.accept(ctx, ln)
	s.log.Info("serving", "addr", udp.LocalAddr().String(), "fingerprint", s.Fingerprint())
	return udp.LocalAddr().String(), nil
}

func (s *Server) accept(ctx context.Context, ln *quic.Listener) {
	defer s.wg.Done()
	for {
		conn, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		host := conn.RemoteAddr().String()
		if ua, ok := conn.RemoteAddr().(*net.UDPAddr); ok {
			host = ua.IP.String()
		}
		s.mu.Lock()
		over := s.perAddr[host] >= s.cfg.MaxConnsPerAddr
		if !over {
			s.perAddr[host]++
			s.conns[conn] = struct{}{}
		}
		s.mu.Unlock()
		if over {
			s.cfg.metrics.refused(protocol.CodeTooManyConns)
			conn.CloseWithError(quic.ApplicationErrorCode(protocol.CodeTooManyConns), fmt.Sprintf("more than %d connections from %s", s.cfg.MaxConnsPerAddr, host))
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				s.perAddr[host]--
				if s.perAddr[host] == 0 {
					delete(s.perAddr, host)
				}
				delete(s.conns, conn)
				s.mu.Unlock()
			}()
			s.serveConn(ctx, conn)
		}()
	}
}

// serveConn runs one session per stream the client opens.
func (s *Server) serveConn(ctx context.Context, conn *quic.Conn) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		stream, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sess := newSession(s, stream, conn.RemoteAddr().String())
			sess.addr = conn.RemoteAddr()
			sess.run(ctx)
		}()
	}
}

// Close stops serving, tells every client, and closes the databases.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ln, udp, tr, cancel := s.listener, s.udp, s.tr, s.cancel
	s.mu.Unlock()
	var errs []error
	for _, d := range s.reg.openDatabases() {
		// Sessions get their Error first, while the connections are up.
		d.auth.mu.Lock()
		for sess := range d.subs {
			sess.fail(protocol.CodeShuttingDown, "the server is shutting down")
		}
		d.auth.mu.Unlock()
	}
	if cancel != nil {
		time.Sleep(50 * time.Millisecond) // let the senders flush their Error
		// Close each connection with a reason, so that clients reconnect
		// at once instead of waiting out the idle timeout.
		s.mu.Lock()
		for c := range s.conns {
			c.CloseWithError(quic.ApplicationErrorCode(protocol.CodeShuttingDown), "the server is shutting down")
		}
		s.mu.Unlock()
		cancel()
		errs = append(errs, ln.Close())
		s.wg.Wait()
		errs = append(errs, tr.Close(), udp.Close())
	}
	s.stopWatch()
	errs = append(errs, s.reg.closeAll())
	s.cfg.metrics.unregister()
	return errors.Join(errs...)
}
