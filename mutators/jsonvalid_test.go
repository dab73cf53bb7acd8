package mutators

import (
	"encoding/json"
	"strings"
	"testing"
)

var jsonCases = []string{
	`{"name":"Food","delta":1}`, `null`, `true`, `false`, `0`, `-0`, `1.5e-3`, `-12E+4`, `"x"`,
	` [ 1 , "a" , { } , [ ] , null ] `, `{"a":{"b":[{"c":"\u00e9\n\"\\\/\b\f\r\t"}]}}`,
	"\"\xff\xfe\"", "\"日本\"", strings.Repeat("[", 40) + strings.Repeat("]", 40),
	strings.Repeat(`{"a":`, 33) + "1" + strings.Repeat("}", 33),
	// Invalid:
	``, ` `, `{`, `}`, `[1,]`, `{"a":1,}`, `{"a" 1}`, `{a:1}`, `{"a":1 "b":2}`, `01`, `1.`, `.5`, `1e`, `1e+`,
	`-`, `--1`, `+1`, `tru`, `truex`, `nul`, `"a`, `"\x"`, `"\u12"`, `"\u12g4"`, "\"a\x01\"", `1 2`, `{} {}`,
	`[1 2]`, `{"a":}`, `[`, strings.Repeat("[", 40) + strings.Repeat("]", 39), `NaN`, `Infinity`, "\x00",
}

func TestValidJSON(t *testing.T) {
	for _, c := range jsonCases {
		if got, want := validJSON([]byte(c)), json.Valid([]byte(c)); got != want {
			t.Errorf("validJSON(%q) = %v, json.Valid %v", c, got, want)
		}
	}
}

func FuzzValidJSON(f *testing.F) {
	for _, c := range jsonCases {
		f.Add([]byte(c))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := validJSON(b), json.Valid(b); got != want {
			t.Errorf("validJSON(%q) = %v, json.Valid %v", b, got, want)
		}
		// The fast scan alone never accepts what json.Valid refuses.
		if s := (jsonScan{b: b}); s.value(0) && s.space() == len(b) && !json.Valid(b) {
			t.Errorf("the fast scan accepts %q", b)
		}
	})
}

func BenchmarkValidJSON(b *testing.B) {
	args := CategoryArgs("cat-0", 1)
	b.Run("fast", func(b *testing.B) {
		for b.Loop() {
			if !validJSON(args) {
				b.Fatal("invalid")
			}
		}
	})
	b.Run("json.Valid", func(b *testing.B) {
		for b.Loop() {
			if !json.Valid(args) {
				b.Fatal("invalid")
			}
		}
	})
}
