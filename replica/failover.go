package replica

import (
	"errors"

	"github.com/sqlrebase/sqlrebase/protocol"
)

// Fail-over between the nodes of a Remote (Addr, then Alternates): which
// node the sync loop dials next is decided here, from the outcome of the
// last attempt, so that the loop only carries the cursor.

// nodeCursor is the sync loop's place among the nodes.
type nodeCursor struct {
	// Cur is the index of the node the next attempt dials.
	Cur int
	// Failures counts the attempts in a row that moved on since a node
	// last welcomed a session. Once it reaches a multiple of the number of
	// nodes, every node has failed in this round, and the loop backs off
	// before it starts the next round.
	Failures int
}

// next is the cursor after an attempt on c.Cur among nodes nodes (at
// least 1). welcomed says the node accepted the Hello; moveOn (see
// moveOnError) says the attempt's error is the node's, and another node may
// do better. now reports whether the next attempt goes at once, without the
// loop's backoff: it does when it moves to a node not yet tried in this
// round, so that a dead first node costs one failed attempt, not a backoff.
func (c nodeCursor) next(nodes int, welcomed, moveOn bool) (next nodeCursor, now bool) {
	if nodes < 1 {
		nodes = 1
	}
	if c.Cur < 0 || c.Cur >= nodes {
		c.Cur = 0
	}
	if welcomed {
		c.Failures = 0
	}
	if !moveOn {
		return c, false
	}
	c.Cur = (c.Cur + 1) % nodes
	c.Failures++
	return c, nodes > 1 && c.Failures%nodes != 0
}

// moveOnError reports whether an attempt's error is one that another node
// of the same service may not share: the node could not be reached or
// stopped answering, or it refused with a code that retrying may cure
// (shutting down, busy, an internal error). A welcomed session that ends
// otherwise (the connection lost mid-way) stays: the next attempt on the
// same node finds out whether it is gone. Fatal errors never get here.
func moveOnError(err error, welcomed bool) bool {
	if err == nil {
		return false
	}
	var re *protocol.RemoteError
	if errors.As(err, &re) {
		switch re.Code {
		case protocol.CodeShuttingDown:
			return true
		case protocol.CodeBusy, protocol.CodeInternal:
			return !welcomed
		}
		return false
	}
	if errors.Is(err, errNodeSilent) {
		return true // the node is gone, however the session began
	}
	if welcomed || errors.Is(err, errTokenSource) {
		return false
	}
	// Not welcomed: a dial, stream or Hello failure, or no Welcome in time.
	return true
}
