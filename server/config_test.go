package server

import "testing"

// TestDefaultRetentionIsBounded: a server configured with nothing keeps a
// bounded change log (it used to keep every version forever).
func TestDefaultRetentionIsBounded(t *testing.T) {
	var c Config
	c.defaults()
	if r := c.Retention; r.Versions <= 0 && r.Bytes <= 0 && r.Age <= 0 {
		t.Fatalf("default retention %+v is unbounded", r)
	}
	c = Config{Retention: Retention{Versions: 10}}
	c.defaults()
	if c.Retention != (Retention{Versions: 10}) {
		t.Fatalf("an explicit retention was changed: %+v", c.Retention)
	}
}
