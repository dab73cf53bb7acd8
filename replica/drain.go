package replica

import "time"

// rebaseDue gathers the session's state for the pure decision rebaseDue,
// and, when it defers a rebase, arms one wake-up of the sync loop for when
// the deferral runs out (the server may stay quiet meanwhile).
func (ss *session) rebaseDue() bool {
	r := ss.r
	var acked uint64
	if base := r.queue.settled(); ss.cur.Acked > base {
		acked = ss.cur.Acked - base
	}
	st := rebaseState{
		Collected:       len(ss.versions) + ss.readyCount(),
		SnapshotPartial: ss.snapshot,
		MoreWaiting:     len(ss.in.msgs) > 0,
		Pending:         uint64(r.queue.Len()),
		Acked:           acked,
		SinceRebase:     time.Since(time.Unix(0, r.lastRebase.Load())),
	}
	maxDefer := r.rebaseDefer()
	if rebaseDue(st, maxDefer) {
		return true
	}
	if st.Collected > 0 && !st.SnapshotPartial && !st.MoreWaiting && r.deferWake.CompareAndSwap(false, true) {
		time.AfterFunc(maxDefer-st.SinceRebase, func() {
			r.deferWake.Store(false)
			r.net.kick()
		})
	}
	return false
}

// rebaseDefer is the bound on deferring a rebase while a backlog drains.
func (r *Replica) rebaseDefer() time.Duration {
	if r.opts.rebaseDefer > 0 {
		return r.opts.rebaseDefer
	}
	return maxRebaseDefer
}
