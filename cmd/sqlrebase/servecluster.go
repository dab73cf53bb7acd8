package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sqlrebase/sqlrebase/cluster"
	"github.com/sqlrebase/sqlrebase/server"
)

// clusterFlags are serve's cluster options (docs/CLUSTER.md).
type clusterFlags struct {
	cluster  string // the embedded NATS cluster's name
	node     string
	routes   string // HOST:PORT,HOST:PORT of the peers' route ports
	routeOn  string // HOST:PORT this node's route port listens on
	advert   string // HOST:PORT peers reach the route port at, if not routeOn
	natsURL  string // an external NATS instead of the embedded one
	replicas int
	leaseTTL time.Duration
}

func (c *clusterFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.cluster, "cluster", "", "run as a node of the named cluster: embed a NATS JetStream server clustered with --routes; versions go to its replicated stream before any ack (docs/CLUSTER.md)")
	fs.StringVar(&c.node, "node", "", "this node's name in the cluster (with --cluster or --nats; required)")
	fs.StringVar(&c.routes, "routes", "", "the peers' route addresses, HOST:PORT,HOST:PORT (with --cluster)")
	fs.StringVar(&c.routeOn, "cluster-listen", "127.0.0.1:6222", "TCP address this node's NATS routes listen on (with --cluster)")
	fs.StringVar(&c.advert, "cluster-advertise", "", "HOST:PORT the peers reach this node's routes at, if not --cluster-listen (a proxy in front of it)")
	fs.StringVar(&c.natsURL, "nats", "", "use the external NATS JetStream at this URL instead of embedding one")
	fs.IntVar(&c.replicas, "replicas", 0, "replicas of the stream, lease bucket and snapshot store (0: 3 with --routes or --nats, else 1)")
	fs.DurationVar(&c.leaseTTL, "lease-ttl", cluster.DefaultLeaseTTL, "a database's lease without renewal")
}

func (c *clusterFlags) enabled() bool { return c.cluster != "" || c.natsURL != "" }

// clusterNode is what serve runs beside the server in cluster mode.
type clusterNode struct {
	node   *cluster.Node // nil with --nats
	nc     *nats.Conn
	owner  *cluster.Owner
	access *cluster.Access // the databases and their credentials, shared by the nodes
	url    string
}

// startCluster embeds (or connects to) NATS JetStream, opens the stream,
// the lease bucket, the snapshot store and the access bucket, and returns
// the Owner that the server appends through beside the access store.
func startCluster(ctx context.Context, c *clusterFlags, data string, log *slog.Logger) (*clusterNode, error) {
	if c.node == "" {
		return nil, errors.New("--node NAME is required with --cluster or --nats")
	}
	if c.cluster != "" && c.natsURL != "" {
		return nil, errors.New("give --cluster (embedded NATS) or --nats URL (external), not both")
	}
	replicas := c.replicas
	if replicas == 0 {
		replicas = 1
		if c.routes != "" || c.natsURL != "" {
			replicas = 3
		}
	}
	cn := &clusterNode{}
	var js jetstream.JetStream
	var err error
	if c.cluster != "" {
		host, port, perr := splitPort(c.routeOn)
		if perr != nil {
			return nil, fmt.Errorf("--cluster-listen %q: %w", c.routeOn, perr)
		}
		cfg := cluster.NodeConfig{Name: c.node, Dir: filepath.Join(data, "nats"), Host: host, ClusterName: c.cluster, ClusterPort: port, Advertise: c.advert, Logger: log}
		for _, r := range strings.Split(c.routes, ",") {
			if r = strings.TrimSpace(r); r != "" {
				cfg.Routes = append(cfg.Routes, "nats-route://"+r)
			}
		}
		if len(cfg.Routes) == 0 {
			cfg.ClusterName, cfg.ClusterPort = "", 0 // one node: no routes to listen for
		}
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		cn.node, err = cluster.StartNode(rctx, cfg)
		cancel()
		if err != nil {
			return nil, err
		}
		cn.nc, js, err = cn.node.Connect()
		cn.url = cn.node.ClientURL()
	} else {
		cn.nc, err = nats.Connect(c.natsURL, nats.Name("sqlrebase-"+c.node), nats.MaxReconnects(-1))
		if err == nil {
			js, err = jetstream.New(cn.nc)
		}
		cn.url = c.natsURL
	}
	if err != nil {
		cn.stop(ctx)
		return nil, err
	}
	octx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	l, err := cluster.OpenLog(octx, cn.nc, js, cluster.LogConfig{Replicas: replicas})
	if err != nil {
		cn.stop(ctx)
		return nil, err
	}
	ls, err := cluster.OpenLeases(octx, js, cluster.LeaseConfig{Replicas: replicas, TTL: c.leaseTTL})
	if err != nil {
		cn.stop(ctx)
		return nil, err
	}
	snaps, err := cluster.OpenSnapshots(octx, js, cluster.SnapshotConfig{Replicas: replicas})
	if err != nil {
		cn.stop(ctx)
		return nil, err
	}
	cn.owner = cluster.NewOwner(l, ls, snaps, c.node, log)
	if cn.access, err = cluster.OpenAccess(octx, js, cluster.AccessConfig{Replicas: replicas, Logger: log}); err != nil {
		cn.stop(ctx)
		return nil, err
	}
	return cn, nil
}

// stop releases the leases, then closes the connection and the embedded
// server. Call it after the server closed: no version may come after.
func (cn *clusterNode) stop(ctx context.Context) {
	if cn.owner != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		cn.owner.Close(cctx)
		cancel()
	}
	if cn.access != nil {
		cn.access.Close()
	}
	if cn.nc != nil {
		cn.nc.Close()
	}
	if cn.node != nil {
		cn.node.Shutdown()
	}
}

func splitPort(addr string) (string, int, error) {
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		return "", 0, errors.New("want HOST:PORT")
	}
	var port int
	if _, err := fmt.Sscanf(addr[i+1:], "%d", &port); err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port %q", addr[i+1:])
	}
	return addr[:i], port, nil
}

// setupCluster runs startCluster for cmdServe: it sets cfg.VersionLog and
// cfg.AccessStore (the databases and credentials every node shares) and
// returns the stop to defer (nil and no error when not in cluster mode).
func setupCluster(ctx context.Context, c *clusterFlags, cfg *server.Config, data string, stdout io.Writer, log *slog.Logger) (func(), error) {
	if !c.enabled() {
		return nil, nil
	}
	cn, err := startCluster(ctx, c, data, log)
	if err != nil {
		return nil, err
	}
	cfg.VersionLog = cn.owner
	cfg.AccessStore = cn.access
	fmt.Fprintf(stdout, "nats: %s (node %s)\n", cn.url, c.node)
	return func() { cn.stop(ctx) }, nil
}
