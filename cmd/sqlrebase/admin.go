package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sqlrebase/sqlrebase/server"
)

// adminTokenFile is where serve keeps a generated admin token, in --data.
const adminTokenFile = "admin.token"

// loadAdminToken returns the admin token from file, or (file empty) from
// dataDir/admin.token, generating a random one there (0600) the first
// time. It returns the path it used.
func loadAdminToken(dataDir, file string) (token, path string, err error) {
	path = file
	if path == "" {
		path = filepath.Join(dataDir, adminTokenFile)
	}
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		token = strings.TrimSpace(string(b))
		if token == "" {
			return "", path, fmt.Errorf("admin token file %s is empty", path)
		}
		return token, path, nil
	case file != "" || !errors.Is(err, fs.ErrNotExist):
		return "", path, fmt.Errorf("admin token: %w", err)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	token = hex.EncodeToString(raw)
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return "", path, fmt.Errorf("admin token: %w", err)
	}
	if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		return "", path, fmt.Errorf("admin token: %w", err)
	}
	return token, path, nil
}

// adminListenAddr makes an admin address without a host loopback
// (":7879" is 127.0.0.1:7879): the admin API is reached from the
// server's own machine unless the operator names another interface.
func adminListenAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// startAdmin serves srv's admin API on addr with the token from
// tokenFile (or one generated in dataDir), and says where on stdout.
func startAdmin(srv *server.Server, addr, dataDir, tokenFile string, stdout io.Writer, log *slog.Logger) (stop func(), err error) {
	addr, err = adminListenAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("--admin %s: %w", addr, err)
	}
	token, path, err := loadAdminToken(dataDir, tokenFile)
	if err != nil {
		return nil, err
	}
	stop, bound, err := serveMetrics(addr, srv.AdminHandler(token), log)
	if err != nil {
		return nil, fmt.Errorf("--admin %s: %w", addr, err)
	}
	if host, _, _ := net.SplitHostPort(bound); !net.ParseIP(host).IsLoopback() {
		log.Warn("the admin API listens beyond loopback: keep its token secret and its network trusted", "addr", bound)
	}
	fmt.Fprintf(stdout, "admin: http://%s (token in %s)\n", bound, path)
	return stop, nil
}

// adminClient calls a server's admin API.
type adminClient struct {
	base  string
	token string
	http  *http.Client
}

// call makes one request and decodes the JSON answer into out; an error
// status becomes an error with the server's message.
func (c *adminClient) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s (HTTP %d)", e.Error, resp.StatusCode)
		}
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// adminUsage is the admin command's help.
const adminUsage = `usage: sqlrebase admin --addr HOST:PORT (--token T | --token-file F) COMMAND [flags]

Manages a running server's databases and credentials through its admin API
(serve --admin). Commands:
  create-db     --db NAME                          host a new database
  add-secret    --db NAME [--user U] --secret S    accept secret S, for user U (default: unnamed)
  rotate-secret --db NAME --id ID|USER --secret S [--grace 30s]
                                                   give a secret a new value (same id and user); the old
                                                   one's sessions end after the grace (default 0: at once)
  revoke-secret --db NAME --id ID|USER             delete a secret and end its sessions
  revoke-user   --db NAME --user U                 cut a user off and end their sessions
  restore-user  --db NAME --user U                 lift a user's revocation
  clients       --db NAME                          list client ids, their users and last pushes
  users         --db NAME                          list users, their secrets and sessions
--secret - reads the secret from the first line of standard input.
`

// cmdAdmin is the admin subcommand: a client of serve --admin.
func cmdAdmin(ctx context.Context, args []string, stdout, stderr io.Writer, _ *slog.Logger) int {
	gfs := flag.NewFlagSet("admin", flag.ContinueOnError)
	gfs.SetOutput(stderr)
	addr := gfs.String("addr", "127.0.0.1:7879", "the admin API's address (serve --admin)")
	token := gfs.String("token", "", "the admin token")
	tokenFile := gfs.String("token-file", "", "a file holding the admin token (serve prints where it keeps its own)")
	gfs.Usage = func() {
		fmt.Fprint(stderr, adminUsage)
		gfs.PrintDefaults()
	}
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if gfs.NArg() == 0 {
		gfs.Usage()
		return 2
	}
	tok := *token
	if tok == "" && *tokenFile != "" {
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			fmt.Fprintf(stderr, "sqlrebase admin: %v\n", err)
			return 1
		}
		tok = strings.TrimSpace(string(b))
	}
	if tok == "" {
		fmt.Fprintln(stderr, "sqlrebase admin: give --token or --token-file")
		return 2
	}
	cmd, rest := gfs.Arg(0), gfs.Args()[1:]
	fs := flag.NewFlagSet("admin "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	db := fs.String("db", "", "the database")
	user := fs.String("user", "", "the user")
	secret := fs.String("secret", "", "the secret (-: read from standard input)")
	id := fs.String("id", "", "the secret's id, or its user")
	grace := fs.Duration("grace", 0, "rotate-secret: how long the old secret is still accepted (0: refused at once and its sessions ended)")
	if err := fs.Parse(rest); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	need := func(names ...string) bool {
		vals := map[string]string{"db": *db, "user": *user, "secret": *secret, "id": *id}
		for _, n := range names {
			if vals[n] == "" {
				fmt.Fprintf(stderr, "sqlrebase admin %s: --%s is required\n", cmd, n)
				return false
			}
		}
		return true
	}
	if *secret == "-" {
		line, err := bufio.NewReader(os.Stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			fmt.Fprintf(stderr, "sqlrebase admin: reading the secret: %v\n", err)
			return 1
		}
		*secret = strings.TrimRight(line, "\r\n")
	}
	c := &adminClient{base: "http://" + *addr, token: tok, http: &http.Client{Timeout: 30 * time.Second}}
	dbPath := "/v1/databases/" + url.PathEscape(*db)
	var err error
	switch cmd {
	case "create-db":
		if !need("db") {
			return 2
		}
		if err = c.call(ctx, "POST", "/v1/databases", map[string]string{"name": *db}, nil); err == nil {
			fmt.Fprintf(stdout, "created database %s\n", *db)
		}
	case "add-secret":
		if !need("db", "secret") {
			return 2
		}
		var ci server.CredentialInfo
		if err = c.call(ctx, "POST", dbPath+"/secrets", map[string]string{"user": *user, "secret": *secret}, &ci); err == nil {
			fmt.Fprintf(stdout, "secret %s for user %s\n", ci.ID, ci.User)
		}
	case "rotate-secret":
		if !need("db", "id", "secret") {
			return 2
		}
		var ci server.CredentialInfo
		if err = c.call(ctx, "PUT", dbPath+"/secrets/"+url.PathEscape(*id), map[string]string{"secret": *secret, "grace": grace.String()}, &ci); err == nil {
			fmt.Fprintf(stdout, "rotated secret %s of user %s\n", ci.ID, ci.User)
		}
	case "revoke-secret":
		if !need("db", "id") {
			return 2
		}
		var r map[string]int
		if err = c.call(ctx, "DELETE", dbPath+"/secrets/"+url.PathEscape(*id), nil, &r); err == nil {
			fmt.Fprintf(stdout, "revoked %s; ended %d sessions\n", *id, r["ended"])
		}
	case "revoke-user":
		if !need("db", "user") {
			return 2
		}
		var r map[string]int
		if err = c.call(ctx, "POST", dbPath+"/users/"+url.PathEscape(*user)+"/revoke", nil, &r); err == nil {
			fmt.Fprintf(stdout, "revoked user %s; ended %d sessions\n", *user, r["ended"])
		}
	case "restore-user":
		if !need("db", "user") {
			return 2
		}
		var r map[string]bool
		if err = c.call(ctx, "POST", dbPath+"/users/"+url.PathEscape(*user)+"/restore", nil, &r); err == nil {
			if r["restored"] {
				fmt.Fprintf(stdout, "restored user %s\n", *user)
			} else {
				fmt.Fprintf(stdout, "user %s was not revoked\n", *user)
			}
		}
	case "clients":
		if !need("db") {
			return 2
		}
		var cs []server.ClientInfo
		if err = c.call(ctx, "GET", dbPath+"/clients", nil, &cs); err == nil {
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "CLIENT\tUSER\tLAST PUSH\tSESSIONS")
			for _, ci := range cs {
				last := "-"
				if !ci.LastPush.IsZero() {
					last = ci.LastPush.Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", ci.ClientID, ci.User, last, ci.Sessions)
			}
			tw.Flush()
		}
	case "users":
		if !need("db") {
			return 2
		}
		var us []server.UserInfo
		if err = c.call(ctx, "GET", dbPath+"/users", nil, &us); err == nil {
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "USER\tSECRETS\tCLIENTS\tSESSIONS\tREVOKED")
			for _, u := range us {
				secrets := strings.Join(u.Credentials, ",")
				if secrets == "" {
					secrets = "-"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%v\n", u.User, secrets, u.Clients, u.Sessions, u.Revoked)
			}
			tw.Flush()
		}
	default:
		fmt.Fprintf(stderr, "sqlrebase admin: unknown command %q\n\n", cmd)
		gfs.Usage()
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "sqlrebase admin %s: %v\n", cmd, err)
		return 1
	}
	return 0
}
