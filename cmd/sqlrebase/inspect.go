package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"

	"github.com/sqlrebase/sqlrebase/mutators"
	"github.com/sqlrebase/sqlrebase/replica"
)

// cmdInspect is the inspect subcommand.
func cmdInspect(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: sqlrebase inspect PATH")
		fmt.Fprintln(stderr, "\nPrints the client id, version, checksum and pending mutations of the replica database at PATH.")
		fmt.Fprintln(stderr, "Opening a replica replays its pending mutations into its WAL, as any open does; nothing is sent anywhere.")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	if err := inspect(ctx, fs.Arg(0), stdout, log); err != nil {
		if errors.Is(err, replica.ErrLocked) {
			fmt.Fprintf(stderr, "sqlrebase inspect: %s is open in another process (or elsewhere in this one); a replica has one owner at a time, so stop it first\n", fs.Arg(0))
			return 1
		}
		log.Error("inspect failed", "path", fs.Arg(0), "err", err)
		return 1
	}
	return 0
}

// inspect prints what a replica holds. It refuses a path with no database,
// because replica.Open would create a fresh replica there, which is not what
// someone inspecting a typo wants.
func inspect(ctx context.Context, path string, w io.Writer, log *slog.Logger) error {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("no replica database at %s", path)
	} else if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return fmt.Errorf("register demo mutators: %w", err)
	}
	r, err := replica.Open(ctx, path, replica.Options{Mutators: reg, Logger: log})
	if err != nil {
		return err
	}
	defer r.Close()
	st := r.Status()
	pending := r.Pending()
	fmt.Fprintf(w, "path:      %s\n", path)
	fmt.Fprintf(w, "client id: %s\n", st.ClientID)
	fmt.Fprintf(w, "version:   %d\n", st.Version)
	fmt.Fprintf(w, "checksum:  %016x\n", st.Checksum)
	switch rs, err := replica.ReadRemoteSettings(path); {
	case errors.Is(err, replica.ErrNoRemoteSettings):
		fmt.Fprintf(w, "server:    none recorded (never opened with a server)\n")
	case err != nil:
		fmt.Fprintf(w, "server:    unreadable settings: %v\n", err)
	default:
		fmt.Fprintf(w, "server:    %s, database %s\n", rs.Addr, rs.Database)
		if rs.Fingerprint != "" {
			fmt.Fprintf(w, "trust:     certificate %s\n", rs.Fingerprint)
		} else {
			fmt.Fprintf(w, "trust:     CA file %s (server name %q)\n", rs.CAFile, rs.ServerName)
		}
	}
	fmt.Fprintf(w, "pending:   %d\n", len(pending))
	for _, m := range pending {
		fmt.Fprintf(w, "  #%d %s %s\n", m.ID, m.Name, m.Args)
	}
	return nil
}
