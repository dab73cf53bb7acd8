package mutators

import "encoding/json"

// validJSON is json.Valid, faster: [CheckArgs] runs for every mutation a
// server runs and a replica queues or replays, and json.Valid's scanner (a
// function call per byte) was two thirds of the registry's shape check, 5%
// of the server's writer (pprof of BenchmarkServerThroughput). What it
// cannot settle alone (nesting deeper than maxFastDepth) and what it finds
// invalid go to json.Valid, so that it can only be wrong by accepting what
// json.Valid refuses; FuzzValidJSON holds it to json.Valid's answer.
func validJSON(b []byte) bool {
	if v := (jsonScan{b: b}); v.value(0) && v.space() == len(b) {
		return true
	}
	return json.Valid(b)
}

// maxFastDepth bounds validJSON's recursion; deeper values go to
// json.Valid.
const maxFastDepth = 32

type jsonScan struct {
	b []byte
	i int
}

// space skips JSON whitespace and returns the offset after it.
func (s *jsonScan) space() int {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return s.i
		}
	}
	return s.i
}

// value reads one value with the whitespace before it.
func (s *jsonScan) value(depth int) bool {
	if depth > maxFastDepth || s.space() == len(s.b) {
		return false
	}
	switch c := s.b[s.i]; {
	case c == '{':
		return s.object(depth + 1)
	case c == '[':
		return s.array(depth + 1)
	case c == '"':
		return s.str()
	case c == '-' || ('0' <= c && c <= '9'):
		return s.number()
	case c == 't':
		return s.word("true")
	case c == 'f':
		return s.word("false")
	case c == 'n':
		return s.word("null")
	}
	return false
}

func (s *jsonScan) object(depth int) bool {
	s.i++ // '{'
	if s.space() < len(s.b) && s.b[s.i] == '}' {
		s.i++
		return true
	}
	for {
		if s.space() == len(s.b) || s.b[s.i] != '"' || !s.str() {
			return false
		}
		if s.space() == len(s.b) || s.b[s.i] != ':' {
			return false
		}
		s.i++
		if !s.value(depth) || s.space() == len(s.b) {
			return false
		}
		switch s.b[s.i] {
		case ',':
			s.i++
		case '}':
			s.i++
			return true
		default:
			return false
		}
	}
}

func (s *jsonScan) array(depth int) bool {
	s.i++ // '['
	if s.space() < len(s.b) && s.b[s.i] == ']' {
		s.i++
		return true
	}
	for {
		if !s.value(depth) || s.space() == len(s.b) {
			return false
		}
		switch s.b[s.i] {
		case ',':
			s.i++
		case ']':
			s.i++
			return true
		default:
			return false
		}
	}
}

// str reads a string from its opening quote. As json.Valid, it refuses
// control characters and bad escapes but not invalid UTF-8 (which
// json.Unmarshal replaces).
func (s *jsonScan) str() bool {
	b := s.b
	for i := s.i + 1; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			s.i = i + 1
			return true
		case c < 0x20:
			return false
		case c == '\\':
			i++
			if i >= len(b) {
				return false
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) || !isHex(b[i+1]) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) {
					return false
				}
				i += 4
			default:
				return false
			}
		}
	}
	return false
}

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

// number reads -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *jsonScan) number() bool {
	b, i := s.b, s.i
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		i = digits(b, i)
	default:
		return false
	}
	if i < len(b) && b[i] == '.' {
		j := digits(b, i+1)
		if j == i+1 {
			return false
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := digits(b, i)
		if j == i {
			return false
		}
		i = j
	}
	s.i = i
	return true
}

func digits(b []byte, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}

func (s *jsonScan) word(w string) bool {
	if len(s.b)-s.i < len(w) || string(s.b[s.i:s.i+len(w)]) != w {
		return false
	}
	s.i += len(w)
	return true
}
