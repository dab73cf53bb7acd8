package server

import (
	"context"
	"fmt"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// Takeover is a LocalCache whose new owner of a database must append a
// version before the database serves anything (docs/CLUSTER.md, "A new
// owner's restore", step 5): its first append moves the log's tail, so a
// deposed owner that has not noticed (a paused process, a slow clock) is
// refused at its next append at once, rather than only after the new
// owner's first push. NeedsTakeover reports whether db, just opened and
// checked, needs that version: the cluster says so while it holds the
// database's lease and has appended nothing under it.
type Takeover interface {
	LocalCache
	NeedsTakeover(db string) bool
}

// appendTakeover commits the takeover version of a, just opened and checked,
// if the version log asks for one: a version of its own with no change
// but the version number, which the version log appends like any other
// (replicas apply it like any other). On an error a is closed and reset,
// as by a failed open: the version log refused it (another owner
// appended first), or the commit failed.
func (d *database) appendTakeover(ctx context.Context, a *Authority) error {
	t, ok := d.cfg.VersionLog.(Takeover)
	if !ok || !t.NeedsTakeover(d.name) {
		return nil
	}
	if _, err := a.commit(ctx, func(mutators.Tx) error { return nil }); err != nil {
		a.Close()
		a.reset()
		return fmt.Errorf("server: takeover version: %w", err)
	}
	d.log.Info("appended the takeover version", "version", a.version)
	return nil
}
