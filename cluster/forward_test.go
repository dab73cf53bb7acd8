package cluster

import (
	"errors"
	"reflect"
	"testing"

	"github.com/sqlrebase/sqlrebase/protocol"
	"github.com/sqlrebase/sqlrebase/server"
)

func TestForwardRoundTrip(t *testing.T) {
	pushes := []server.ForwardedPush{
		{ClientID: "c1", UserID: "u1", Mutations: []protocol.Mutation{{ID: 1, Name: "inc", Args: []byte(`{"a":1}`)}, {ID: 2, Name: "inc"}}},
		{ClientID: "c2", UserID: "u2", Claims: map[string]any{"role": "admin"}, Mutations: []protocol.Mutation{{ID: 7, Name: "x", Args: []byte{0, 1, 2}}}},
	}
	b, err := encodeForward(pushes)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeForward(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, pushes) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, pushes)
	}
	res := []server.ForwardedResult{{LastMutationID: 2, Version: 9}, {Code: protocol.CodeGap, Message: "gap"}}
	back, err := decodeReply(encodeReply(res, nil), 2)
	if err != nil || !reflect.DeepEqual(back, res) {
		t.Fatalf("reply round trip: %+v, %v", back, err)
	}
}

func TestForwardRefusals(t *testing.T) {
	for _, c := range []struct{ name, req string }{
		{"not json", `{`},
		{"no pushes", `{"p":[]}`},
		{"no client", `{"p":[{"u":"u","m":[{"i":1,"n":"x"}]}]}`},
		{"long client", `{"p":[{"c":"` + string(make([]byte, 129)) + `","u":"u","m":[]}]}`},
		{"no user", `{"p":[{"c":"c","m":[{"i":1,"n":"x"}]}]}`},
		{"id 0", `{"p":[{"c":"c","u":"u","m":[{"i":0,"n":"x"}]}]}`},
		{"no name", `{"p":[{"c":"c","u":"u","m":[{"i":1}]}]}`},
		{"ids not increasing", `{"p":[{"c":"c","u":"u","m":[{"i":2,"n":"x"},{"i":2,"n":"x"}]}]}`},
		{"args not base64", `{"p":[{"c":"c","u":"u","m":[{"i":1,"n":"x","a":"!!"}]}]}`},
	} {
		if _, err := decodeForward([]byte(c.req)); !errors.Is(err, ErrBadForward) {
			t.Errorf("%s: %v, want ErrBadForward", c.name, err)
		}
	}
	for _, c := range []struct {
		name, reply string
		want        error
	}{
		{"not json", `[`, ErrBadForward},
		{"count", `{"r":[{"l":1,"v":2}]}`, ErrBadForward},
		{"ack in version 0", `{"r":[{"l":1},{"l":1,"v":2}]}`, ErrBadForward},
		{"not owner", `{"no":true,"e":"followed here"}`, server.ErrNotOwner},
	} {
		if _, err := decodeReply([]byte(c.reply), 2); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := decodeReply([]byte(`{"e":"disk full"}`), 2); err == nil || errors.Is(err, server.ErrNotOwner) {
		t.Errorf("an owner's error: %v", err)
	}
	if _, err := decodeReply(encodeReply(nil, errors.Join(server.ErrNotOwner)), 1); !errors.Is(err, server.ErrNotOwner) {
		t.Errorf("ErrNotOwner does not survive the reply: %v", err)
	}
}

// FuzzForwardDecode: a forwarded request or reply from the network decodes
// to pushes the server can run (ids increasing from 1 up, names and
// clients set) or is refused, never trusted half-way, and never panics.
func FuzzForwardDecode(f *testing.F) {
	b, _ := encodeForward([]server.ForwardedPush{{ClientID: "c", UserID: "u", Mutations: []protocol.Mutation{{ID: 1, Name: "x", Args: []byte("a")}}}})
	f.Add(b)
	f.Add([]byte(`{"p":[{"c":"c","u":"u","m":[{"i":2,"n":"x"},{"i":1,"n":"x"}]}]}`))
	f.Add([]byte(`{"r":[{"l":1,"v":2}]}`))
	f.Add([]byte(`{"no":true}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if pushes, err := decodeForward(b); err == nil {
			for _, p := range pushes {
				if p.ClientID == "" || len(p.ClientID) > 128 || p.UserID == "" {
					t.Fatalf("accepted push %+v", p)
				}
				for j, m := range p.Mutations {
					if m.ID == 0 || m.Name == "" || j > 0 && m.ID <= p.Mutations[j-1].ID {
						t.Fatalf("accepted mutations %+v", p.Mutations)
					}
				}
			}
		}
		for n := 0; n < 3; n++ {
			if res, err := decodeReply(b, n); err == nil {
				if len(res) != n {
					t.Fatalf("%d results for %d pushes", len(res), n)
				}
				for _, r := range res {
					if r.Code == 0 && r.Version == 0 && r.LastMutationID != 0 {
						t.Fatalf("accepted %+v", r)
					}
				}
			}
		}
	})
}
