package mutators

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// ErrArgsMismatch is returned (wrapped with the mutator and the field) when
// a typed mutator's args are valid JSON that does not fit its argument type:
// a field of the wrong type, or trailing data.
var ErrArgsMismatch = errors.New("mutators: args do not match the mutator's argument type")

// Def is a typed mutator: its name and the type of its arguments. The same
// Def on the client and the server encodes and decodes args in one place,
// so the two cannot disagree on their shape.
type Def[A any] struct {
	// Name is the registered name.
	Name string
}

// Args encodes a as the mutator's JSON args, checked as [Registry.Check]
// checks them.
func (d Def[A]) Args(a A) (json.RawMessage, error) {
	b, err := json.Marshal(a)
	if err != nil {
		return nil, fmt.Errorf("mutator %s: encode args: %w", d.Name, err)
	}
	if err := CheckArgs(b); err != nil {
		return nil, fmt.Errorf("mutator %s: %w", d.Name, err)
	}
	return b, nil
}

// Register adds a typed mutator to r: fn receives its args decoded into an
// A. [Registry.Check] decodes them too, so that a replica refuses args that
// do not fit before it queues anything, with an error that names the field.
// On the server, args that do not fit reject the mutation with that error.
func Register[A any](r *Registry, name string, fn func(ctx context.Context, tx Tx, args A) error) (Def[A], error) {
	if fn == nil {
		return Def[A]{}, fmt.Errorf("mutators: register %q: nil func", name)
	}
	err := r.register(name, func(ctx context.Context, tx Tx, raw json.RawMessage) error {
		a, err := decodeArgs[A](raw)
		if err != nil {
			return err
		}
		return fn(ctx, tx, a)
	}, func(raw json.RawMessage) error {
		_, err := decodeArgs[A](raw)
		return err
	})
	if err != nil {
		return Def[A]{}, err
	}
	return Def[A]{Name: name}, nil
}

// MustRegisterTyped is like [Register] but panics on error, for init-time
// wiring with literal names.
func MustRegisterTyped[A any](r *Registry, name string, fn func(ctx context.Context, tx Tx, args A) error) Def[A] {
	d, err := Register(r, name, fn)
	if err != nil {
		panic(err)
	}
	return d
}

// decodeArgs decodes raw into an A. Unknown fields are allowed, so that a
// newer client may send a field an older server does not know yet (expand,
// then contract); a known field of the wrong type is an error that names it.
func decodeArgs[A any](raw json.RawMessage) (A, error) {
	var a A
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&a); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			field := te.Field
			if field == "" {
				field = "(the args themselves)"
			}
			return a, fmt.Errorf("%w: field %s: want %s, got JSON %s", ErrArgsMismatch, field, te.Type, te.Value)
		}
		return a, fmt.Errorf("%w: %v", ErrArgsMismatch, err)
	}
	if dec.More() {
		return a, fmt.Errorf("%w: data after the args", ErrArgsMismatch)
	}
	return a, nil
}
