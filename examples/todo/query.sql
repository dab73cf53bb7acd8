-- name: CreateTodo :exec
INSERT INTO todos (id, owner, title, done) VALUES (?, ?, ?, 0);

-- name: GetTodo :one
SELECT id, owner, title, done FROM todos WHERE id = ?;

-- name: SetDone :execrows
UPDATE todos SET done = ? WHERE id = ?;

-- name: ListTodos :many
SELECT id, owner, title, done FROM todos ORDER BY id;
