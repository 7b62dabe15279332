package podcache_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// watch opens a stream that gives up after 20s, so a missing event fails
// the test instead of hanging it.
func watch(t *testing.T, c *podcache.Client, typ int32, opts podcache.WatchOptions) *podcache.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	s, err := c.Watch(ctx, typ, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func next(t *testing.T, s *podcache.Stream, kind string) podcache.Event {
	t.Helper()
	ev, err := s.Next()
	if err != nil {
		t.Fatalf("waiting for a %s event: %v", kind, err)
	}
	if ev.Kind != kind {
		t.Fatalf("want a %s event, got %s %s", kind, ev.Kind, ev.Data)
	}
	return ev
}

func nextChange(t *testing.T, s *podcache.Stream, key, value string, deleted bool, origin string) podcache.Event {
	t.Helper()
	ev := next(t, s, podcache.KindChange)
	c := ev.Change
	if c.Key != key || c.Value != value || c.Deleted != deleted || c.Origin != origin || c.Version == "" {
		t.Fatalf("want %s=%q deleted=%v from %s, got %+v", key, value, deleted, origin, *c)
	}
	if ev.ID == "" || (origin == podcache.OriginSnapshot) != strings.HasSuffix(ev.ID, "-snapshot") {
		t.Fatalf("a %s change has id %q", origin, ev.ID)
	}
	return ev
}

func TestWatchSnapshotLiveResumeAndReset(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 2)
	a, b := client(t, nodes[0]), client(t, nodes[1])
	ctx := bg(t)
	const typ = 11
	if _, err := a.Set(ctx, typ, "a", "1", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Set(ctx, typ+1, "other", "type", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}

	s := watch(t, b, typ, podcache.WatchOptions{Snapshot: true})
	nextChange(t, s, "a", "1", false, podcache.OriginSnapshot)
	live := next(t, s, podcache.KindLive)
	if live.ID == "" || live.Live.Entries != 1 || live.Live.Type != typ {
		t.Fatalf("live marker %+v %+v", live, live.Live)
	}
	if _, err := a.Set(ctx, typ, "b", "2"); err != nil {
		t.Fatal(err)
	}
	nextChange(t, s, "b", "2", false, podcache.OriginPeer)
	if _, err := b.Delete(ctx, typ, "a"); err != nil {
		t.Fatal(err)
	}
	last := nextChange(t, s, "a", "", true, podcache.OriginLocal).ID
	s.Close()
	if _, err := s.Next(); err == nil {
		t.Fatal("a closed stream gave an event")
	}

	// Missed while away: resumed right after the last id.
	if _, err := a.Set(ctx, typ, "c", "3", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Delete(ctx, typ, "b", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	s = watch(t, b, typ, podcache.WatchOptions{LastEventID: last})
	nextChange(t, s, "c", "3", false, podcache.OriginPeer)
	nextChange(t, s, "b", "", true, podcache.OriginPeer)

	// An id the node cannot resume from: reset, the state, live.
	s = watch(t, b, typ, podcache.WatchOptions{LastEventID: "0000000000000001-3"})
	reset := next(t, s, podcache.KindReset)
	if reset.Reset.Reason == "" || !strings.HasSuffix(reset.ID, "-snapshot") {
		t.Fatalf("reset %+v %+v", reset, reset.Reset)
	}
	nextChange(t, s, "c", "3", false, podcache.OriginSnapshot)
	if ev := next(t, s, podcache.KindLive); ev.Live.Entries != 1 {
		t.Fatalf("live after reset: %+v", ev.Live)
	}

	// One key only.
	if _, err := a.Set(ctx, typ, "d", "4", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	s = watch(t, b, typ, podcache.WatchOptions{Key: "c", Snapshot: true, IdleTimeout: 30 * time.Second})
	nextChange(t, s, "c", "3", false, podcache.OriginSnapshot)
	next(t, s, podcache.KindLive)
	// A batch that touches the key arrives as a batch event listing only
	// the key's entry.
	if _, err := a.SetBatch(ctx, typ, map[string]string{"d": "5", "c": "6"}); err != nil {
		t.Fatal(err)
	}
	ev := next(t, s, podcache.KindBatch)
	if b := ev.Batch; len(b.Entries) != 1 || b.Entries[0].Key != "c" || b.Entries[0].Value != "6" || b.Origin != podcache.OriginPeer {
		t.Fatalf("a batch on a watch of one key: %s", ev.Data)
	}
}

// The SSE parsing itself, on input the node does not send: comments, CRLF,
// data over several lines, unknown events, a cut-off event, a silent stream.
func TestStreamParsing(t *testing.T) {
	t.Parallel()
	body := ": keep-alive\r\n" +
		"event: live\r\nid: n-1\r\ndata: {\"type\":1,\r\ndata: \"entries\":0}\r\n\r\n" +
		"event: future\ndata: x\n\n" +
		"event: empty\n\n" +
		"event:change\ndata:{\"type\":1,\"key\":\"k\",\"value\":null,\"version\":\"v\",\"origin\":\"peer\"}\nid: n-2\n\n" +
		"event: change\ndata: {\"type\":1,\"key\":\"cut\""
	silent := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/watch/2" {
			w.Header().Set("Content-Type", "text/event-stream")
			w.(http.Flusher).Flush()
			<-silent
			return
		}
		if r.URL.Path != "/v1/watch/1" || r.Header.Get("Last-Event-ID") != "n-0" || r.URL.Query().Get("snapshot") != "true" {
			http.Error(w, `{"error":"bad","message":"unexpected request"}`, 400)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, body)
	}))
	defer srv.Close()
	defer close(silent)
	c, err := podcache.New(strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	s := watch(t, c, 1, podcache.WatchOptions{Snapshot: true, LastEventID: "n-0"})
	if ev := next(t, s, podcache.KindLive); ev.ID != "n-1" || ev.Live.Type != 1 {
		t.Fatalf("%+v", ev)
	}
	if ev := next(t, s, "future"); string(ev.Data) != "x" || ev.Change != nil {
		t.Fatalf("%+v", ev)
	}
	if ev := next(t, s, podcache.KindChange); ev.ID != "n-2" || !ev.Change.Deleted || ev.Change.Key != "k" {
		t.Fatalf("%+v %+v", ev, ev.Change)
	}
	if _, err := s.Next(); err != io.EOF {
		t.Fatalf("want io.EOF after a cut-off event, got %v", err)
	}
	if _, err := c.Watch(context.Background(), 3, podcache.WatchOptions{}); err == nil || !strings.Contains(err.Error(), "unexpected request") {
		t.Fatalf("an error answer gave %v", err)
	}

	start := time.Now()
	s = watch(t, c, 2, podcache.WatchOptions{IdleTimeout: 200 * time.Millisecond})
	if _, err := s.Next(); err == nil || !strings.Contains(err.Error(), "silent") {
		t.Fatalf("a silent stream gave %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("the idle timeout did not end the stream in time")
	}
}
