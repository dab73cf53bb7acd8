package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

// Forwarded pushes (docs/CLUSTER.md, "Forwarding and fan-out"): a node
// that follows a database hands its replicas' pushes to the owner as one
// core NATS request on sqlrebase.push.<db>, to which the owner's node
// subscribes (in a queue group: one of them answers) while it holds the
// lease. The request and its reply are JSON (the envelope is small beside
// the mutations' arguments, and JSON keeps it readable in `nats sub`); the
// decoders check every field and are fuzzed (FuzzForwardDecode).

// Limits of a forwarded request, checked by its decoder.
const (
	// PushSubjectPrefix starts every database's forwarded-push subject.
	PushSubjectPrefix = "sqlrebase.push."
	// maxForwardPushes is the most pushes one request carries: a writer's
	// batch of sessions' pushes.
	maxForwardPushes = 4096
	// maxForwardMutations is the most mutations of one forwarded push.
	maxForwardMutations = 1 << 16
	// forwardTimeout bounds the owner's run of a forwarded request: an
	// append may wait out one stream leader election (versionLogTimeout).
	forwardTimeout = 15 * time.Second
	// forwardQueue is the queue group of the owners' subscriptions.
	forwardQueue = "owner"
)

// ErrBadForward is the error of a forwarded request or reply that does
// not decode.
var ErrBadForward = errors.New("cluster: malformed forwarded push")

// PushSubject is the subject db's forwarded pushes go to.
func PushSubject(db string) string { return PushSubjectPrefix + token(db) }

type fwdRequest struct {
	Pushes []fwdPush `json:"p"`
}

type fwdPush struct {
	Client    string         `json:"c"`
	User      string         `json:"u"`
	Claims    map[string]any `json:"cl,omitempty"`
	Mutations []fwdMutation  `json:"m"`
}

type fwdMutation struct {
	ID   uint64 `json:"i"`
	Name string `json:"n"`
	Args []byte `json:"a,omitempty"`
}

type fwdReply struct {
	Results  []fwdResult `json:"r,omitempty"`
	Err      string      `json:"e,omitempty"`
	NotOwner bool        `json:"no,omitempty"`
}

type fwdResult struct {
	Last    uint64        `json:"l,omitempty"`
	Version uint64        `json:"v,omitempty"`
	Code    protocol.Code `json:"c,omitempty"`
	Message string        `json:"m,omitempty"`
}

// encodeForward is the request for pushes.
func encodeForward(pushes []server.ForwardedPush) ([]byte, error) {
	req := fwdRequest{Pushes: make([]fwdPush, len(pushes))}
	for i, p := range pushes {
		fp := fwdPush{Client: p.ClientID, User: p.UserID, Claims: p.Claims, Mutations: make([]fwdMutation, len(p.Mutations))}
		for j, m := range p.Mutations {
			fp.Mutations[j] = fwdMutation{ID: m.ID, Name: m.Name, Args: m.Args}
		}
		req.Pushes[i] = fp
	}
	return json.Marshal(req)
}

// decodeForward decodes and checks a request.
func decodeForward(b []byte) ([]server.ForwardedPush, error) {
	var req fwdRequest
	if err := json.Unmarshal(b, &req); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadForward, err)
	}
	if len(req.Pushes) == 0 || len(req.Pushes) > maxForwardPushes {
		return nil, fmt.Errorf("%w: %d pushes (1 to %d)", ErrBadForward, len(req.Pushes), maxForwardPushes)
	}
	out := make([]server.ForwardedPush, len(req.Pushes))
	for i, p := range req.Pushes {
		if p.Client == "" || len(p.Client) > 128 || p.User == "" {
			return nil, fmt.Errorf("%w: push %d: client %q, user %q", ErrBadForward, i, p.Client, p.User)
		}
		if len(p.Mutations) > maxForwardMutations {
			return nil, fmt.Errorf("%w: push %d: %d mutations", ErrBadForward, i, len(p.Mutations))
		}
		fp := server.ForwardedPush{ClientID: p.Client, UserID: p.User, Claims: p.Claims, Mutations: make([]protocol.Mutation, len(p.Mutations))}
		for j, m := range p.Mutations {
			if m.ID == 0 || m.Name == "" {
				return nil, fmt.Errorf("%w: push %d mutation %d: id %d, name %q", ErrBadForward, i, j, m.ID, m.Name)
			}
			if j > 0 && m.ID <= p.Mutations[j-1].ID {
				return nil, fmt.Errorf("%w: push %d: mutation ids not increasing (%d after %d)", ErrBadForward, i, m.ID, p.Mutations[j-1].ID)
			}
			fp.Mutations[j] = protocol.Mutation{ID: m.ID, Name: m.Name, Args: m.Args}
		}
		out[i] = fp
	}
	return out, nil
}

// encodeReply is the owner's reply: the results, or the error that kept
// it from running the pushes.
func encodeReply(res []server.ForwardedResult, err error) []byte {
	var r fwdReply
	switch {
	case errors.Is(err, server.ErrNotOwner):
		r.NotOwner, r.Err = true, err.Error()
	case err != nil:
		r.Err = err.Error()
	default:
		r.Results = make([]fwdResult, len(res))
		for i, x := range res {
			r.Results[i] = fwdResult{Last: x.LastMutationID, Version: x.Version, Code: x.Code, Message: x.Message}
		}
	}
	b, merr := json.Marshal(r)
	if merr != nil {
		b, _ = json.Marshal(fwdReply{Err: merr.Error()})
	}
	return b
}

// decodeReply decodes the owner's reply to a request of n pushes.
func decodeReply(b []byte, n int) ([]server.ForwardedResult, error) {
	var r fwdReply
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: reply: %w", ErrBadForward, err)
	}
	switch {
	case r.NotOwner:
		return nil, fmt.Errorf("%w: %s", server.ErrNotOwner, r.Err)
	case r.Err != "":
		return nil, fmt.Errorf("cluster: the owner could not run the pushes: %s", r.Err)
	case len(r.Results) != n:
		return nil, fmt.Errorf("%w: reply: %d results for %d pushes", ErrBadForward, len(r.Results), n)
	}
	out := make([]server.ForwardedResult, n)
	for i, x := range r.Results {
		if x.Code == 0 && x.Version == 0 && x.Last != 0 {
			return nil, fmt.Errorf("%w: reply: result %d acks mutation %d in version 0", ErrBadForward, i, x.Last)
		}
		out[i] = server.ForwardedResult{LastMutationID: x.Last, Version: x.Version, Code: x.Code, Message: x.Message}
	}
	return out, nil
}

// ForwardHandler runs forwarded pushes on the owner's node:
// server.Server.ServeForwarded.
type ForwardHandler func(ctx context.Context, db string, pushes []server.ForwardedPush) ([]server.ForwardedResult, error)

// SetForwardHandler sets what runs the pushes other nodes forward to the
// databases this node owns. Set it before the server serves: a request
// that comes with none set is answered with an error.
func (o *Owner) SetForwardHandler(h ForwardHandler) {
	o.mu.Lock()
	o.handler = h
	o.mu.Unlock()
}

// Forward implements server.Follower: it sends pushes to db's owner in one
// request, split if they exceed the connection's maximum payload, and
// returns the owner's answers in order. No responder (the owner's node is
// gone, or holds no lease) is server.ErrNotOwner.
func (o *Owner) Forward(ctx context.Context, db string, pushes []server.ForwardedPush) ([]server.ForwardedResult, error) {
	out := make([]server.ForwardedResult, 0, len(pushes))
	for len(pushes) > 0 {
		n, b, err := o.fitForward(pushes)
		if err != nil {
			return out, err
		}
		m, err := o.log.nc.RequestWithContext(ctx, PushSubject(db), b)
		if errors.Is(err, nats.ErrNoResponders) {
			return out, fmt.Errorf("%w: nobody answers for %s", server.ErrNotOwner, db)
		}
		if err != nil {
			return out, fmt.Errorf("cluster: forward pushes of %s: %w", db, err)
		}
		res, err := decodeReply(m.Data, n)
		if err != nil {
			return out, err
		}
		out = append(out, res...)
		pushes = pushes[n:]
	}
	return out, nil
}

// fitForward encodes as many of pushes, from the first, as fit in one
// message (at least one, or an error saying the first alone is too large).
func (o *Owner) fitForward(pushes []server.ForwardedPush) (int, []byte, error) {
	max := o.log.max - 4096 // headers and the inbox
	for n := min(len(pushes), maxForwardPushes); n > 0; n /= 2 {
		b, err := encodeForward(pushes[:n])
		if err != nil {
			return 0, nil, err
		}
		if o.log.max <= 0 || int64(len(b)) <= max {
			return n, b, nil
		}
	}
	return 0, nil, fmt.Errorf("%w: one push of %d mutations is larger than the maximum payload (%d)", ErrTooLarge, len(pushes[0].Mutations), o.log.max)
}

// serveForwards subscribes to db's forwarded pushes while this node holds
// its lease (the caller unsubscribes when it drops it). Each request runs
// on its own goroutine: a forwarding node sends its next request only
// after this one's reply, so requests of one node never overtake each
// other, and those of different nodes share the owner's group commit.
func (o *Owner) serveForwards(db string) (*nats.Subscription, error) {
	return o.log.nc.QueueSubscribe(PushSubject(db), forwardQueue, func(m *nats.Msg) {
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			m.Respond(o.runForwarded(db, m.Data))
		}()
	})
}

// runForwarded decodes and runs one request, returning the reply.
func (o *Owner) runForwarded(db string, data []byte) []byte {
	pushes, err := decodeForward(data)
	if err != nil {
		return encodeReply(nil, err)
	}
	o.mu.Lock()
	h := o.handler
	o.mu.Unlock()
	if h == nil {
		return encodeReply(nil, errors.New("cluster: this node runs no forwarded pushes"))
	}
	ctx, cancel := context.WithTimeout(o.ctx, forwardTimeout)
	defer cancel()
	res, err := h(ctx, db, pushes)
	return encodeReply(res, err)
}
