package replica

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"pgregory.net/rapid"
)

func testMut(id uint64) queuedMutation {
	return queuedMutation{ID: id, Name: "createCategoryOrIncrementIfExists", Args: json.RawMessage(fmt.Sprintf(`{"name":"c%d","delta":1}`, id))}
}

func mustOpenQueue(t testing.TB, path string, sync bool) *queue {
	t.Helper()
	q, err := openQueue(path, sync)
	if err != nil {
		t.Fatalf("openQueue: %v", err)
	}
	return q
}

func appendN(t testing.TB, q *queue, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if err := q.Append(testMut(q.NextID())); err != nil {
			t.Fatalf("Append: %v", err)
		}
	}
}

func ids(ms []queuedMutation) []uint64 {
	out := []uint64{}
	for _, m := range ms {
		out = append(out, m.ID)
	}
	return out
}

func idRange(lo, hi uint64) []uint64 {
	out := []uint64{}
	for i := lo; i <= hi; i++ {
		out = append(out, i)
	}
	return out
}

func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

func checkPending(t testing.TB, q *queue, want []uint64) {
	t.Helper()
	got := pendingOf(t, q)
	if !reflect.DeepEqual(ids(got), want) {
		t.Fatalf("pending ids = %v, want %v", ids(got), want)
	}
	for _, m := range got {
		if w := testMut(m.ID); !reflect.DeepEqual(m, w) {
			t.Fatalf("pending %d = %+v, want %+v", m.ID, m, w)
		}
	}
	if q.Len() != len(want) {
		t.Fatalf("Len = %d, want %d", q.Len(), len(want))
	}
}

func TestQueueHeaderRoundTrip(t *testing.T) {
	id := [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	for _, base := range []uint64{0, 1, 1<<64 - 1} {
		b := encodeQueueHeader(id, base)
		if len(b) != queueHeaderSize {
			t.Fatalf("header is %d bytes", len(b))
		}
		gotID, gotBase, err := decodeQueueHeader(b)
		if err != nil || gotID != id || gotBase != base {
			t.Errorf("decode = %x, %d, %v", gotID, gotBase, err)
		}
		for i := range b {
			c := bytes.Clone(b)
			c[i] ^= 0x10
			if _, _, err := decodeQueueHeader(c); !errors.Is(err, errQueueCorrupt) {
				t.Errorf("flip in byte %d: err = %v", i, err)
			}
		}
		if _, _, err := decodeQueueHeader(b[:queueHeaderSize-1]); !errors.Is(err, errQueueCorrupt) {
			t.Errorf("short header: err = %v", err)
		}
	}
}

func TestQueueRecordRoundTrip(t *testing.T) {
	ms := []queuedMutation{
		{ID: 7, Name: "a", Args: json.RawMessage(`{}`)},
		{ID: 8, Name: "", Args: nil},
		{ID: 9, Name: strings.Repeat("n", 300), Args: json.RawMessage(`[1,2,3]`)},
	}
	var b []byte
	for _, m := range ms {
		b = appendQueueRecord(b, m)
	}
	recs, valid := decodeQueueRecords(b, 0)
	if valid != len(b) || !reflect.DeepEqual(recs, ms) {
		t.Fatalf("decode = %+v, %d (of %d)", recs, valid, len(b))
	}
	recs, valid = decodeQueueRecords(b, 8)
	if valid != len(b) || !reflect.DeepEqual(recs, ms[2:]) {
		t.Fatalf("decode after 8 = %+v, %d", recs, valid)
	}
	// A gap in the ids ends the valid prefix.
	gap := appendQueueRecord(bytes.Clone(b), queuedMutation{ID: 11, Name: "x"})
	if recs, valid := decodeQueueRecords(gap, 0); valid != len(b) || len(recs) != 3 {
		t.Fatalf("gap: %d records, valid %d", len(recs), valid)
	}
}

func TestQueueCreateAndReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db-pending")
	q := mustOpenQueue(t, path, false)
	cid := q.ClientID()
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(cid) {
		t.Fatalf("ClientID = %q", cid)
	}
	if q.NextID() != 1 || q.Len() != 0 {
		t.Fatalf("fresh queue: NextID %d, Len %d", q.NextID(), q.Len())
	}
	if err := q.Append(testMut(2)); err == nil {
		t.Fatal("Append with a wrong id succeeded")
	}
	appendN(t, q, 3)
	// The caller's buffer may be reused after Append.
	m := testMut(4)
	if err := q.Append(m); err != nil {
		t.Fatal(err)
	}
	copy(m.Args, "XXXX")
	checkPending(t, q, idRange(1, 4))
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := q.Append(testMut(5)); !errors.Is(err, errQueueClosed) {
		t.Fatalf("Append after Close = %v", err)
	}

	q = mustOpenQueue(t, path, true)
	defer q.Close()
	if q.ClientID() != cid {
		t.Fatalf("client id changed: %s -> %s", cid, q.ClientID())
	}
	checkPending(t, q, idRange(1, 4))
	if q.NextID() != 5 {
		t.Fatalf("NextID = %d", q.NextID())
	}
	other := mustOpenQueue(t, filepath.Join(t.TempDir(), "other-pending"), false)
	defer other.Close()
	if other.ClientID() == cid {
		t.Fatal("two queues got the same client id")
	}
}

func TestQueueLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db-pending")
	q := mustOpenQueue(t, path, false)
	_, err := openQueue(path, false)
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), path) {
		t.Fatalf("second open = %v, want ErrLocked with the path", err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = mustOpenQueue(t, path, false)
	q.Close()
}

// threeRecordFile returns the bytes of a queue file with records 1..3 and
// the offset where each record ends.
func threeRecordFile(t *testing.T) ([]byte, []int) {
	path := filepath.Join(t.TempDir(), "db-pending")
	q := mustOpenQueue(t, path, false)
	var ends []int
	for i := 0; i < 3; i++ {
		appendN(t, q, 1)
		ends = append(ends, int(fileSize(t, path)))
	}
	q.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data, ends
}

func TestQueueEveryTruncation(t *testing.T) {
	data, ends := threeRecordFile(t)
	dir := t.TempDir()
	for cut := 0; cut <= len(data); cut++ {
		path := filepath.Join(dir, fmt.Sprintf("cut%d", cut))
		if err := os.WriteFile(path, data[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		q, err := openQueue(path, false)
		if cut > 0 && cut < queueHeaderSize {
			if !errors.Is(err, errQueueCorrupt) {
				t.Fatalf("cut %d in the header: err = %v", cut, err)
			}
			if fileSize(t, path) != int64(cut) {
				t.Fatalf("cut %d: a corrupt file was modified", cut)
			}
			continue
		}
		if err != nil {
			t.Fatalf("cut %d: %v", cut, err)
		}
		complete, wantSize := 0, queueHeaderSize
		for i, end := range ends {
			if cut >= end {
				complete, wantSize = i+1, end
			}
		}
		checkPending(t, q, idRange(1, uint64(complete)))
		if q.NextID() != uint64(complete)+1 {
			t.Fatalf("cut %d: NextID = %d", cut, q.NextID())
		}
		if got := fileSize(t, path); got != int64(wantSize) {
			t.Fatalf("cut %d: file is %d bytes, want %d", cut, got, wantSize)
		}
		// The recovered queue accepts appends where the torn one stopped.
		appendN(t, q, 1)
		q.Close()
		q = mustOpenQueue(t, path, false)
		checkPending(t, q, idRange(1, uint64(complete)+1))
		q.Close()
	}
}

func TestQueueBitFlipInLastRecord(t *testing.T) {
	data, ends := threeRecordFile(t)
	dir := t.TempDir()
	for i := ends[1]; i < ends[2]; i++ {
		for _, bit := range []byte{0x01, 0x80} {
			c := bytes.Clone(data)
			c[i] ^= bit
			path := filepath.Join(dir, fmt.Sprintf("flip%d-%d", i, bit))
			if err := os.WriteFile(path, c, 0o644); err != nil {
				t.Fatal(err)
			}
			q := mustOpenQueue(t, path, false)
			checkPending(t, q, []uint64{1, 2})
			if got := fileSize(t, path); got != int64(ends[1]) {
				t.Fatalf("flip at %d: file is %d bytes, want %d", i, got, ends[1])
			}
			q.Close()
		}
	}
}

func TestQueueCorruptHeaderIsAnError(t *testing.T) {
	data, _ := threeRecordFile(t)
	data[10] ^= 1
	path := filepath.Join(t.TempDir(), "db-pending")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := openQueue(path, false); !errors.Is(err, errQueueCorrupt) {
		t.Fatalf("open = %v, want errQueueCorrupt", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Fatal("a corrupt queue file was modified")
	}
	// The lock was released with the failed open.
	if _, err := openQueue(path, false); !errors.Is(err, errQueueCorrupt) {
		t.Fatalf("second open = %v, want errQueueCorrupt", err)
	}
}

func TestQueueSettleReopen(t *testing.T) {
	for _, sync := range []bool{false, true} {
		t.Run(fmt.Sprintf("sync=%v", sync), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "db-pending")
			q := mustOpenQueue(t, path, sync)
			appendN(t, q, 5)
			if err := q.Settle(2); err != nil {
				t.Fatal(err)
			}
			checkPending(t, q, idRange(3, 5))
			if err := q.Settle(1); err != nil { // never lowers
				t.Fatal(err)
			}
			checkPending(t, q, idRange(3, 5))
			q.Close()
			q = mustOpenQueue(t, path, sync)
			defer q.Close()
			checkPending(t, q, idRange(3, 5))
			if q.NextID() != 6 {
				t.Fatalf("NextID = %d", q.NextID())
			}
		})
	}
}

func TestQueueCompactTruncate(t *testing.T) {
	for _, sync := range []bool{false, true} {
		t.Run(fmt.Sprintf("sync=%v", sync), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "db-pending")
			q := mustOpenQueue(t, path, sync)
			appendN(t, q, 3)
			if err := q.Settle(3); err != nil {
				t.Fatal(err)
			}
			// Under compactMin the settled records stay, behind the base,
			// and the next append goes after them.
			if got := fileSize(t, path); got == queueHeaderSize {
				t.Fatalf("file is %d bytes after settling 3 under compactMin: truncated", got)
			}
			appendN(t, q, 1)
			q.Close()
			q = mustOpenQueue(t, path, sync)
			checkPending(t, q, []uint64{4})
			q.compactMin = 0
			if err := q.Settle(4); err != nil {
				t.Fatal(err)
			}
			if got := fileSize(t, path); got != queueHeaderSize {
				t.Fatalf("file is %d bytes after settling everything past compactMin", got)
			}
			q.Close()
			q = mustOpenQueue(t, path, sync)
			checkPending(t, q, []uint64{})
			if q.NextID() != 5 {
				t.Fatalf("NextID after compaction to empty = %d, want 5 (ids must not be reused)", q.NextID())
			}
			appendN(t, q, 2)
			// Settling beyond the last id moves the base past it, and
			// empties the file whatever compactMin: the next id (11) after
			// the records left (5, 6) would be a gap, which ends a queue.
			if err := q.Settle(10); err != nil {
				t.Fatal(err)
			}
			if got := fileSize(t, path); got != queueHeaderSize {
				t.Fatalf("file is %d bytes after settling past the last id", got)
			}
			q.Close()
			q = mustOpenQueue(t, path, sync)
			defer q.Close()
			if q.NextID() != 11 || q.Len() != 0 {
				t.Fatalf("NextID = %d, Len = %d; want 11, 0", q.NextID(), q.Len())
			}
		})
	}
}

// A crash between the header write and the truncate of compaction leaves
// settled records behind a raised base.
func TestQueueCompactCrashBetweenHeaderAndTruncate(t *testing.T) {
	data, _ := threeRecordFile(t)
	cid, _, err := decodeQueueHeader(data)
	if err != nil {
		t.Fatal(err)
	}
	copy(data, encodeQueueHeader(cid, 3))
	path := filepath.Join(t.TempDir(), "db-pending")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	q := mustOpenQueue(t, path, false)
	defer q.Close()
	checkPending(t, q, []uint64{})
	if q.NextID() != 4 {
		t.Fatalf("NextID = %d", q.NextID())
	}
	if got := fileSize(t, path); got != queueHeaderSize {
		t.Fatalf("file is %d bytes, want the header only", got)
	}
}

func TestQueueCompactRewrite(t *testing.T) {
	for _, sync := range []bool{false, true} {
		t.Run(fmt.Sprintf("sync=%v", sync), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "db-pending")
			q := mustOpenQueue(t, path, sync)
			q.compactMin = 200
			appendN(t, q, 20)
			before, _ := os.Stat(path)
			if err := q.Settle(15); err != nil {
				t.Fatal(err)
			}
			after, _ := os.Stat(path)
			if os.SameFile(before, after) {
				t.Fatal("Settle did not rewrite the file")
			}
			checkPending(t, q, idRange(16, 20))
			var want []byte
			for _, m := range pendingOf(t, q) {
				want = appendQueueRecord(want, m)
			}
			if after.Size() != int64(queueHeaderSize+len(want)) {
				t.Fatalf("rewritten file is %d bytes, want %d", after.Size(), queueHeaderSize+len(want))
			}
			if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("temporary file left behind: %v", err)
			}
			// The lock moved to the new file.
			if _, err := openQueue(path, false); !errors.Is(err, ErrLocked) {
				t.Fatalf("open during ownership = %v, want ErrLocked", err)
			}
			// Appends go to the new file.
			appendN(t, q, 2)
			// A small settle now does not rewrite.
			if err := q.Settle(16); err != nil {
				t.Fatal(err)
			}
			if again, _ := os.Stat(path); !os.SameFile(after, again) {
				t.Fatal("a small settled prefix caused a rewrite")
			}
			q.Close()
			q = mustOpenQueue(t, path, sync)
			defer q.Close()
			checkPending(t, q, idRange(17, 22))
			if q.NextID() != 23 {
				t.Fatalf("NextID = %d", q.NextID())
			}
		})
	}
}

func TestQueueStaleTempFileRemoved(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db-pending")
	if err := os.WriteFile(path+".tmp", []byte("half a rewrite"), 0o644); err != nil {
		t.Fatal(err)
	}
	q := mustOpenQueue(t, path, false)
	defer q.Close()
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale temporary file: %v", err)
	}
}

func TestQueueAppendTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db-pending")
	q := mustOpenQueue(t, path, false)
	defer q.Close()
	big := queuedMutation{ID: 1, Name: "m", Args: make(json.RawMessage, queueMaxBody)}
	if err := q.Append(big); err == nil {
		t.Fatal("Append of an oversized record succeeded")
	}
	if q.NextID() != 1 || fileSize(t, path) != queueHeaderSize {
		t.Fatal("a failed Append changed the queue")
	}
}

// TestQueueModel checks the queue against an in-memory model under random
// appends, settles, reopens and torn tails.
func TestQueueModel(t *testing.T) {
	dir := t.TempDir()
	n := 0
	rapid.Check(t, func(rt *rapid.T) {
		n++
		path := filepath.Join(dir, fmt.Sprintf("q%d", n))
		sync := rapid.Bool().Draw(rt, "sync")
		q, err := openQueue(path, sync)
		if err != nil {
			rt.Fatal(err)
		}
		defer func() { q.Close() }()
		q.compactMin = int64(rapid.IntRange(0, 2000).Draw(rt, "compactMin"))
		cid := q.ClientID()
		var model []queuedMutation
		var base, last uint64
		nextID := func() uint64 { return max(base, last) + 1 }
		reopen := func() {
			if err := q.Close(); err != nil {
				rt.Fatal(err)
			}
			cm := q.compactMin
			if q, err = openQueue(path, sync); err != nil {
				rt.Fatal(err)
			}
			q.compactMin = cm
		}
		rt.Repeat(map[string]func(*rapid.T){
			"append": func(rt *rapid.T) {
				m := queuedMutation{
					ID:   nextID(),
					Name: rapid.StringMatching(`[a-z]{0,20}`).Draw(rt, "name"),
					Args: json.RawMessage(rapid.SliceOfN(rapid.Byte(), 0, 300).Draw(rt, "args")),
				}
				if len(m.Args) == 0 {
					m.Args = nil
				}
				if err := q.Append(m); err != nil {
					rt.Fatal(err)
				}
				model = append(model, m)
				last = m.ID
			},
			"settle": func(rt *rapid.T) {
				lmid := rapid.Uint64Range(0, nextID()+2).Draw(rt, "lmid")
				if err := q.Settle(lmid); err != nil {
					rt.Fatal(err)
				}
				if lmid > base {
					base = lmid
					for len(model) > 0 && model[0].ID <= lmid {
						model = model[1:]
					}
				}
			},
			"reopen": func(*rapid.T) { reopen() },
			"tornTail": func(rt *rapid.T) {
				if err := q.Close(); err != nil {
					rt.Fatal(err)
				}
				// What a crash mid-append leaves: a prefix of the next record.
				rec := appendQueueRecord(nil, queuedMutation{ID: nextID(), Name: "torn", Args: json.RawMessage(`{"x":1}`)})
				cut := rapid.IntRange(1, len(rec)-1).Draw(rt, "cut")
				f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
				if err != nil {
					rt.Fatal(err)
				}
				if _, err := f.Write(rec[:cut]); err != nil {
					rt.Fatal(err)
				}
				f.Close()
				reopen()
			},
			"": func(rt *rapid.T) {
				if got := pendingOf(t, q); !reflect.DeepEqual(got, model) && !(len(got) == 0 && len(model) == 0) {
					rt.Fatalf("Pending = %v, want %v", ids(got), ids(model))
				}
				if q.Len() != len(model) {
					rt.Fatalf("Len = %d, want %d", q.Len(), len(model))
				}
				if q.NextID() != nextID() {
					rt.Fatalf("NextID = %d, want %d", q.NextID(), nextID())
				}
				if q.ClientID() != cid {
					rt.Fatalf("client id changed")
				}
			},
		})
	})
}

const crashChildEnv = "SQLREBASE_QUEUE_CRASH_CHILD"

// TestQueueCrashChild is the child of TestQueueCrash: it appends until it
// is killed, printing each id once Append has returned.
func TestQueueCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("only runs as the child of TestQueueCrash")
	}
	q, err := openQueue(path, false)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	// Small enough that Settle often rewrites the file, so kills land in
	// the middle of rewrites too.
	q.compactMin = 4096
	args := json.RawMessage(`{"name":"Food","delta":1,"padding":"` + strings.Repeat("p", 200) + `"}`)
	for {
		id := q.NextID()
		if err := q.Append(queuedMutation{ID: id, Name: "m", Args: args}); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		// Unbuffered: the parent must only see ids that Append returned.
		fmt.Fprintf(os.Stdout, "id %d\n", id)
		if id%50 == 0 {
			// Exercise compaction under crashes too.
			if err := q.Settle(id - 25); err != nil {
				fmt.Fprintln(os.Stderr, "child:", err)
				os.Exit(2)
			}
			fmt.Fprintf(os.Stdout, "settled %d\n", id-25)
		}
	}
}

func TestQueueCrash(t *testing.T) {
	if os.Getenv(crashChildEnv) != "" {
		t.Skip("child")
	}
	if testing.Short() {
		t.Skip("spawns processes")
	}
	path := filepath.Join(t.TempDir(), "db-pending")
	var printed []uint64
	var settled uint64
	for round := 0; round < 6; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestQueueCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		delay := time.Duration(rand.IntN(30)) * time.Millisecond
		sc := bufio.NewScanner(out)
		started := make(chan struct{})
		killed := make(chan struct{})
		go func() {
			// Kill at a random moment once the child is appending.
			select {
			case <-started:
				time.Sleep(delay)
			case <-time.After(30 * time.Second):
			}
			cmd.Process.Signal(syscall.SIGKILL)
			close(killed)
		}()
		first := true
		for sc.Scan() {
			if first {
				first = false
				close(started)
			}
			f := strings.Fields(sc.Text())
			if len(f) != 2 {
				continue
			}
			n, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				continue
			}
			switch f[0] {
			case "id":
				printed = append(printed, n)
			case "settled":
				settled = max(settled, n)
			}
		}
		<-killed
		cmd.Wait()
		if strings.Contains(stderr.String(), "child:") {
			t.Fatalf("child failed: %s", stderr.String())
		}

		q := mustOpenQueue(t, path, false)
		pending := pendingOf(t, q)
		// The child may have settled further than it got to print.
		if q.base < settled || len(printed) > 0 && q.base > printed[len(printed)-1] {
			t.Fatalf("round %d: base %d, want between %d and the last printed id", round, q.base, settled)
		}
		settled = q.base
		have := map[uint64]bool{}
		for i, m := range pending {
			have[m.ID] = true
			if i > 0 && m.ID != pending[i-1].ID+1 {
				t.Fatalf("round %d: gap in pending ids: %d after %d", round, m.ID, pending[i-1].ID)
			}
			if m.ID <= settled {
				t.Fatalf("round %d: settled id %d is pending again", round, m.ID)
			}
		}
		for _, id := range printed {
			if id > settled && !have[id] {
				t.Fatalf("round %d: id %d was appended but is lost (settled up to %d, %d pending)", round, id, settled, len(pending))
			}
		}
		if len(printed) > 0 && q.NextID() <= printed[len(printed)-1] {
			t.Fatalf("round %d: NextID %d would reuse id %d", round, q.NextID(), printed[len(printed)-1])
		}
		t.Logf("round %d: killed after %v, %d ids printed so far, %d pending, next %d", round, delay, len(printed), len(pending), q.NextID())
		q.Close()
	}
	if len(printed) == 0 {
		t.Fatal("the child never appended anything")
	}
}

func BenchmarkQueueAppend(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("sync=%v", sync), func(b *testing.B) {
			q := mustOpenQueue(b, filepath.Join(b.TempDir(), "db-pending"), sync)
			defer q.Close()
			args := json.RawMessage(`{"name":"Food","delta":1}`)
			b.ReportAllocs()
			for b.Loop() {
				if err := q.Append(queuedMutation{ID: q.NextID(), Name: "createCategoryOrIncrementIfExists", Args: args}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// While the owner keeps rewriting the file, another opener must never get
// the lock: not even on the old file the owner has just let go of.
func TestQueueLockedDuringRewrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db-pending")
	q := mustOpenQueue(t, path, false)
	defer q.Close()
	q.compactMin = 0
	done := make(chan error)
	go func() {
		for i := 0; i < 300; i++ {
			for j := 0; j < 3; j++ {
				if err := q.Append(testMut(q.NextID())); err != nil {
					done <- err
					return
				}
			}
			if err := q.Settle(q.NextID() - 2); err != nil { // leaves one pending: a rewrite
				done <- err
				return
			}
		}
		done <- nil
	}()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			return
		default:
		}
		o, err := openQueue(path, false)
		if err == nil {
			o.Close()
			t.Fatal("a second opener got the lock during a rewrite")
		}
		if !errors.Is(err, ErrLocked) {
			t.Fatalf("second open = %v, want ErrLocked", err)
		}
	}
}

func TestQueueFailedAppendLeavesStateUnchanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db-pending")
	q := mustOpenQueue(t, path, false)
	appendN(t, q, 2)
	// Swap in a read-only descriptor of the same file so writes fail.
	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	rw := q.f
	q.f = ro
	if err := q.Append(testMut(3)); err == nil {
		t.Fatal("Append through a read-only descriptor succeeded")
	}
	checkPending(t, q, idRange(1, 2))
	if q.NextID() != 3 {
		t.Fatalf("NextID = %d after a failed Append", q.NextID())
	}
	// The truncate back failed too, so the queue refuses further writes
	// rather than guess what the file holds.
	if err := q.Append(testMut(3)); err == nil || q.broken == nil {
		t.Fatalf("Append on a queue whose file state is unknown = %v", err)
	}
	q.Close()
	rw.Close()
	q = mustOpenQueue(t, path, false)
	defer q.Close()
	checkPending(t, q, idRange(1, 2))
}

// pendingOf is q.Pending for tests: a read error fails the test.
func pendingOf(t tb, q *queue) []queuedMutation {
	t.Helper()
	p, err := q.Pending()
	if err != nil {
		t.Fatal(err)
	}
	return p
}
