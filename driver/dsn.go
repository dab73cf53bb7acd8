package driver

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"sort"
	"strings"

	"github.com/sqlrebase/sqlrebase/replica"
)

// ErrDSN is wrapped by every error about a data source name: an unknown
// parameter, a missing or malformed value, a combination that makes no sense.
var ErrDSN = errors.New("sqlrebase driver: bad data source name")

// DefaultRegistry is the name of the mutator registry a DSN without
// "mutators=" uses.
const DefaultRegistry = "default"

// DefaultCredentialEnv is the environment variable a DSN with a server but
// without "credential_env=" or "credential=" reads the credential from.
const DefaultCredentialEnv = "SQLREBASE_CREDENTIAL"

// Config is a parsed data source name: what [ParseDSN] makes of
//
//	file:PATH?server=HOST:PORT&db=NAME&fingerprint=sha256:HEX&...
//
// Parameters:
//
//	server=HOST:PORT      the sqlrebase server; without it the replica is local only
//	db=NAME               the server's database name (required with server)
//	fingerprint=sha256:H  pin the server's certificate (this or ca, with server)
//	ca=FILE               trust the server's certificate through this CA bundle
//	servername=NAME       the name the certificate must carry (with ca; default the host of server)
//	credential_env=VAR    read the credential from the environment variable VAR
//	                      (default SQLREBASE_CREDENTIAL)
//	credential=NAME       take the credential from the source registered as NAME
//	                      (RegisterCredential), asked again on every connect (a
//	                      token source: tokens that expire are renewed); not with
//	                      credential_env
//	mutators=NAME         the registry registered as NAME (RegisterMutators; default "default")
//	durability=normal|full
//	local=NAME, local_path=PATH
//	                      attach a local-only database as NAME (both or neither)
//
// A parameter not in this list is an error, and so is one given twice: a
// typo must not silently change what is opened.
type Config struct {
	// Path is the replica's file, made absolute and clean: the key under
	// which one process shares one replica between sql.Open calls.
	Path string
	// Mutators names the registry.
	Mutators string
	// Durability of the replica.
	Durability replica.Durability
	// LocalName and LocalPath attach a local-only database.
	LocalName, LocalPath string

	// Server settings; Server empty means no Remote.
	Server, Database, Fingerprint, CAFile, ServerName string
	// CredentialEnv or CredentialSource says where the credential comes
	// from (exactly one is set when Server is).
	CredentialEnv, CredentialSource string
}

var dsnParams = map[string]bool{
	"server": true, "db": true, "fingerprint": true, "ca": true, "servername": true,
	"credential_env": true, "credential": true, "mutators": true, "durability": true,
	"local": true, "local_path": true,
}

// ParseDSN parses a data source name. It reads no environment and opens no
// file; errors wrap [ErrDSN] and say what is wrong.
func ParseDSN(dsn string) (Config, error) {
	bad := func(format string, args ...any) (Config, error) {
		return Config{}, fmt.Errorf("%w %q: %s", ErrDSN, redact(dsn), fmt.Sprintf(format, args...))
	}
	path, rawQuery := dsn, ""
	if i := strings.IndexByte(dsn, '?'); i >= 0 {
		path, rawQuery = dsn[:i], dsn[i+1:]
	}
	if p, ok := strings.CutPrefix(path, "file:"); ok {
		u, err := url.PathUnescape(p)
		if err != nil {
			return bad("path: %v", err)
		}
		path = u
		if h, ok := strings.CutPrefix(path, "//"); ok {
			// file://HOST/PATH: only an empty host or localhost is local.
			host, rest, _ := strings.Cut(h, "/")
			if host != "" && host != "localhost" {
				return bad("file URL with host %q: only local files", host)
			}
			path = "/" + rest
		}
	}
	if path == "" || path == ":memory:" {
		return bad("a replica needs a file path")
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return bad("parameters: %v", err)
	}
	var unknown []string
	for k, v := range q {
		if !dsnParams[k] {
			unknown = append(unknown, k)
		} else if len(v) != 1 {
			return bad("parameter %q given %d times", k, len(v))
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return bad("unknown parameter %s (known: server, db, fingerprint, ca, servername, credential_env, credential, mutators, durability, local, local_path)", strings.Join(unknown, ", "))
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return bad("path: %v", err)
	}
	c := Config{
		Path: abs, Mutators: q.Get("mutators"),
		LocalName: q.Get("local"), LocalPath: q.Get("local_path"),
		Server: q.Get("server"), Database: q.Get("db"), Fingerprint: q.Get("fingerprint"),
		CAFile: q.Get("ca"), ServerName: q.Get("servername"),
		CredentialEnv: q.Get("credential_env"), CredentialSource: q.Get("credential"),
	}
	if q.Has("mutators") && c.Mutators == "" {
		return bad("mutators= is empty")
	}
	if c.Mutators == "" {
		c.Mutators = DefaultRegistry
	}
	switch d := q.Get("durability"); d {
	case "", "normal":
		c.Durability = replica.Normal
	case "full":
		c.Durability = replica.Full
	default:
		return bad("durability=%q: want normal or full", d)
	}
	if (c.LocalName == "") != (c.LocalPath == "") {
		return bad("local and local_path go together")
	}
	if c.Server == "" {
		for _, k := range []string{"db", "fingerprint", "ca", "servername", "credential_env", "credential"} {
			if q.Has(k) {
				return bad("%s= needs server=", k)
			}
		}
		return c, nil
	}
	if _, _, err := net.SplitHostPort(c.Server); err != nil {
		return bad("server=%q: want HOST:PORT (%v)", c.Server, err)
	}
	switch {
	case c.Database == "":
		return bad("server= needs db=")
	case c.Fingerprint == "" && c.CAFile == "":
		return bad("server= needs fingerprint= or ca=: there is no mode that trusts any server")
	case c.Fingerprint != "" && c.CAFile != "":
		return bad("fingerprint= and ca= exclude each other")
	case c.ServerName != "" && c.CAFile == "":
		return bad("servername= goes with ca=")
	case c.CredentialEnv != "" && c.CredentialSource != "":
		return bad("credential_env= and credential= exclude each other")
	}
	if c.CredentialEnv == "" && c.CredentialSource == "" {
		c.CredentialEnv = DefaultCredentialEnv
	}
	return c, nil
}

// redact keeps a DSN out of an error message whole only if it holds nothing
// that looks like a secret; no parameter is one today, but a user may still
// paste a token into an unknown parameter.
func redact(dsn string) string {
	path, rawQuery, ok := strings.Cut(dsn, "?")
	if !ok {
		return dsn
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return path + "?…"
	}
	for k := range q {
		if !dsnParams[k] {
			q[k] = []string{"…"}
		}
	}
	return path + "?" + q.Encode()
}
