package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sqlrebase/sqlrebase/cluster"
	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/server"
)

// dbFlags collects repeated --db NAME:SECRET flags (--db NAME in JWT
// mode, where tokens, not secrets, grant access).
type dbFlags []string

func (d *dbFlags) String() string { return strings.Join(*d, ",") }

func (d *dbFlags) Set(v string) error {
	name, secret, ok := strings.Cut(v, ":")
	if name == "" || ok && secret == "" {
		return fmt.Errorf("want NAME:SECRET (or NAME with --jwt-*), got %q", v)
	}
	*d = append(*d, v)
	return nil
}

// demoRegistry is the mutators the binary's server and replicas run. A real
// app builds its own server binary that links its own registry (see the
// README).
func demoRegistry() *mutators.Registry {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		panic(err) // a programming error: the demo registry is fixed
	}
	return reg
}

func demoSetup(ctx context.Context, tx mutators.Tx) error {
	_, err := tx.Exec(mutators.DemoSchema)
	return err
}

// cmdServe is the serve subcommand: the authority as a QUIC server.
func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer, _ *slog.Logger) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	data := fs.String("data", "sqlrebase-data", "data directory: databases, change logs, credentials, certificate")
	listen := fs.String("listen", "127.0.0.1:7878", "UDP address to serve QUIC on (HOST:PORT; port 0 picks one)")
	var dbs dbFlags
	fs.Var(&dbs, "db", "NAME:SECRET: host database NAME (created if new) and accept SECRET for it; repeat for more (with --jwt-*: NAME)")
	cert := fs.String("cert", "", "certificate file (PEM); default: a self-signed one created in --data")
	key := fs.String("key", "", "key file (PEM) of --cert")
	retainVersions := fs.Int("retain-versions", 100_000, "keep about this many versions per change log (older replicas get a snapshot)")
	retainAge := fs.Duration("retain-age", 0, "drop change log segments older than this (0: no limit)")
	metricsAddr := fs.String("metrics", "", "serve Prometheus metrics on http://ADDR/metrics, with /healthz and /readyz (HOST:PORT; empty: off)")
	verbose := fs.Bool("v", false, "log every session (debug level)")
	adminAddr := fs.String("admin", "", "serve the admin API (sqlrebase admin) on http://ADDR (HOST:PORT, no host: loopback; empty: off)")
	adminTokenFlag := fs.String("admin-token-file", "", "file holding the admin API's bearer token (default: one generated in --data/"+adminTokenFile+")")
	var jwtf jwtFlags
	jwtf.register(fs)
	var clf clusterFlags
	clf.register(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sqlrebase serve --data DIR --listen HOST:PORT [--db NAME:SECRET ...] [--cert F --key F] [--admin HOST:PORT [--admin-token-file F]]")
		fmt.Fprintln(stderr, "       sqlrebase serve ... --jwt-jwks F | --jwt-hs256-secret-file F  --jwt-issuer I --jwt-audience A [--jwt-dbs-claim dbs] [--db NAME ...]")
		fmt.Fprintln(stderr, "       sqlrebase serve ... --cluster NAME --node N [--cluster-listen HOST:PORT --routes HOST:PORT,...] | --nats URL --node N")
		fmt.Fprintln(stderr, "\nRuns the authority for the demo app's mutators over QUIC. Prints the certificate's")
		fmt.Fprintln(stderr, "fingerprint for replicas to pin, then logs (slog) until SIGINT or SIGTERM.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase serve: --listen %q: %v\n", *listen, err)
		return 2
	}
	var reg *prometheus.Registry
	if *metricsAddr != "" {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	cfg := server.Config{
		Dir: *data, Mutators: demoRegistry(), Setup: demoSetup, Logger: log,
		CertFile: *cert, KeyFile: *key, Hosts: []string{host},
		Retention: server.Retention{Versions: *retainVersions, Age: *retainAge},
	}
	if reg != nil {
		cfg.Metrics = reg
	}
	if jwtf.enabled() {
		a, err := jwtf.authenticator(log)
		if err != nil {
			fmt.Fprintf(stderr, "sqlrebase serve: %v\n", err)
			return 2
		}
		cfg.Authenticator = a
		for _, d := range dbs {
			if strings.Contains(d, ":") {
				fmt.Fprintf(stderr, "sqlrebase serve: --db %s: with --jwt-* tokens grant access, not secrets: give --db NAME\n", d)
				return 2
			}
		}
	} else {
		for _, d := range dbs {
			if !strings.Contains(d, ":") {
				fmt.Fprintf(stderr, "sqlrebase serve: --db %s: want NAME:SECRET (NAME alone only with --jwt-*)\n", d)
				return 2
			}
		}
	}
	stopCluster, err := setupCluster(ctx, &clf, &cfg, *data, stdout, log)
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase serve: cluster: %v\n", err)
		return 1
	}
	if stopCluster != nil {
		defer stopCluster() // after the server's Close: no version comes after it
	}
	srv, err := server.Open(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase serve: %v\n", err)
		return 1
	}
	defer srv.Close()
	if o, ok := cfg.VersionLog.(*cluster.Owner); ok {
		// Pushes other nodes forward to the databases this one owns.
		o.SetForwardHandler(srv.ServeForwarded)
		// Snapshots of the databases it owns, by the default policy.
		o.SetSnapshotSource(srv, cluster.SnapshotPolicy{})
	}
	for _, d := range dbs {
		name, secret, _ := strings.Cut(d, ":")
		add := func() error { return srv.AddDatabase(ctx, name, secret) }
		if secret == "" { // JWT mode
			add = func() error { return srv.CreateDatabase(ctx, name) }
		}
		if err := add(); err != nil {
			fmt.Fprintf(stderr, "sqlrebase serve: %v\n", err)
			return 1
		}
	}
	if len(srv.Databases()) == 0 && *adminAddr == "" {
		fmt.Fprintln(stderr, "sqlrebase serve: no databases: add one with --db NAME:SECRET (--db NAME with --jwt-*), or serve --admin to add them later")
		return 2
	}
	addr, err := srv.Listen(ctx, *listen)
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase serve: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "listening: %s\n", addr)
	fmt.Fprintf(stdout, "fingerprint: %s\n", srv.Fingerprint())
	fmt.Fprintf(stdout, "databases: %s\n", strings.Join(srv.Databases(), ", "))
	if reg != nil {
		stop, maddr, err := serveMetrics(*metricsAddr, srv.Handler(reg), log)
		if err != nil {
			fmt.Fprintf(stderr, "sqlrebase serve: --metrics %s: %v\n", *metricsAddr, err)
			return 1
		}
		defer stop()
		fmt.Fprintf(stdout, "metrics: http://%s/metrics\n", maddr)
	}
	if *adminAddr != "" {
		stop, err := startAdmin(srv, *adminAddr, *data, *adminTokenFlag, stdout, log)
		if err != nil {
			fmt.Fprintf(stderr, "sqlrebase serve: %v\n", err)
			return 1
		}
		defer stop()
	}
	if f, ok := stdout.(interface{ Sync() error }); ok {
		f.Sync()
	}
	<-ctx.Done()
	log.Info("shutting down")
	start := time.Now()
	if err := srv.Close(); err != nil {
		log.Error("close", "err", err)
		return 1
	}
	log.Info("stopped", "took", time.Since(start))
	return 0
}

// serveMetrics serves h over HTTP on addr until stop is called, and
// returns the bound address.
func serveMetrics(addr string, h http.Handler, log *slog.Logger) (stop func(), bound string, err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, "", err
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		hs.Shutdown(ctx)
		<-done
	}, ln.Addr().String(), nil
}
