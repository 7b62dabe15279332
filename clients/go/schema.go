package podcache

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Schema is a type's JSON Schema (draft 2020-12) as a node holds it: every
// write of the type whose value is not JSON valid under it is refused with
// a *SchemaViolationError, by whichever replica takes the write.
type Schema struct {
	Type int32 `json:"type"`
	// Schema is the schema's JSON, as it was set.
	Schema json.RawMessage `json:"schema"`
	// Version is the version of the schema's entry.
	Version   string    `json:"version"`
	Author    string    `json:"author"`
	Origin    string    `json:"origin"`
	Reason    string    `json:"reason"`
	WrittenAt time.Time `json:"written_at"`
	// Replication is the per-peer report of a SetSchema with WaitAll.
	Replication DeliveryReport `json:"replication,omitempty"`
}

func schemaPath(typ int32) []string {
	return []string{"v1", "schema", strconv.FormatInt(int64(typ), 10)}
}

// SetSchema sets type typ's JSON Schema (draft 2020-12, at most the node's
// --max-schema-bytes). It is replicated to every replica; entries already
// stored are not checked. A schema the node refuses is an *Error with Code
// "invalid_schema" (400) or "schema_too_large" (413). Needs a write token
// without types=. WaitAll and Reason apply.
func (c *Client) SetSchema(ctx context.Context, typ int32, schema string, opts ...WriteOption) (*Schema, error) {
	var s Schema
	err := c.write(ctx, http.MethodPut, schemaPath(typ), strings.NewReader(schema), "application/json", opts, nil, &s)
	if err != nil {
		return nil, err
	}
	return &s, nil
}

// GetSchema reads type typ's schema from the node's replica; a type
// without one is an *Error with StatusCode 404 (see IsNotFound).
func (c *Client) GetSchema(ctx context.Context, typ int32) (*Schema, error) {
	var s Schema
	if err := c.call(ctx, http.MethodGet, c.url(nil, schemaPath(typ)...), nil, "", &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// DeleteSchema deletes type typ's schema everywhere: its writes are no
// longer checked. A type without one is an *Error with StatusCode 404.
func (c *Client) DeleteSchema(ctx context.Context, typ int32, opts ...WriteOption) (*Deletion, error) {
	var d Deletion
	if err := c.write(ctx, http.MethodDelete, schemaPath(typ), nil, "", opts, nil, &d); err != nil {
		return nil, err
	}
	return &d, nil
}

// ForbiddenTypeError is the node's 403 "forbidden_type": the token's
// types= leave out the request's type, or the request needs a token
// without types= (changing a schema, an import, a whole export).
// errors.As finds the *Error beneath it too.
type ForbiddenTypeError struct {
	// Err is the answer itself (status, code, message).
	Err *Error
	// Type is the refused type; HasType is false when the request named
	// none of its own (it needs a token without types=).
	Type    int32
	HasType bool
	// Token is the token's name (or fingerprint), never the token.
	Token string
	// Types is what the token covers, e.g. "1,7-9".
	Types string
}

func (e *ForbiddenTypeError) Unwrap() error { return e.Err }

// SchemaViolationError is the node's 422 "schema_violation": a value (of a
// batch: the first failing one in key order) is not JSON valid under its
// type's schema, and nothing was written. errors.As finds the *Error
// beneath it too.
type SchemaViolationError struct {
	// Err is the answer itself (status, code, message).
	Err  *Error
	Type int32
	// Key is the key whose value failed.
	Key string
	// Location is where in the value, a JSON pointer ("" is the whole
	// value).
	Location string
	// Keyword is the schema rule that failed, e.g. "type", "required",
	// "maximum"; "json" when the value is not JSON at all.
	Keyword string
	// SchemaPath is where in the schema, a JSON pointer.
	SchemaPath string
}

func (e *SchemaViolationError) Unwrap() error { return e.Err }

func (e *SchemaViolationError) Error() string { return e.Err.Error() }

func (e *ForbiddenTypeError) Error() string { return e.Err.Error() }

// IsForbiddenType reports whether err is the node's 403 "forbidden_type".
func IsForbiddenType(err error) bool {
	var e *ForbiddenTypeError
	return errors.As(err, &e)
}

// IsSchemaViolation reports whether err is the node's 422
// "schema_violation".
func IsSchemaViolation(err error) bool {
	var e *SchemaViolationError
	return errors.As(err, &e)
}

// typedError wraps e in the typed error of its code, from the answer's
// body (raw), when it has one.
func typedError(e *Error, raw []byte) error {
	var fields struct {
		Type       *int32 `json:"type"`
		Token      string `json:"token"`
		Types      string `json:"types"`
		Key        string `json:"key"`
		Location   string `json:"location"`
		Keyword    string `json:"keyword"`
		SchemaPath string `json:"schema_path"`
	}
	if json.Unmarshal(raw, &fields) != nil {
		return e
	}
	switch e.Code {
	case "forbidden_type":
		f := &ForbiddenTypeError{Err: e, Token: fields.Token, Types: fields.Types}
		if fields.Type != nil {
			f.Type, f.HasType = *fields.Type, true
		}
		return f
	case "schema_violation":
		v := &SchemaViolationError{Err: e, Key: fields.Key, Location: fields.Location,
			Keyword: fields.Keyword, SchemaPath: fields.SchemaPath}
		if fields.Type != nil {
			v.Type = *fields.Type
		}
		return v
	}
	return e
}
