package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NodeConfig configures an embedded NATS server with JetStream. Zero
// values take the defaults named.
type NodeConfig struct {
	// Name is the server's name, unique in its cluster (required).
	Name string
	// Dir holds JetStream's files (NATS appends /jetstream). One directory
	// per node (required).
	Dir string
	// Host is the address the client port and the route port listen on
	// (127.0.0.1; NATS's own default is every interface).
	Host string
	// Port is the client port (0: one the system picks).
	Port int
	// ClusterName names the cluster; empty: a single node, no routes.
	ClusterName string
	// ClusterPort is the route port (0 with ClusterName: one the system
	// picks, which only suits a node that others are told of later).
	ClusterPort int
	// Advertise is the route address (HOST:PORT) this node tells its peers
	// to reach it at, when that is not the one it listens on (a proxy or
	// NAT in front of it; a test's relay). Empty: the listen address.
	// Peers that list it in their Routes then open no second route to it.
	Advertise string
	// Routes are the peers' route URLs (nats-route://HOST:PORT). A node may
	// list itself; NATS ignores the route to itself.
	Routes []string
	// SyncInterval is how often JetStream fsyncs its files. 0 means after
	// every write ("sync_interval: always"): the Jepsen analysis of NATS
	// 2.12.1 lost acknowledged writes in a coordinated power failure with
	// the default of 2 minutes. A positive value is a measured trade.
	SyncInterval time.Duration
	// MaxPayload is the largest message (DefaultMaxPayload).
	MaxPayload int32
	// Logger receives the server's warnings and errors (slog.Default()).
	Logger *slog.Logger
}

// Node is an embedded NATS server with JetStream.
type Node struct {
	srv *natsserver.Server
	cfg NodeConfig
}

// StartNode starts an embedded NATS server and waits, bounded by ctx, until
// it takes connections and JetStream answers (in a cluster: once a meta
// leader is elected, which needs a quorum of the routes to be up). On error
// the server is shut down.
func StartNode(ctx context.Context, cfg NodeConfig) (*Node, error) {
	if cfg.Name == "" || cfg.Dir == "" {
		return nil, fmt.Errorf("cluster: a node needs a Name and a Dir")
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	port := cfg.Port
	if port == 0 {
		port = natsserver.RANDOM_PORT
	}
	opts := &natsserver.Options{
		ServerName: cfg.Name,
		Host:       cfg.Host,
		Port:       port,
		JetStream:  true,
		StoreDir:   cfg.Dir,
		MaxPayload: cfg.MaxPayload,
		NoSigs:     true, // the embedding process owns its signals
	}
	if cfg.SyncInterval <= 0 {
		opts.SyncAlways = true
		opts.SyncInterval = 2 * time.Minute // what NATS sets with "always"; SyncAlways is what counts
	} else {
		opts.SyncInterval = cfg.SyncInterval
	}
	if cfg.ClusterName != "" {
		cport := cfg.ClusterPort
		if cport == 0 {
			cport = natsserver.RANDOM_PORT
		}
		opts.Cluster = natsserver.ClusterOpts{Name: cfg.ClusterName, Host: cfg.Host, Port: cport, Advertise: cfg.Advertise}
		for _, r := range cfg.Routes {
			u, err := url.Parse(r)
			if err != nil {
				return nil, fmt.Errorf("cluster: route %q: %w", r, err)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	srv, err := natsserver.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("cluster: new NATS server %s: %w", cfg.Name, err)
	}
	srv.SetLoggerV2(&natsLogger{l: cfg.Logger.With("nats", cfg.Name)}, false, false, false)
	n := &Node{srv: srv, cfg: cfg}
	go srv.Start()
	if err := n.ready(ctx); err != nil {
		n.Shutdown()
		return nil, err
	}
	return n, nil
}

// ready waits for the client port, then for JetStream to answer an account
// info request: ReadyForConnections returns before a clustered JetStream
// answers (RESEARCH.md saw the first API call hang for about 0.5 s).
func (n *Node) ready(ctx context.Context) error {
	for !n.srv.ReadyForConnections(apiRetry) {
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %s: client port: %w", ErrNotReady, n.cfg.Name, context.Cause(ctx))
		}
	}
	nc, js, err := n.Connect()
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrNotReady, n.cfg.Name, err)
	}
	defer nc.Close()
	for {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := js.AccountInfo(actx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %s: JetStream: %w (last: %w)", ErrNotReady, n.cfg.Name, context.Cause(ctx), err)
		case <-time.After(apiRetry):
		}
	}
}

// ClientURL is the URL clients connect to.
func (n *Node) ClientURL() string { return n.srv.ClientURL() }

// RouteURL is the URL peers route to (empty for a single node).
func (n *Node) RouteURL() string {
	a := n.srv.ClusterAddr()
	if a == nil {
		return ""
	}
	return fmt.Sprintf("nats-route://%s", a.String())
}

// Name is the server's name.
func (n *Node) Name() string { return n.cfg.Name }

// Connect opens a client connection to this node, in process (no socket),
// with its JetStream context.
func (n *Node) Connect(opts ...nats.Option) (*nats.Conn, jetstream.JetStream, error) {
	opts = append([]nats.Option{nats.InProcessServer(n.srv), nats.Name(n.cfg.Name + "-local")}, opts...)
	nc, err := nats.Connect(n.srv.ClientURL(), opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: connect to %s: %w", n.cfg.Name, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("cluster: JetStream on %s: %w", n.cfg.Name, err)
	}
	return nc, js, nil
}

// Shutdown stops the server and waits for it to finish.
func (n *Node) Shutdown() {
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
}

// natsLogger hands the embedded server's log to slog: warnings and errors
// only, since its notices are a line per start-up step.
type natsLogger struct{ l *slog.Logger }

func (g *natsLogger) Noticef(string, ...any) {}
func (g *natsLogger) Debugf(string, ...any)  {}
func (g *natsLogger) Tracef(string, ...any)  {}
func (g *natsLogger) Warnf(format string, v ...any) {
	g.l.Warn(fmt.Sprintf(format, v...))
}
func (g *natsLogger) Errorf(format string, v ...any) {
	g.l.Error(fmt.Sprintf(format, v...))
}
func (g *natsLogger) Fatalf(format string, v ...any) {
	// The server calls Fatalf and then stops itself; it must not take the
	// embedding process down with it.
	g.l.Error("fatal: " + fmt.Sprintf(format, v...))
}
