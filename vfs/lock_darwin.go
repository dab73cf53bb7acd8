//go:build darwin && !(sqlite3_flock || sqlite3_dotlk)

package vfs

// macOS has OFD locks but golang.org/x/sys/unix does not name them; these are
// the values from <sys/fcntl.h>, as go-sqlite3 uses them.
const (
	ofdSetLock = 90
	ofdGetLock = 92
)
