// Command sqlrebase is the project's one binary: it serves databases to
// replicas over QUIC, runs the demo scenario, inspects replica files, and
// benchmarks against the savepoint baseline.
//
// Usage:
//
//	sqlrebase <command> [flags]
//
// Run "sqlrebase help" for the list of commands.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// command is one subcommand. run gets the arguments after the command name
// and returns the process exit status.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int
}

// commands lists the subcommands in the order "help" shows them. It is a
// function, not a package variable, so that there is no global state.
func commands() []command {
	return []command{
		{"demo", "run the seed scenario over QUIC: a server and three replicas with the seed's latencies", cmdDemo},
		{"inspect", "print a replica's client id, version, checksum and pending mutations", cmdInspect},
		{"serve", "run the authority as a QUIC server for replicas in other processes and machines", cmdServe},
		{"admin", "manage a running server's databases, secrets, clients and users (serve --admin)", cmdAdmin},
		{"bench", "benchmark against the savepoint baseline: latency, drop, memory, WAL size, capabilities; table, JSON/CSV, chart", cmdBench},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches to a subcommand and returns the exit status: 0 success,
// 1 failure, 2 usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		usage(stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdout, stderr, log)
		}
	}
	fmt.Fprintf(stderr, "sqlrebase: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: sqlrebase <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "  help     show this list")
	fmt.Fprintln(w)
	fmt.Fprintln(w, `Run "sqlrebase <command> -h" for a command's flags.`)
}
