//go:build !(linux || darwin) || sqlite3_flock || sqlite3_dotlk

package vfs

import (
	"errors"
	"os"
)

var errBusy = errors.New("vfs: lock busy")

func readLock(*os.File, int64, int64) error  { return ErrUnsupported }
func writeLock(*os.File, int64, int64) error { return ErrUnsupported }
func unlock(*os.File, int64, int64) error    { return ErrUnsupported }

func mapShared(*os.File, int) ([]byte, error) { return nil, ErrUnsupported }
func unmap([]byte) error                      { return nil }
