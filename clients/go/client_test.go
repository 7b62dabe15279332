package podcache_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

func client(t *testing.T, node *testnode.Node, opts ...podcache.Option) *podcache.Client {
	t.Helper()
	c, err := podcache.New(node.URL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func bg(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond every 20ms until it returns "" or the deadline
// passes, then fails with cond's last complaint.
func eventually(t *testing.T, within time.Duration, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", within, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func wantError(t *testing.T, err error, status int, code string) {
	t.Helper()
	var e *podcache.Error
	if !errors.As(err, &e) {
		t.Fatalf("want a *podcache.Error %d %s, got %v", status, code, err)
	}
	if e.StatusCode != status || e.Code != code || e.Message == "" {
		t.Fatalf("want %d %s with a message, got %d %q %q", status, code, e.StatusCode, e.Code, e.Message)
	}
}

func TestEveryOperationAcrossACluster(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 3)
	a, b, c := client(t, nodes[0]), client(t, nodes[1]), client(t, nodes[2])
	ctx := bg(t)
	const typ = 7

	// A key with a slash, spaces and non-ASCII; a value with a new line.
	key, value := "feature/x y ü%41", "on\nand \"quoted\""
	set, err := a.Set(ctx, typ, key, value, podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	if set.Key != key || set.Value != value || set.Type != typ || set.Version == "" {
		t.Fatalf("set answered %+v", set)
	}
	if len(set.Replication) != 2 || !set.Replication.AllAcked() {
		t.Fatalf("wait=all report: %+v", set.Replication)
	}
	// Acknowledged by every peer: readable there at once.
	for _, cl := range []*podcache.Client{b, c} {
		got, err := cl.Get(ctx, typ, key)
		if err != nil {
			t.Fatal(err)
		}
		if got.Value != value || got.Version != set.Version {
			t.Fatalf("%s has %+v, want %+v", cl.URL(), got, set)
		}
	}

	// Without wait=all there is no report, and the write arrives later.
	plain, err := b.Set(ctx, typ, "plain", "1")
	if err != nil {
		t.Fatal(err)
	}
	if plain.Replication != nil {
		t.Fatalf("a write without wait=all has a report: %+v", plain.Replication)
	}
	eventually(t, 10*time.Second, func() string {
		if _, err := c.Get(ctx, typ, "plain"); err != nil {
			return err.Error()
		}
		return ""
	})

	batch, err := b.SetBatch(ctx, typ, map[string]string{"b1": "x", "b2": "y", "b3": ""}, podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	if batch.Count != 3 || len(batch.Versions) != 3 || batch.Versions["b2"] == "" || !batch.Replication.AllAcked() || len(batch.Replication) != 2 {
		t.Fatalf("batch answered %+v", batch)
	}
	want := map[string]string{key: value, "plain": "1", "b1": "x", "b2": "y", "b3": ""}
	for _, cl := range []*podcache.Client{a, b, c} {
		got, err := cl.List(ctx, typ)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%s lists %v, want %v", cl.URL(), got, want)
		}
	}
	if empty, err := a.List(ctx, typ+1); err != nil || len(empty) != 0 || empty == nil {
		t.Fatalf("an unused type lists %v, %v", empty, err)
	}

	del, err := c.Delete(ctx, typ, key, podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	if del.Key != key || del.Version == "" || del.Version == set.Version || !del.Replication.AllAcked() {
		t.Fatalf("delete answered %+v (set was %s)", del, set.Version)
	}
	_, err = a.Get(ctx, typ, key)
	if !podcache.IsNotFound(err) {
		t.Fatalf("a deleted key reads %v", err)
	}
	wantError(t, err, 404, "not_found")
	_, err = a.Delete(ctx, typ, key)
	wantError(t, err, 404, "not_found")

	// TTL: the expiry travels with the entry, and every replica stops
	// returning it at that moment.
	before := time.Now()
	ttl, err := a.Set(ctx, typ, "short", "lived", podcache.TTL(time.Second), podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	expires := time.UnixMilli(ttl.ExpiresAtMs)
	if expires.Before(before.Add(900*time.Millisecond)) || expires.After(time.Now().Add(1100*time.Millisecond)) {
		t.Fatalf("a 1s TTL expires at %v (now %v)", expires, time.Now())
	}
	if got, err := c.Get(ctx, typ, "short"); err != nil || got.ExpiresAtMs != ttl.ExpiresAtMs {
		t.Fatalf("the peer has %+v, %v", got, err)
	}
	eventually(t, 5*time.Second, func() string {
		for _, cl := range []*podcache.Client{a, b, c} {
			if _, err := cl.Get(ctx, typ, "short"); !podcache.IsNotFound(err) {
				return cl.URL() + " still has the entry: " + errString(err)
			}
		}
		return ""
	})
	if time.Now().Before(expires) {
		t.Fatalf("the entry was gone before its expiry")
	}
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

func TestBadRequestsAreTypedErrors(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 1, "--max-key-bytes", "32")
	c := client(t, nodes[0])
	ctx := bg(t)

	_, err := c.Set(ctx, 1, strings.Repeat("k", 33), "v")
	wantError(t, err, 400, "invalid_key")
	_, err = c.Set(ctx, 1, "", "v")
	wantError(t, err, 400, "invalid_key")
	_, err = c.SetBatch(ctx, 1, nil)
	wantError(t, err, 400, "empty_batch")
	_, err = c.Set(ctx, 1, "k", "v", podcache.TTL(0))
	wantError(t, err, 400, "invalid_ttl")
	_, err = c.Delete(ctx, 1, "k", podcache.TTL(time.Minute))
	wantError(t, err, 400, "invalid_query")
	if !strings.Contains(err.Error(), "400") || !strings.Contains(err.Error(), "invalid_query") {
		t.Fatalf("the error says %q", err)
	}
	// Nothing of it was written.
	if got, err := c.List(ctx, 1); err != nil || len(got) != 0 {
		t.Fatalf("after refused writes: %v, %v", got, err)
	}
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestBearerTokens(t *testing.T) {
	t.Parallel()
	const readToken, writeToken = "read-token-0123456789", "write-token-0123456789"
	file := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(file, []byte("read:"+readToken+"\nwrite:"+writeToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	nodes := testnode.StartCluster(t, 2, "--auth-token-file", file)
	ctx := bg(t)
	anonymous := client(t, nodes[0])
	reader := client(t, nodes[1], podcache.WithToken(readToken))
	writer := client(t, nodes[0], podcache.WithToken(writeToken))
	wrong := client(t, nodes[0], podcache.WithToken("not-a-token-of-the-file"))

	_, err := anonymous.Get(ctx, 3, "k")
	wantError(t, err, 401, "unauthorized")
	_, err = wrong.List(ctx, 3)
	wantError(t, err, 401, "unauthorized")
	_, err = reader.Set(ctx, 3, "k", "v")
	wantError(t, err, 403, "forbidden")
	_, err = anonymous.Watch(ctx, 3, podcache.WatchOptions{})
	wantError(t, err, 401, "unauthorized")

	if _, err := writer.Set(ctx, 3, "k", "v", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	if got, err := reader.Get(ctx, 3, "k"); err != nil || got.Value != "v" {
		t.Fatalf("the read token reads %+v, %v", got, err)
	}
	m := reader.Mirror(3, nil)
	defer m.Close()
	if err := m.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if v, ok := m.Get("k"); !ok || v != "v" {
		t.Fatalf("a mirror with the read token holds %q %v", v, ok)
	}
}
