package wal

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSQLiteCLICrossCheck has the stock sqlite3 CLI write a real WAL and
// -shm, copies them while the connection is still open (the CLI checkpoints
// and deletes the WAL on close), and checks every decoder and encoder in this
// package against SQLite's own bytes.
func TestSQLiteCLICrossCheck(t *testing.T) {
	if _, err := exec.LookPath("sqlite3"); err != nil {
		t.Skip("sqlite3 CLI not on PATH")
	}
	if _, err := exec.LookPath("cp"); err != nil {
		t.Skip("cp not on PATH")
	}
	for _, pageSize := range []int{512, 4096, 65536} {
		t.Run(fmt.Sprint(pageSize), func(t *testing.T) {
			dir := t.TempDir()
			script := strings.Join([]string{
				fmt.Sprintf("PRAGMA page_size=%d;", pageSize),
				"PRAGMA journal_mode=wal;",
				"PRAGMA wal_autocheckpoint=0;",
				"create table t(x);",
				"insert into t values(1);",
				"insert into t values(2);",
				// Several pages in one transaction: multi-frame commits.
				"insert into t values(randomblob(200000));",
				"begin; insert into t values(3); update t set x=4 where x=1; commit;",
				"delete from t where x=2;",
				".shell cp db-wal copy-wal && cp db-shm copy-shm",
				"",
			}, "\n")
			cmd := exec.Command("sqlite3", "db")
			cmd.Dir = dir
			cmd.Stdin = strings.NewReader(script)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("sqlite3: %v\n%s", err, out)
			}
			walBytes, err := os.ReadFile(filepath.Join(dir, "copy-wal"))
			if err != nil {
				t.Fatal(err)
			}
			shm, err := os.ReadFile(filepath.Join(dir, "copy-shm"))
			if err != nil {
				t.Fatal(err)
			}
			checkRealWAL(t, walBytes, shm, uint32(pageSize), 5)
		})
	}
}

func checkRealWAL(t *testing.T, walBytes, shm []byte, pageSize uint32, minCommits int) {
	t.Helper()
	h, err := DecodeHeader(walBytes)
	if err != nil {
		t.Fatalf("DecodeHeader: %v", err)
	}
	if h.PageSize != pageSize {
		t.Fatalf("page size %d, want %d", h.PageSize, pageSize)
	}
	if enc := h.Encode(); !bytes.Equal(enc[:], walBytes[:HeaderSize]) {
		t.Fatalf("header re-encodes to\n%x\nwant\n%x", enc, walBytes[:HeaderSize])
	}
	c := NewChain(h)
	enc := NewChain(h)
	fs := c.FrameSize()
	if (len(walBytes)-HeaderSize)%fs != 0 {
		t.Fatalf("wal length %d is not header + whole frames of %d", len(walBytes), fs)
	}
	var frames, commits uint32
	var lastCommit FrameHeader
	for off := HeaderSize; off < len(walBytes); off += fs {
		frame := walBytes[off : off+fs]
		fh, page, next, err := c.Next(frame)
		if err != nil {
			t.Fatalf("frame %d: %v", frames+1, err)
		}
		if fh.Salt1 != h.Salt1 || fh.Salt2 != h.Salt2 {
			t.Fatalf("frame %d: salts differ from header", frames+1)
		}
		if !bytes.Equal(page, frame[FrameHeaderSize:]) {
			t.Fatalf("frame %d: page is not the frame's data", frames+1)
		}
		var re []byte
		re, enc = enc.EncodeFrame(fh.Pgno, fh.Commit, page)
		if !bytes.Equal(re, frame) {
			t.Fatalf("frame %d: EncodeFrame differs from SQLite's frame", frames+1)
		}
		c = next
		frames++
		if fh.Commit != 0 {
			commits++
			lastCommit = fh
		}
	}
	if int(commits) < minCommits {
		t.Fatalf("%d commit frames, want at least %d", commits, minCommits)
	}
	ih, ci, err := DecodeIndex(shm)
	if err != nil {
		t.Fatalf("DecodeIndex: %v", err)
	}
	if ih.MxFrame != frames {
		t.Errorf("MxFrame %d, want %d frames", ih.MxFrame, frames)
	}
	if ih.NPage != lastCommit.Commit {
		t.Errorf("NPage %d, want %d", ih.NPage, lastCommit.Commit)
	}
	if ih.FrameCksum != [2]uint32{c.S0, c.S1} {
		t.Errorf("FrameCksum %x, want chain checksum %x", ih.FrameCksum, [2]uint32{c.S0, c.S1})
	}
	if ih.Salt != [2]uint32{h.Salt1, h.Salt2} {
		t.Errorf("Salt %x, want header salts %x %x", ih.Salt, h.Salt1, h.Salt2)
	}
	if ih.PageSize != pageSize || ih.BigEndCksum != h.BigEndianChecksum() || !ih.IsInit {
		t.Errorf("index header %+v inconsistent with WAL header %+v", ih, h)
	}
	if ci.NBackfill > ih.MxFrame {
		t.Errorf("nBackfill %d beyond mxFrame %d", ci.NBackfill, ih.MxFrame)
	}
	// Our encoder must produce SQLite's bytes, apart from the lock bytes
	// whose contents are undefined.
	re := EncodeIndex(ih, ci)
	if !bytes.Equal(re[:120], shm[:120]) || !bytes.Equal(re[128:], shm[128:IndexHeaderSize]) {
		t.Errorf("index re-encodes to\n%x\nwant\n%x", re, shm[:IndexHeaderSize])
	}
}

// Bytes written by sqlite3 3.40.1 on a little-endian host with
// PRAGMA page_size=65536 and one insert: known answers independent of our
// own encoder.
const (
	realHeader64K = "377f0682002de2180001000000000000a139c118e83e29a0ed883eb445895641"
	realShm64K    = "18e22d000000000002000000010001000300000002000000" +
		"60c5ba31aa97b0b2a139c118e83e29a072630735" + "7e8b64bd" +
		"18e22d000000000002000000010001000300000002000000" +
		"60c5ba31aa97b0b2a139c118e83e29a072630735" + "7e8b64bd" +
		"0000000000000000" + "02000000ffffffffffffffffffffffff" +
		"0000000000000000" + "0000000000000000"
)

func TestKnownAnswerRealHeader(t *testing.T) {
	b, _ := hex.DecodeString(realHeader64K)
	h, err := DecodeHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	want := Header{Magic: MagicLE, Version: FormatVersion, PageSize: 65536, CheckpointSeq: 0,
		Salt1: 0xa139c118, Salt2: 0xe83e29a0, Checksum1: 0xed883eb4, Checksum2: 0x45895641}
	if h != want {
		t.Fatalf("got %+v want %+v", h, want)
	}
}

func TestKnownAnswerRealIndex(t *testing.T) {
	if nativeBigEndian {
		t.Skip("fixture was written on a little-endian host")
	}
	b, _ := hex.DecodeString(realShm64K)
	if len(b) != IndexHeaderSize {
		t.Fatalf("fixture is %d bytes", len(b))
	}
	h, ci, err := DecodeIndex(b)
	if err != nil {
		t.Fatal(err)
	}
	want := IndexHeader{Change: 2, IsInit: true, PageSize: 65536, MxFrame: 3, NPage: 2,
		FrameCksum: [2]uint32{0x31bac560, 0xb2b097aa}, Salt: [2]uint32{0xa139c118, 0xe83e29a0}}
	if h != want {
		t.Fatalf("got %+v want %+v", h, want)
	}
	wantCI := CheckpointInfo{ReadMark: [5]uint32{0, 2, ReadMarkNotUsed, ReadMarkNotUsed, ReadMarkNotUsed}}
	if ci != wantCI {
		t.Fatalf("got %+v want %+v", ci, wantCI)
	}
	if re := EncodeIndex(h, ci); !bytes.Equal(re, b) {
		t.Fatalf("re-encodes to\n%x\nwant\n%x", re, b)
	}
}
