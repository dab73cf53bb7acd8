package relay

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"testing"
	"time"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// echoServer answers each line with "echo: LINE\n" and reports the remote
// address of every connection it accepts.
func echoServer(t *testing.T) (addr string, remotes <-chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ch <- c.RemoteAddr().String()
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := io.WriteString(c, "echo: "+sc.Text()+"\n"); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), ch
}

func listen(t *testing.T, target string) *Relay {
	t.Helper()
	r, err := Listen("127.0.0.1:0", target, Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// roundTrip sends one line and reads the answer, bounded in time.
func roundTrip(c net.Conn, line string) (string, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	return bufio.NewReader(c).ReadString('\n')
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// mustBeRefused checks that a connection to addr is reset or closed at
// once (at the dial or at the first round trip), not relayed nor left
// hanging.
func mustBeRefused(t *testing.T, addr, what string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		if strings.Contains(err.Error(), "timeout") {
			t.Fatalf("%s: the dial hung: %v", what, err)
		}
		return // reset during the handshake
	}
	defer c.Close()
	if got, err := roundTrip(c, "anyone"); err == nil {
		t.Fatalf("%s answered %q", what, got)
	} else if strings.Contains(err.Error(), "timeout") {
		t.Fatalf("%s hung instead of closing: %v", what, err)
	}
}

// waitLinks waits, bounded, until the relay relays n connections.
func waitLinks(t *testing.T, r *Relay, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for r.Links() != n {
		if time.Now().After(deadline) {
			t.Fatalf("relay has %d links, want %d", r.Links(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRelayForwardsBothWays(t *testing.T) {
	target, remotes := echoServer(t)
	r := listen(t, target)
	if r.Target() != target {
		t.Fatalf("Target %s, want %s", r.Target(), target)
	}
	c := dial(t, r.Addr())
	for _, line := range []string{"one", "two"} {
		got, err := roundTrip(c, line)
		if err != nil || got != "echo: "+line+"\n" {
			t.Fatalf("round trip %q: %q, %v", line, got, err)
		}
	}
	waitLinks(t, r, 1)
	// The target sees the relay's upstream socket, which UpstreamAddrs
	// names, not the client.
	if from := <-remotes; !slices.Contains(r.UpstreamAddrs(), from) || from == c.LocalAddr().String() {
		t.Fatalf("target saw %s; upstream addresses %v, client %s", from, r.UpstreamAddrs(), c.LocalAddr())
	}
	// A client that hangs up ends its link.
	c.Close()
	waitLinks(t, r, 0)
}

func TestRelayCutAndHeal(t *testing.T) {
	target, _ := echoServer(t)
	r := listen(t, target)
	before := dial(t, r.Addr())
	if _, err := roundTrip(before, "hi"); err != nil {
		t.Fatal(err)
	}
	r.Cut()
	if r.Links() != 0 {
		t.Fatalf("%d links after Cut", r.Links())
	}
	// The connection that was up is broken...
	if got, err := roundTrip(before, "again"); err == nil {
		t.Fatalf("a cut connection still answered %q", got)
	}
	// ...and new ones are refused: closed at once, nothing relayed.
	mustBeRefused(t, r.Addr(), "a connection made during the cut")
	r.Heal()
	after := dial(t, r.Addr())
	if got, err := roundTrip(after, "after"); err != nil || got != "echo: after\n" {
		t.Fatalf("after Heal: %q, %v", got, err)
	}
}

func TestRelayTargetDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := ln.Addr().String()
	ln.Close() // nothing listens there now
	r := listen(t, target)
	mustBeRefused(t, r.Addr(), "a relay to nothing")
	if r.Links() != 0 {
		t.Fatalf("%d links to a target that is down", r.Links())
	}
}

func TestRelayCloseEndsEverything(t *testing.T) {
	target, _ := echoServer(t)
	r, err := Listen("127.0.0.1:0", target, Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, r.Addr())
	if _, err := roundTrip(c, "hi"); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- r.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return with a connection up")
	}
	if _, err := roundTrip(c, "gone"); err == nil {
		t.Fatal("a connection answered after Close")
	}
	if _, err := net.DialTimeout("tcp", r.Addr(), time.Second); err == nil {
		t.Fatal("the relay still accepts after Close")
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestNATSRouteName(t *testing.T) {
	for _, c := range []struct{ prefix, want string }{
		{"", ""},
		{"CONNECT {\"echo\":true,\"name\":\"NAXYZ\"}\r\n", ""},
		{"CONNECT {}\r\nINFO {\"server_id\":\"NAXYZ\",\"server_name\":\"n1\",\"port\":6222}\r\n", "n1"},
		{"INFO {\"server_name\":\"n2", ""}, // not all there yet
		{"INFO {\"server_name\":\"\"}", ""},
	} {
		if got := NATSRouteName([]byte(c.prefix)); got != c.want {
			t.Errorf("NATSRouteName(%q) = %q, want %q", c.prefix, got, c.want)
		}
	}
}

// TestRelayBlockCutsOneClient: of two clients that name themselves in
// their first line, Block cuts only the one named, and refuses its new
// connections once they name themselves, until Unblock.
func TestRelayBlockCutsOneClient(t *testing.T) {
	target, _ := echoServer(t)
	tag := func(p []byte) string {
		if line, _, ok := strings.Cut(string(p), "\n"); ok {
			return line
		}
		return ""
	}
	r, err := Listen("127.0.0.1:0", target, Options{Logger: quiet, Tag: tag})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	x, y := dial(t, r.Addr()), dial(t, r.Addr())
	for _, c := range []struct {
		c    net.Conn
		name string
	}{{x, "x"}, {y, "y"}} {
		if got, err := roundTrip(c.c, c.name); err != nil || got != "echo: "+c.name+"\n" {
			t.Fatalf("%s: %q, %v", c.name, got, err)
		}
	}
	waitLinks(t, r, 2)
	r.Block("x")
	if got, err := roundTrip(x, "more"); err == nil {
		t.Fatalf("a blocked client still got %q", got)
	}
	if got, err := roundTrip(y, "more"); err != nil || got != "echo: more\n" {
		t.Fatalf("the other client: %q, %v", got, err)
	}
	x2 := dial(t, r.Addr())
	if got, err := roundTrip(x2, "x"); err == nil {
		t.Fatalf("a new connection of a blocked client got %q", got)
	}
	r.Unblock("x")
	x3 := dial(t, r.Addr())
	if got, err := roundTrip(x3, "x"); err != nil || got != "echo: x\n" {
		t.Fatalf("after Unblock: %q, %v", got, err)
	}
}
