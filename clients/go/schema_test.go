package podcache_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// A schema set through one replica refuses a bad write on another with a
// *SchemaViolationError, GetSchema reads it, DeleteSchema lets the write
// through; a token limited to some types gets a *ForbiddenTypeError for
// the others (and for schema changes) and still works on its own.
func TestSchemasAndScopedTokens(t *testing.T) {
	t.Parallel()
	const admin, flags = "write-token-admin-0123456789", "write-token-flags-0123456789"
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	file := "write:" + admin + " name=ops\nwrite:" + flags + " name=flags-team types=1,7-9\n"
	if err := os.WriteFile(tokens, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	nodes := testnode.StartCluster(t, 2, "--auth-token-file", tokens)
	ctx := bg(t)
	a0 := client(t, nodes[0], podcache.WithToken(admin))
	a1 := client(t, nodes[1], podcache.WithToken(admin))
	f1 := client(t, nodes[1], podcache.WithToken(flags))
	const typ = 7

	set, err := a0.SetSchema(ctx, typ, `{"type":"object","properties":{"on":{"type":"boolean"}},"required":["on"]}`, podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	if set.Type != typ || set.Version == "" || set.Author != "ops" || !strings.Contains(string(set.Schema), `"required"`) {
		t.Fatalf("SetSchema answered %+v", *set)
	}
	got, err := a1.GetSchema(ctx, typ)
	if err != nil || got.Version != set.Version {
		t.Fatalf("GetSchema on the other replica: %+v, %v", got, err)
	}
	_, err = f1.Set(ctx, typ, "k", `{"on":"yes"}`)
	var violation *podcache.SchemaViolationError
	if !errors.As(err, &violation) || !podcache.IsSchemaViolation(err) {
		t.Fatalf("a bad value: %v, want a *SchemaViolationError", err)
	}
	if violation.Type != typ || violation.Key != "k" || violation.Location != "/on" || violation.Keyword != "type" ||
		violation.Err.StatusCode != 422 {
		t.Fatalf("the violation says %+v (%+v)", *violation, *violation.Err)
	}
	var plain *podcache.Error
	if !errors.As(err, &plain) || plain.Code != "schema_violation" {
		t.Fatalf("errors.As finds no *Error in %v", err)
	}
	if _, err := f1.Set(ctx, typ, "k", `{"on":true}`); err != nil {
		t.Fatalf("a valid value: %v", err)
	}
	if _, err := a0.SetSchema(ctx, typ, `{"type":"nope"}`); !isCode(err, "invalid_schema") {
		t.Fatalf("a bad schema: %v", err)
	}

	// The scoped token: another type, and a schema change, are refused.
	_, err = f1.Set(ctx, 2, "k", "v")
	var forbidden *podcache.ForbiddenTypeError
	if !errors.As(err, &forbidden) || !podcache.IsForbiddenType(err) {
		t.Fatalf("another type: %v, want a *ForbiddenTypeError", err)
	}
	if !forbidden.HasType || forbidden.Type != 2 || forbidden.Token != "flags-team" || forbidden.Types != "1,7-9" ||
		forbidden.Err.StatusCode != 403 || strings.Contains(err.Error(), flags) {
		t.Fatalf("the refusal says %+v: %v", *forbidden, err)
	}
	if _, err := f1.Get(ctx, 2, "k"); !podcache.IsForbiddenType(err) {
		t.Fatalf("a read of another type: %v", err)
	}
	_, err = f1.DeleteSchema(ctx, typ)
	if !errors.As(err, &forbidden) || forbidden.HasType {
		t.Fatalf("a schema change by a scoped token: %v", err)
	}

	// Deleted: the other replica lets the write through once it has the
	// deletion (polled, never slept).
	if _, err := a0.DeleteSchema(ctx, typ, podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	if _, err := a1.GetSchema(ctx, typ); !podcache.IsNotFound(err) {
		t.Fatalf("the schema after its delete: %v", err)
	}
	eventually(t, 10*time.Second, func() string {
		if _, err := f1.Set(ctx, typ, "k", "anything"); err != nil {
			return "the write is still refused after the schema's delete: " + err.Error()
		}
		return ""
	})
}

func isCode(err error, code string) bool {
	var e *podcache.Error
	return errors.As(err, &e) && e.Code == code
}
