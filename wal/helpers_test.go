package wal

import "encoding/binary"

func putNative32(b []byte, v uint32) { binary.NativeEndian.PutUint32(b, v) }
func putNative16(b []byte, v uint16) { binary.NativeEndian.PutUint16(b, v) }
