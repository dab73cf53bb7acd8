package replica

import (
	"database/sql/driver"
	"net/url"

	sqlitedriver "github.com/ncruces/go-sqlite3/driver"

	"github.com/sqlrebase/sqlrebase/vfs"
)

// Connector returns a database/sql connector for the replica's read
// connections: what DB() is made of, for a *sql.DB of the caller's own
// (sql.OpenDB), as the sqlrebase driver package builds one per sql.Open.
// Its connections pass the same gate and carry the same authorizer as
// DB()'s. Closing the replica makes them fail.
func (r *Replica) Connector() (driver.Connector, error) {
	dsn := "file:" + (&url.URL{Path: r.path}).EscapedPath() + "?vfs=" + vfs.Name + "&_txlock=deferred"
	inner, err := (&sqlitedriver.SQLite{}).OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	return &readConnector{r: r, inner: inner}, nil
}
