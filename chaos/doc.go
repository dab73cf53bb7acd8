// Package chaos holds no code, only tests: they run the whole stack (a real
// server over QUIC and real replicas on real files) through a lossy,
// duplicating, reordering, partitioning UDP relay (internal/faultnet), with
// replica and server restarts, and check at the end that nothing was lost
// or applied twice, that every replica's checksum is the server's, and that
// the server's file, as the stock sqlite3 CLI reads it, is what the
// server's checksum says.
//
// TestChaos runs it against one server with its local change log;
// TestChaosCluster (cluster_test.go) on the cluster code path: an embedded
// JetStream, two or three nodes in the process (each its own
// cluster.Owner, following and forwarding, snapshots and trims), a relay
// in front of each, every replica with the other nodes as alternates, and
// node restarts that release the lease or crash holding it; at the end
// every replica, every node and the stream's tail agree, exactly one node
// owns, and the sqlite3 CLI reads each node's file (the owner's
// db.sqlite, a follower's follow.sqlite) with the tail's checksum.
//
// It is a package of its own because it imports everything (replica,
// server, faultnet) and nothing may import it.
//
//	go test -short ./chaos                            # CI: a few seeds, seconds
//	go test ./chaos                                   # more seeds
//	SQLREBASE_CHAOS=long go test -timeout 0 ./chaos   # soak: new seeds for 10 minutes
//	go test ./chaos -chaos.duration=1h -timeout 0     # soak for as long as asked
//	go test ./chaos -chaos.seed=1234 -v               # replay one seed
//	go test ./chaos -run TestChaosCluster -v          # the cluster mode only
//	SQLREBASE_CHAOS_R3=1 go test ./chaos -run TestChaosCluster   # on a 3-node JetStream, R3
//
// Each run logs its seed first; a failure names it. A seed fixes the fault
// schedule and every packet's fate; the goroutines' interleaving is the
// machine's, so a replay meets the same faults, not always the same timing.
package chaos
