package podcache_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// sameWho fails unless got carries who wrote want, and when.
func sameWho(t *testing.T, where string, got, want *podcache.Entry) {
	t.Helper()
	if got.Value != want.Value || got.Version != want.Version || got.Author != want.Author ||
		got.Origin != want.Origin || got.Reason != want.Reason || !got.WrittenAt.Equal(want.WrittenAt) {
		t.Fatalf("%s holds %+v, want %+v", where, *got, *want)
	}
}

// The author (a token's name, a token's fingerprint), the replica that
// took the write, the reason and the time travel with the entry to every
// replica, with a tombstone too, and survive a restart with a data
// directory.
func TestAuthorAndReasonOnEveryReplica(t *testing.T) {
	t.Parallel()
	const named, unnamed, reader = "named-token-0123456789", "unnamed-token-0123456789", "read-token-0123456789"
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	file := "write:" + named + " name=flags-team\nwrite:" + unnamed + "\nread:" + reader + "\n"
	if err := os.WriteFile(tokens, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	nodes := testnode.Start(t, testnode.Config{Nodes: 3, Args: func(n *testnode.Node) []string {
		return []string{"--auth-token-file", tokens, "--data-dir", filepath.Join(dir, n.Name)}
	}})
	ctx := bg(t)
	writers := []*podcache.Client{
		client(t, nodes[0], podcache.WithToken(named)),
		client(t, nodes[1], podcache.WithToken(unnamed)),
		client(t, nodes[2], podcache.WithToken(named)),
	}
	readers := make([]*podcache.Client, 3)
	for i, n := range nodes {
		readers[i] = client(t, n, podcache.WithToken(reader))
	}
	const typ = 51
	sum := sha256.Sum256([]byte(unnamed))
	fingerprint := "token:" + hex.EncodeToString(sum[:])[:8]

	reason := "INC-7: turn the new checkout on for EU — ü"
	before := time.Now().Truncate(time.Millisecond)
	set, err := writers[0].Set(ctx, typ, "checkout.v2", "on", podcache.WaitAll(), podcache.Reason(reason))
	if err != nil {
		t.Fatal(err)
	}
	if set.Author != "flags-team" || set.Origin != nodes[0].Name || set.Reason != reason ||
		set.WrittenAt.Before(before) || set.WrittenAt.After(time.Now()) || set.WrittenAt.Location() != time.UTC {
		t.Fatalf("the write answered %+v (before %v)", *set, before)
	}
	plain, err := writers[1].Set(ctx, typ, "plain", "x", podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	if plain.Author != fingerprint || plain.Origin != nodes[1].Name || plain.Reason != "" || plain.WrittenAt.IsZero() {
		t.Fatalf("a write with an unnamed token and no reason answered %+v, want author %s", *plain, fingerprint)
	}
	if strings.Contains(plain.Author, unnamed) {
		t.Fatal("the author shows the token")
	}
	for i, r := range readers {
		for _, want := range []*podcache.Entry{set, plain} {
			got, err := r.Get(ctx, typ, want.Key)
			if err != nil {
				t.Fatal(err)
			}
			sameWho(t, nodes[i].Name, got, want)
		}
	}

	// A tombstone keeps who deleted it, why and when: the first version
	// of the key's history on every replica.
	del, err := writers[2].Delete(ctx, typ, "plain", podcache.WaitAll(), podcache.Reason("not needed"))
	if err != nil {
		t.Fatal(err)
	}
	if del.Author != "flags-team" || del.Origin != nodes[2].Name || del.Reason != "not needed" || del.WrittenAt.IsZero() {
		t.Fatalf("the delete answered %+v", *del)
	}
	for i, r := range readers {
		h, err := r.History(ctx, typ, "plain")
		if err != nil {
			t.Fatalf("%s: %v", nodes[i].Name, err)
		}
		if len(h) == 0 || !h[0].Deleted || h[0].Version != del.Version || h[0].Author != "flags-team" ||
			h[0].Origin != nodes[2].Name || h[0].Reason != "not needed" || !h[0].WrittenAt.Equal(del.WrittenAt) {
			t.Fatalf("%s's history of a deleted key: %+v", nodes[i].Name, h)
		}
	}

	// The reason's limits: 256 bytes of UTF-8.
	if _, err := writers[0].Set(ctx, typ, "limit", "v", podcache.Reason(strings.Repeat("é", 128))); err != nil {
		t.Fatalf("a reason of 256 bytes: %v", err)
	}
	_, err = writers[0].Set(ctx, typ, "limit", "v", podcache.Reason(strings.Repeat("r", 257)))
	wantError(t, err, 400, "invalid_reason")
	_, err = writers[0].Set(ctx, typ, "limit", "v", podcache.Reason("not \xff UTF-8"))
	wantError(t, err, 400, "invalid_reason")
	_, err = writers[0].SetBatch(ctx, typ, map[string]string{"limit": "w"}, podcache.Reason(strings.Repeat("r", 257)))
	wantError(t, err, 400, "invalid_reason")
	_, err = writers[0].Delete(ctx, typ, "limit", podcache.Reason(strings.Repeat("r", 257)))
	wantError(t, err, 400, "invalid_reason")
	if got, err := readers[0].Get(ctx, typ, "limit"); err != nil || got.Value != "v" {
		t.Fatalf("after refused writes: %+v, %v", got, err)
	}
	var e *podcache.Error
	if _, err := writers[0].Set(ctx, typ, "limit", "v", podcache.Reason("a\nb")); err == nil || errors.As(err, &e) {
		t.Fatalf("a reason with a line break: %v", err)
	}

	// Every node restarts at once: what they hold comes from their data
	// directories.
	for _, n := range nodes {
		n.Kill()
	}
	nodes[1].Restart()
	got, err := readers[1].Get(ctx, typ, "checkout.v2")
	if err != nil {
		t.Fatal(err)
	}
	sameWho(t, nodes[1].Name+" after a restart", got, set)
	h, err := readers[1].History(ctx, typ, "plain")
	if err != nil || len(h) == 0 || !h[0].Deleted || h[0].Author != "flags-team" || h[0].Reason != "not needed" {
		t.Fatalf("the history of a deleted key after a restart: %+v, %v", h, err)
	}
}

// History on every replica, newest first, with deletions; a rollback
// through one replica reaches every other, with its own author and
// reason.
func TestHistoryAndRollbackReachEveryReplica(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 3)
	cs := []*podcache.Client{client(t, nodes[0]), client(t, nodes[1]), client(t, nodes[2])}
	ctx := bg(t)
	const typ = 52
	key := "route/eu west"

	v1, err := cs[0].Set(ctx, typ, key, "blue", podcache.WaitAll(), podcache.Reason("first"))
	if err != nil {
		t.Fatal(err)
	}
	v2, err := cs[1].Set(ctx, typ, key, "green", podcache.WaitAll(), podcache.Reason("second"))
	if err != nil {
		t.Fatal(err)
	}
	v3, err := cs[2].Delete(ctx, typ, key, podcache.WaitAll(), podcache.Reason("third"))
	if err != nil {
		t.Fatal(err)
	}
	want := []podcache.HistoryEntry{
		{Version: v3.Version, Deleted: true, Author: "anonymous", Origin: nodes[2].Name, Reason: "third", WrittenAt: v3.WrittenAt},
		{Version: v2.Version, Value: "green", Author: "anonymous", Origin: nodes[1].Name, Reason: "second", WrittenAt: v2.WrittenAt},
		{Version: v1.Version, Value: "blue", Author: "anonymous", Origin: nodes[0].Name, Reason: "first", WrittenAt: v1.WrittenAt},
	}
	for i, c := range cs {
		h, err := c.History(ctx, typ, key)
		if err != nil {
			t.Fatalf("%s: %v", nodes[i].Name, err)
		}
		if len(h) != len(want) {
			t.Fatalf("%s's history: %+v, want %+v", nodes[i].Name, h, want)
		}
		for j := range want {
			if !h[j].WrittenAt.Equal(want[j].WrittenAt) || !sameBut(h[j], want[j]) {
				t.Fatalf("%s's history, version %d: %+v, want %+v", nodes[i].Name, j, h[j], want[j])
			}
		}
	}
	checkHistoryJSON(t, nodes[1].URL, typ, key)

	// Back to the first version, through the second node.
	rb, err := cs[1].Rollback(ctx, typ, key, v1.Version, podcache.WaitAll(), podcache.Reason("undo INC-8"))
	if err != nil {
		t.Fatal(err)
	}
	if rb.Value != "blue" || rb.Deleted || rb.Key != key || rb.Type != typ || rb.Author != "anonymous" ||
		rb.Origin != nodes[1].Name || rb.Reason != "undo INC-8" || rb.WrittenAt.Before(v3.WrittenAt) {
		t.Fatalf("the rollback answered %+v", *rb)
	}
	for _, old := range []string{v1.Version, v2.Version, v3.Version} {
		if rb.Version == old {
			t.Fatalf("the rollback reused version %s", old)
		}
	}
	if len(rb.Replication) != 2 || !rb.Replication.AllAcked() {
		t.Fatalf("the rollback's report: %+v", rb.Replication)
	}
	for i, c := range cs {
		got, err := c.Get(ctx, typ, key)
		if err != nil {
			t.Fatalf("%s after the rollback: %v", nodes[i].Name, err)
		}
		sameWho(t, nodes[i].Name+" after the rollback", got, rb)
		h, err := c.History(ctx, typ, key)
		if err != nil || len(h) != 4 || h[0].Version != rb.Version || h[0].Value != "blue" || h[0].Reason != "undo INC-8" {
			t.Fatalf("%s's history after the rollback: %+v, %v", nodes[i].Name, h, err)
		}
	}

	// Back to the deletion, through the first node.
	rd, err := cs[0].Rollback(ctx, typ, key, v3.Version, podcache.WaitAll(), podcache.Reason("delete it again"))
	if err != nil {
		t.Fatal(err)
	}
	if !rd.Deleted || rd.Value != "" || rd.Origin != nodes[0].Name || rd.Reason != "delete it again" || rd.Version == v3.Version {
		t.Fatalf("the rollback to a deletion answered %+v", *rd)
	}
	for i, c := range cs {
		if _, err := c.Get(ctx, typ, key); !podcache.IsNotFound(err) {
			t.Fatalf("%s after a rollback to a deletion: %v", nodes[i].Name, err)
		}
		h, err := c.History(ctx, typ, key)
		if err != nil || len(h) != 5 || !h[0].Deleted || h[0].Version != rd.Version || h[0].Reason != "delete it again" {
			t.Fatalf("%s's history after the rollback to a deletion: %+v, %v", nodes[i].Name, h, err)
		}
	}

	// What is not in the history.
	node := v1.Version[strings.IndexByte(v1.Version, '@'):]
	_, err = cs[2].Rollback(ctx, typ, key, "1.0"+node)
	wantError(t, err, 404, "version_not_found")
	_, err = cs[2].Rollback(ctx, typ, key, "not a version")
	wantError(t, err, 400, "invalid_query")
	_, err = cs[2].Rollback(ctx, typ, key, "")
	wantError(t, err, 400, "invalid_query")
	_, err = cs[2].History(ctx, typ, "never written")
	wantError(t, err, 404, "not_found")
	if _, err = cs[2].Rollback(ctx, typ, "never written", v1.Version); !podcache.IsNotFound(err) {
		t.Fatalf("a rollback of a key without history: %v", err)
	}
}

// sameBut compares history entries but for WrittenAt.
func sameBut(a, b podcache.HistoryEntry) bool {
	a.WrittenAt, b.WrittenAt = time.Time{}, time.Time{}
	return a == b
}

// checkHistoryJSON checks the answer's shape itself: the fields the
// client reads leniently (a deletion is "deleted": true, a value a
// string).
func checkHistoryJSON(t *testing.T, base string, typ int32, key string) {
	t.Helper()
	target := fmt.Sprintf("%s/v1/cache/%d/%s/history", base, typ, url.PathEscape(key))
	resp, err := http.Get(target)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Type     *int32                       `json:"type"`
		Key      *string                      `json:"key"`
		Versions []map[string]json.RawMessage `json:"versions"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", target, resp.StatusCode, err)
	}
	if body.Type == nil || *body.Type != typ || body.Key == nil || *body.Key != key || len(body.Versions) == 0 {
		t.Fatalf("GET %s answered type %v key %v, %d versions", target, body.Type, body.Key, len(body.Versions))
	}
	for i, v := range body.Versions {
		fields := make([]string, 0, len(v))
		for f := range v {
			fields = append(fields, f)
		}
		sort.Strings(fields)
		for _, f := range []string{"version", "author", "origin", "reason", "written_at"} {
			if _, ok := v[f]; !ok {
				t.Fatalf("version %d of GET %s has no %q: %v", i, target, f, fields)
			}
		}
		deleted := string(v["deleted"]) == "true"
		value, hasValue := v["value"]
		if deleted == (hasValue && string(value) != "null") || (!deleted && (len(value) == 0 || value[0] != '"')) {
			t.Fatalf("version %d of GET %s: deleted %s, value %s (fields %v)", i, target, v["deleted"], value, fields)
		}
	}
}
