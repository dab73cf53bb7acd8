package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// Leader placement. Every append waits on the version stream's Raft
// leader, and every lease write (and a dead holder's expiry) on the lease
// bucket's. When the node that dies leads one of them, that group takes no
// writes until its followers elect another leader, and nats-server fixes
// the election timeout at 4 to 9 s (raft.go's minElectionTimeout and
// maxElectionTimeout; no option sets them). An owner that also leads a
// group so turns its own death, which the lease's TTL alone would cover in
// about 3 s, into one that costs an election on top: TestClusterFailover
// logged the owner as the stream's leader in 4 of 5 kills (the leader
// answers its own node's writes first, so it tends to win the race for a
// free lease), and those fail-overs took 6.5-14 s against 4.2 s for the
// owner that led nothing. So an owner that leads a group hands the
// leadership to a node that owns fewer databases (leaderHandoff), with
// JetStream's own leader step-down and a preferred successor.

// takeoverDefer is how long a node that leads the version stream or the
// lease bucket lets a free database's lease stay free before it takes the
// database over itself (Owner.TakeoverDelay): the other nodes look every
// second, so one of them takes it first if it can. Without it the leader,
// which answers its own node's lease write first, won the race and then
// handed its leaderships over right as it began to serve, which stalled
// its first confirmations by about 3 s in 3 of 5 kills of
// TestClusterFailover.
const takeoverDefer = 1500 * time.Millisecond

// placementEvery is how often an owner checks whether it leads a log
// group it should hand over: a stream info per group (two direct API
// calls), and only when it leads one and owns databases, one listing of
// the lease bucket.
const placementEvery = 5 * time.Second

// placementRetry is how soon a placement check that failed is tried
// again, instead of a whole placementEvery later: a step-down refused
// while the chosen peer catches up, or a stream info that timed out during
// an election, is usually answered a second later.
const placementRetry = time.Second

// groupState is what the placement decision needs of one Raft group: its
// leader and the other peers that are current with it (a peer that is
// offline or behind would have to catch up before it could lead, and
// JetStream refuses a step-down to it).
type groupState struct {
	Leader string
	Peers  []string // the current peers other than the leader
}

// leaderHandoff decides whether self, which may lead the group g, should
// hand its leadership over, and to whom: only if self leads g and owns
// databases, to the current peer that owns the fewest, and only if that is
// strictly fewer than self owns. Among peers that own as few, prefer (the
// leader of the other group: with both leaders on one node, the death of
// the other non-owner costs no election) and then the first name.
// Leadership so only ever moves towards fewer owned databases, and never
// back and forth.
func leaderHandoff(self string, g groupState, owns map[string]int, prefer string) (string, bool) {
	if g.Leader != self || owns[self] == 0 {
		return "", false
	}
	best, found := "", false
	better := func(p string) bool {
		switch {
		case owns[p] != owns[best]:
			return owns[p] < owns[best]
		case (p == prefer) != (best == prefer):
			return p == prefer
		}
		return p < best
	}
	for _, p := range g.Peers {
		if p == self || p == "" {
			continue
		}
		if !found || better(p) {
			best, found = p, true
		}
	}
	if !found || owns[best] >= owns[self] {
		return "", false
	}
	return best, true
}

// runPlacement checks the log groups' leaders every period, a
// placementRetry after a check that failed, and
// at once when the owner appends its first version under a new lease
// (kickPlacement), until the owner closes: the node that wins a free lease
// is often the lease bucket's leader, and a check up to 5 s later left
// TestClusterFailover's next kill to hit an owner that led both groups.
// Not at the lease's take: moving the leaders while the new owner
// restores made its reads fail ("JetStream system temporarily
// unavailable") and the take-over with them.
func (o *Owner) runPlacement(period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	retry := time.NewTimer(placementRetry)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-t.C:
		case <-o.placeKick:
		case <-retry.C:
		}
		ctx, cancel := context.WithTimeout(o.ctx, placementEvery)
		if err := o.placeLeaders(ctx); err != nil && o.ctx.Err() == nil {
			o.logger.Warn("cluster: leader placement, trying again", "err", err, "in", placementRetry)
			retry.Reset(placementRetry)
		}
		cancel()
	}
}

// TakeoverDelay implements server.TakeoverDeferrer: takeoverDefer if this
// node leads the version stream or the lease bucket (and they have other
// current peers to lead them), else 0.
func (o *Owner) TakeoverDelay(ctx context.Context, db string) time.Duration {
	for _, name := range []string{o.log.stream.CachedInfo().Config.Name, leaseStream(o.leases.bucket)} {
		if g, err := o.groupOf(ctx, name); err == nil && g.Leader == o.node && len(g.Peers) > 0 {
			return takeoverDefer
		}
	}
	return 0
}

// kickPlacement asks runPlacement for a check now.
func (o *Owner) kickPlacement() {
	select {
	case o.placeKick <- struct{}{}:
	default:
	}
}

// placeLeaders hands the leadership of the version stream and of the lease
// bucket's stream to another node if leaderHandoff says so.
func (o *Owner) placeLeaders(ctx context.Context) error {
	o.mu.Lock()
	mine := len(o.dbs)
	o.mu.Unlock()
	if mine == 0 {
		return nil
	}
	var owns map[string]int // read once, only if this node leads a group
	var errs []error
	names := []string{o.log.stream.CachedInfo().Config.Name, leaseStream(o.leases.bucket)}
	groups := make([]groupState, len(names))
	for i, name := range names {
		g, err := o.groupOf(ctx, name)
		if err != nil {
			errs = append(errs, err)
		}
		groups[i] = g
	}
	for i, name := range names {
		g := groups[i]
		if g.Leader != o.node || len(g.Peers) == 0 {
			continue
		}
		prefer := groups[1-i].Leader // the other group's (already handed over, for the second)
		if owns == nil {
			owns = o.peerOwns(ctx, append(append([]string(nil), groups[0].Peers...), groups[1].Peers...))
			owns[o.node] = mine
		}
		// Only to a peer that said how many it owns: one that did not
		// answer may be starting, or cut off.
		g.Peers = slices.DeleteFunc(slices.Clone(g.Peers), func(p string) bool {
			_, ok := owns[p]
			return !ok
		})
		to, ok := leaderHandoff(o.node, g, owns, prefer)
		if !ok {
			continue
		}
		if err := o.stepDown(ctx, name, to); err != nil {
			errs = append(errs, err)
			continue
		}
		groups[i].Leader = to
		o.logger.Info("cluster: handed a log group's leadership to a node that owns fewer databases",
			"stream", name, "to", to, "owned here", owns[o.node], "owned there", owns[to])
	}
	return errors.Join(errs...)
}

// groupOf reads a stream's Raft group: its leader and its current peers.
func (o *Owner) groupOf(ctx context.Context, stream string) (groupState, error) {
	s, err := o.log.js.Stream(ctx, stream)
	if err != nil {
		return groupState{}, fmt.Errorf("cluster: info of stream %s: %w", stream, err)
	}
	ci := s.CachedInfo().Cluster
	if ci == nil {
		return groupState{}, nil
	}
	g := groupState{Leader: ci.Leader}
	for _, p := range ci.Replicas {
		if p != nil && p.Current && !p.Offline {
			g.Peers = append(g.Peers, p.Name)
		}
	}
	return g, nil
}

// stepDownRequest is JetStream's leader step-down request
// ($JS.API.STREAM.LEADER.STEPDOWN.<stream>) with a preferred successor;
// nats.go has no call for it.
type stepDownRequest struct {
	Placement struct {
		Preferred string `json:"preferred"`
	} `json:"placement"`
}

// stepDown asks the leader of stream to hand its leadership to the node
// named to.
func (o *Owner) stepDown(ctx context.Context, stream, to string) error {
	var req stepDownRequest
	req.Placement.Preferred = to
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	msg, err := o.log.nc.RequestWithContext(ctx, "$JS.API.STREAM.LEADER.STEPDOWN."+stream, body)
	if err != nil {
		return fmt.Errorf("cluster: step down the leader of %s: %w", stream, err)
	}
	var resp struct {
		Success bool `json:"success"`
		Error   *struct {
			Code        int    `json:"code"`
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return fmt.Errorf("cluster: step down the leader of %s: %w", stream, err)
	}
	if resp.Error != nil || !resp.Success {
		desc := "no success"
		if resp.Error != nil {
			desc = fmt.Sprintf("%s (%d)", resp.Error.Description, resp.Error.ErrCode)
		}
		return fmt.Errorf("cluster: step down the leader of %s to %s: %s", stream, to, desc)
	}
	return nil
}

// leaseStream is the name of the stream behind a KV bucket.
func leaseStream(bucket string) string { return "KV_" + bucket }

// OwnsSubjectPrefix starts the subject on which each node answers how many
// databases it owns (OwnsSubject), for the leader placement of its peers.
const OwnsSubjectPrefix = "sqlrebase.owns."

// ownsAskTimeout bounds a peer's answer to how many databases it owns: a
// live node answers in well under a millisecond on a LAN, and a node that
// does not answer within this is left out of the placement.
const ownsAskTimeout = 500 * time.Millisecond

// OwnsSubject is the subject on which node answers how many databases it
// owns.
func OwnsSubject(node string) string { return OwnsSubjectPrefix + token(node) }

// answerOwns subscribes this node to its OwnsSubject. Asking each peer is
// O(nodes) per check; listing the lease bucket, as the placement did
// before, was O(databases) and went through a KV watch, which in
// TestClusterFailover waited out the check's 5 s once (a lease that
// expired while the watch delivered the current values, so its end never
// came) and left an owner leading both groups at the next kill.
func (o *Owner) answerOwns() (*nats.Subscription, error) {
	return o.log.nc.Subscribe(OwnsSubject(o.node), func(m *nats.Msg) {
		o.mu.Lock()
		n := len(o.dbs)
		o.mu.Unlock()
		if err := m.Respond([]byte(strconv.Itoa(n))); err != nil {
			o.logger.Debug("cluster: answer how many databases this node owns", "err", err)
		}
	})
}

// peerOwns asks each of peers (at once) how many databases it owns, and
// returns the answers; a peer that does not answer within ownsAskTimeout,
// or answers what is not a count, is left out.
func (o *Owner) peerOwns(ctx context.Context, peers []string) map[string]int {
	ctx, cancel := context.WithTimeout(ctx, ownsAskTimeout)
	defer cancel()
	var ask []string
	for _, p := range peers {
		if p != o.node && p != "" && !slices.Contains(ask, p) {
			ask = append(ask, p)
		}
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	owns := map[string]int{}
	for _, p := range ask {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, err := o.log.nc.RequestWithContext(ctx, OwnsSubject(p), nil)
			n := -1
			if err == nil {
				if v, perr := strconv.Atoi(string(m.Data)); perr == nil && v >= 0 {
					n = v
				}
			}
			if n >= 0 {
				mu.Lock()
				owns[p] = n
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return owns
}
