package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"

	"github.com/sqlrebase/sqlrebase/mutators"
)

// Mutator names of the benchmark workloads, besides the demo mutator
// [mutators.CreateCategoryOrIncrementIfExists] of the seed scenario.
const (
	// CounterAdd adds to one row of the shared counters table.
	CounterAdd = "benchCounterAdd"
	// TodoInsert inserts one todo.
	TodoInsert = "benchTodoInsert"
	// TodoUpdate marks one todo done (or not) and touches its timestamp,
	// which moves it in both indexes.
	TodoUpdate = "benchTodoUpdate"
	// TodoDelete deletes one todo.
	TodoDelete = "benchTodoDelete"
)

// CountersSchema is the counters workload's table: a few rows that every
// client increments, the worst case for conflicts.
const CountersSchema = `CREATE TABLE IF NOT EXISTS counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)`

// TodoSchema is the todo app's table with two secondary indexes, so that an
// update or a delete touches three b-trees, as in a real app.
const TodoSchema = `CREATE TABLE IF NOT EXISTS todos (
	id INTEGER PRIMARY KEY,
	list INTEGER NOT NULL,
	title TEXT NOT NULL,
	done INTEGER NOT NULL,
	updated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS todos_list ON todos(list, done);
CREATE INDEX IF NOT EXISTS todos_updated ON todos(updated)`

// FillerSchema is a table of blobs that only makes the database bigger, for
// the database-size series.
const FillerSchema = `CREATE TABLE IF NOT EXISTS filler (id INTEGER PRIMARY KEY, b BLOB NOT NULL)`

// CounterArgs are the args of [CounterAdd].
type CounterArgs struct {
	ID    int64 `json:"id"`
	Delta int64 `json:"delta"`
}

// TodoArgs are the args of the todo mutators. Insert uses every field,
// update ID, Done and Updated, delete ID only.
type TodoArgs struct {
	ID      int64  `json:"id"`
	List    int64  `json:"list,omitempty"`
	Title   string `json:"title,omitempty"`
	Done    bool   `json:"done,omitempty"`
	Updated int64  `json:"updated,omitempty"`
}

// NewRegistry returns the registry both engines and the authority run in
// the benchmarks: the demo mutator plus the workloads' mutators.
func NewRegistry() (*mutators.Registry, error) {
	reg := mutators.NewRegistry()
	if err := mutators.RegisterDemo(reg); err != nil {
		return nil, fmt.Errorf("bench registry: %w", err)
	}
	for _, name := range []string{CounterAdd, TodoInsert, TodoUpdate, TodoDelete} {
		if err := reg.Register(name, sqlMutator(name)); err != nil {
			return nil, fmt.Errorf("bench registry: %w", err)
		}
	}
	return reg, nil
}

// sqlMutator is a mutator that runs the statements [Statements] gives for
// its args. The savepoint baseline's server sends exactly those statements
// to its clients, so both engines and both servers do the same work.
func sqlMutator(name string) mutators.Func {
	return func(_ context.Context, tx mutators.Tx, args json.RawMessage) error {
		stmts, err := Statements(name, args)
		if err != nil {
			return err
		}
		for _, q := range stmts {
			if _, err := tx.Exec(q); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
		return nil
	}
}

// Statements returns the SQL a mutation runs, with its arguments inlined:
// what the prototype's server sends its clients after running it. It knows
// the demo mutator and the workloads' mutators.
func Statements(name string, args json.RawMessage) ([]string, error) {
	switch name {
	case mutators.CreateCategoryOrIncrementIfExists:
		var a mutators.CategoryDelta
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, fmt.Errorf("%s args: %w", name, err)
		}
		return DemoSQL(a.Name, a.Delta), nil
	case CounterAdd:
		var a CounterArgs
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, fmt.Errorf("%s args: %w", name, err)
		}
		return []string{"UPDATE counters SET n = n + " + itoa(a.Delta) + " WHERE id = " + itoa(a.ID)}, nil
	case TodoInsert, TodoUpdate, TodoDelete:
		var a TodoArgs
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, fmt.Errorf("%s args: %w", name, err)
		}
		switch name {
		case TodoInsert:
			return []string{"INSERT OR REPLACE INTO todos(id, list, title, done, updated) VALUES (" +
				itoa(a.ID) + ", " + itoa(a.List) + ", " + quote(a.Title) + ", " + btoi(a.Done) + ", " + itoa(a.Updated) + ")"}, nil
		case TodoUpdate:
			return []string{"UPDATE todos SET done = " + btoi(a.Done) + ", updated = " + itoa(a.Updated) + " WHERE id = " + itoa(a.ID)}, nil
		default:
			return []string{"DELETE FROM todos WHERE id = " + itoa(a.ID)}, nil
		}
	}
	return nil, fmt.Errorf("bench: no SQL form for mutator %q", name)
}

func itoa(i int64) string { return strconv.FormatInt(i, 10) }

func btoi(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// Mutation is one mutation of a workload: a mutator name and its args.
type Mutation struct {
	Name string
	Args json.RawMessage
}

// mustJSON encodes a workload's args struct; they are plain structs of
// strings and integers, which always encode.
func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		return json.RawMessage("null")
	}
	return b
}

// demoMutation is the seed scenario's mutation on category name.
func demoMutation(name string, delta int64) Mutation {
	return Mutation{mutators.CreateCategoryOrIncrementIfExists, mutators.CategoryArgs(name, delta)}
}

// countersSetup, todoSetup and fillerChunk are the SQL that brings a
// database from the demo schema to a workload's starting state. The
// authority runs it as a version of its own; the savepoint engine commits it
// directly.
func countersSetup(rows int) []string {
	return []string{CountersSchema,
		`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ` + strconv.Itoa(rows) + `)
		INSERT OR IGNORE INTO counters(id, n) SELECT i, 0 FROM n`}
}

// todoRows is the size of the todo app's table, as the issue asks.
const todoRows = 100_000

func todoSetup(rows int) []string {
	stmts := strings.Split(TodoSchema, ";")
	return append(stmts, `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < `+strconv.Itoa(rows)+`)
		INSERT OR IGNORE INTO todos(id, list, title, done, updated)
		SELECT i, i % 100, 'todo number ' || i || ': buy milk, call mum, fix the bike', i % 3 = 0, i FROM n`)
}

// fillerChunk adds about mb megabytes of blobs to the filler table.
func fillerChunk(mb int) string {
	rows := mb << 20 / 3000
	return `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ` + strconv.Itoa(rows) + `)
		INSERT INTO filler(b) SELECT randomblob(3000) FROM n`
}

// todoGen makes the todo app's deterministic mix of 40% inserts, 40%
// updates and 20% deletes. Each generator inserts ids of its own range, so
// two clients never insert the same todo; updates and deletes pick any id
// of the seeded table (one already deleted is a no-op, as in a real app).
type todoGen struct {
	rng    *rand.Rand
	nextID int64
	clock  int64
}

func newTodoGen(seed uint64, idBase int64) *todoGen {
	return &todoGen{rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), nextID: idBase, clock: 1 << 30}
}

func (g *todoGen) next() Mutation {
	g.clock++
	switch p := g.rng.IntN(10); {
	case p < 4:
		g.nextID++
		return Mutation{TodoInsert, mustJSON(TodoArgs{ID: g.nextID, List: g.rng.Int64N(100),
			Title: "new todo " + itoa(g.nextID), Updated: g.clock})}
	case p < 8:
		return Mutation{TodoUpdate, mustJSON(TodoArgs{ID: 1 + g.rng.Int64N(todoRows), Done: g.rng.IntN(2) == 0, Updated: g.clock})}
	default:
		return Mutation{TodoDelete, mustJSON(TodoArgs{ID: 1 + g.rng.Int64N(todoRows)})}
	}
}
