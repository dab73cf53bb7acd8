//go:build !(linux || darwin) || sqlite3_flock || sqlite3_dotlk

package vfs

const supported = false
