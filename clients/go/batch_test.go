package podcache_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// The batch event and the who/why fields of change events, decoded from
// what the node sends (here from a stand-in server), and a Mirror that
// applies the batch at once with one OnBatch call.
func TestBatchEventDecodingAndMirror(t *testing.T) {
	t.Parallel()
	const stream = "event: change\nid: n-1-snapshot\n" +
		`data: {"type":4,"key":"gone","value":"x","version":"1.0@a","deleted":false,"origin":"snapshot",` +
		`"author":"old","origin_pod":"pod-a","reason":null,"written_at":"2026-12-02T12:39:00.000Z"}` + "\n\n" +
		"event: live\nid: n-1\ndata: {\"type\":4,\"entries\":1}\n\n" +
		"event: change\nid: n-2\n" +
		`data: {"type":4,"key":"one","value":"1","version":"2.0@a","deleted":false,"origin":"peer",` +
		`"author":"flags-team","origin_pod":"pod-a","reason":"INC-7","written_at":"2026-12-02T12:40:00.123Z","expires_at_ms":99999999999999}` + "\n\n" +
		"event: batch\nid: n-3\n" +
		`data: {"type":4,"version":"3.0@b","origin":"local","author":"anonymous","origin_pod":"pod-b",` +
		`"reason":"rollout 42","written_at":"2026-12-02T12:41:00.5Z","entries":[` +
		`{"key":"a","value":"1","deleted":false,"version":"3.0@b"},` +
		`{"key":"gone","value":null,"deleted":true,"version":"3.0@b"},` +
		`{"key":"b","value":"1","deleted":false,"version":"3.0@b","expires_at_ms":99999999999999}]}` + "\n\n"
	hold := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/readyz" {
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, stream)
		w.(http.Flusher).Flush()
		select {
		case <-hold:
		case <-r.Context().Done():
		}
	}))
	defer func() {
		close(hold) // ends the open streams
		srv.Close()
	}()
	c, err := podcache.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}

	s := watch(t, c, 4, podcache.WatchOptions{Snapshot: true})
	if ev := next(t, s, podcache.KindChange); ev.Change.Author != "old" || ev.Change.Reason != "" || ev.Change.OriginPod != "pod-a" {
		t.Fatalf("snapshot change %+v", *ev.Change)
	}
	next(t, s, podcache.KindLive)
	ch := next(t, s, podcache.KindChange).Change
	at := time.Date(2026, 12, 2, 12, 40, 0, 123e6, time.UTC)
	if ch.Author != "flags-team" || ch.OriginPod != "pod-a" || ch.Origin != podcache.OriginPeer ||
		ch.Reason != "INC-7" || !ch.WrittenAt.Equal(at) || ch.ExpiresAtMs != 99999999999999 {
		t.Fatalf("change %+v", *ch)
	}
	ev := next(t, s, podcache.KindBatch)
	b := ev.Batch
	if ev.ID != "n-3" || b == nil || b.Type != 4 || b.Version != "3.0@b" || b.Origin != podcache.OriginLocal ||
		b.Author != "anonymous" || b.OriginPod != "pod-b" || b.Reason != "rollout 42" ||
		!b.WrittenAt.Equal(time.Date(2026, 12, 2, 12, 41, 0, 5e8, time.UTC)) || len(b.Entries) != 3 {
		t.Fatalf("batch %+v", ev)
	}
	want := []podcache.Change{
		{Type: 4, Key: "a", Value: "1", Version: "3.0@b", Origin: "local", Author: "anonymous", OriginPod: "pod-b", Reason: "rollout 42", WrittenAt: b.WrittenAt},
		{Type: 4, Key: "gone", Deleted: true, Version: "3.0@b", Origin: "local", Author: "anonymous", OriginPod: "pod-b", Reason: "rollout 42", WrittenAt: b.WrittenAt},
		{Type: 4, Key: "b", Value: "1", Version: "3.0@b", Origin: "local", Author: "anonymous", OriginPod: "pod-b", Reason: "rollout 42", WrittenAt: b.WrittenAt, ExpiresAtMs: 99999999999999},
	}
	for i, w := range want {
		if b.Entries[i] != w {
			t.Fatalf("batch entry %d is %+v, want %+v", i, b.Entries[i], w)
		}
	}

	// The Mirror: one OnBatch call for the batch, made once the whole batch
	// is in place; OnChange for the rest.
	var mu sync.Mutex
	var changes []string
	var batches []podcache.Batch
	var m *podcache.Mirror
	m = c.Mirror(4, &podcache.MirrorOptions{
		OnChange: func(c podcache.Change) {
			mu.Lock()
			changes = append(changes, c.Key)
			mu.Unlock()
		},
		OnBatch: func(b podcache.Batch) {
			got := m.GetMany("a", "b", "gone")
			mu.Lock()
			batches = append(batches, b)
			mu.Unlock()
			if len(got) != 2 || got["a"] != "1" || got["b"] != "1" {
				t.Errorf("OnBatch sees %v", got)
			}
		},
	})
	defer m.Close()
	eventually(t, 10*time.Second, func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(batches) == 0 {
			return "no OnBatch call"
		}
		return ""
	})
	m.Close()
	if strings.Join(changes, ",") != "gone,one" || len(batches) != 1 || len(batches[0].Entries) != 3 {
		t.Fatalf("OnChange saw %v, OnBatch %+v", changes, batches)
	}
	if got := m.Snapshot(); len(got) != 3 || got["one"] != "1" || got["a"] != "1" || got["b"] != "1" {
		t.Fatalf("the mirror holds %v", got)
	}
	if m.LastEventID() != "n-3" {
		t.Fatalf("last event id %q", m.LastEventID())
	}

	// Without OnBatch, the batch's entries go to OnChange one by one, each
	// call seeing the whole batch already.
	var seen []string
	var m2 *podcache.Mirror
	m2 = c.Mirror(4, &podcache.MirrorOptions{OnChange: func(c podcache.Change) {
		if c.Origin == podcache.OriginLocal {
			if got := m2.GetMany("a", "b", "gone"); len(got) != 2 {
				t.Errorf("OnChange of %s sees %v", c.Key, got)
			}
		}
		mu.Lock()
		seen = append(seen, c.Key)
		mu.Unlock()
	}})
	defer m2.Close()
	eventually(t, 10*time.Second, func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(seen) < 5 {
			return fmt.Sprintf("OnChange saw %v", seen)
		}
		return ""
	})
	m2.Close()
	if strings.Join(seen, ",") != "gone,one,a,gone,b" {
		t.Fatalf("OnChange saw %v", seen)
	}
}

// Reasons are checked on this side for what cannot be a header; a key
// both set and deleted is refused before anything is sent.
func TestWriteOptionsOnTheWire(t *testing.T) {
	t.Parallel()
	type request struct {
		method, path, query, reason, body string
		hasReason                         bool
	}
	var mu sync.Mutex
	var got []request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		_, has := r.Header[http.CanonicalHeaderKey(podcache.ReasonHeader)]
		mu.Lock()
		got = append(got, request{r.Method, r.URL.EscapedPath(), r.URL.RawQuery, r.Header.Get(podcache.ReasonHeader), string(body), has})
		mu.Unlock()
		io.WriteString(w, `{"type":1,"key":"k","value":"v","version":"1.0@a","author":null,"origin":null,"reason":null}`)
	}))
	defer srv.Close()
	c, err := podcache.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx := bg(t)
	e, err := c.Set(ctx, 1, "k", "v", podcache.Reason(" INC-7: flip ü "), podcache.WaitAll())
	if err != nil {
		t.Fatal(err)
	}
	if e.Author != "" || e.Origin != "" || e.Reason != "" || !e.WrittenAt.IsZero() {
		t.Fatalf("nulls decoded as %+v", e)
	}
	if _, err := c.Delete(ctx, 1, "k/x", podcache.Reason("")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteBatch(ctx, 1, podcache.BatchWrite{Set: map[string]string{"a": "1"}, Delete: []string{"b"}}, podcache.Reason("r")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rollback(ctx, 1, "k/x", "12.0@ab", podcache.WaitAll(), podcache.Reason("undo")); err != nil {
		t.Fatal(err)
	}
	want := []request{
		{"PUT", "/v1/cache/1/k", "wait=all", "INC-7: flip ü", "v", true},
		{"DELETE", "/v1/cache/1/k%2Fx", "", "", "", false},
		{"POST", "/v1/cache/1", "", "r", `{"a":"1","b":null}`, true},
		{"POST", "/v1/cache/1/k%2Fx/rollback", "version=12.0%40ab&wait=all", "undo", "", true},
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Fatalf("requests %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("request %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	n := len(got)
	if _, err := c.Set(ctx, 1, "k", "v", podcache.Reason("two\nlines")); err == nil || !strings.Contains(err.Error(), "control character") {
		t.Fatalf("a reason with a line break gave %v", err)
	}
	var perr *podcache.Error
	if _, err := c.WriteBatch(ctx, 1, podcache.BatchWrite{Set: map[string]string{"a": "1"}, Delete: []string{"a"}}); err == nil || errors.As(err, &perr) {
		t.Fatalf("a key both set and deleted gave %v", err)
	}
	if len(got) != n {
		t.Fatal("a refused write was sent")
	}
}

// batchKeys are the 50 keys every batch of TestNoObserverSeesPartOfABatch
// sets; oddKey is set by the odd batches and deleted by the even ones.
var batchKeys = func() []string {
	keys := make([]string, 50)
	for i := range keys {
		keys[i] = fmt.Sprintf("k%02d", i)
	}
	return keys
}()

const oddKey = "odd"

var allBatchKeys = append(append([]string{}, batchKeys...), oddKey)

// whole is "" when state holds one batch whole (or nothing yet): every
// key of batchKeys with the same number n, and oddKey = n exactly when n
// is odd.
func whole(state map[string]string) string {
	if len(state) == 0 {
		return ""
	}
	n := state[batchKeys[0]]
	for _, k := range batchKeys {
		if v, ok := state[k]; !ok || v != n {
			return fmt.Sprintf("%s is %q (present %v), %s is %q", k, v, ok, batchKeys[0], n)
		}
	}
	i, err := strconv.Atoi(n)
	if err != nil {
		return fmt.Sprintf("value %q", n)
	}
	v, ok := state[oddKey]
	if ok != (i%2 == 1) || (ok && v != n) {
		return fmt.Sprintf("batch %d but %s is %q (present %v)", i, oddKey, v, ok)
	}
	if len(state) > len(batchKeys)+1 {
		return fmt.Sprintf("%d keys", len(state))
	}
	return ""
}

// violations keeps the first few broken observations of goroutines that
// must not call t.Fatal.
type violations struct {
	mu    sync.Mutex
	n     int
	first []string
	where map[string]int // how many of each kind
}

func (v *violations) check(where string, state map[string]string) {
	if why := whole(state); why != "" {
		v.add(where + ": " + why)
	}
}

func (v *violations) add(msg string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.n++
	kind := strings.SplitN(msg, ":", 2)[0]
	if v.where == nil {
		v.where = map[string]int{}
	}
	if v.where[kind]++; v.where[kind] <= 2 {
		v.first = append(v.first, msg)
	}
}

// The test: a Mirror (with OnBatch, and one with OnChange only),
// its readers and a watch stream on one node never observe part of a
// 50-key batch while 1,000 batches are written through another.
func TestNoObserverSeesPartOfABatch(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 2)
	a, b := client(t, nodes[0]), client(t, nodes[1])
	ctx := bg(t)
	const typ, batches = 61, 1000
	var bad violations

	// A Mirror with OnBatch: each call sees its batch whole, in the
	// mirror and in its entries.
	var onBatch, mirrorErrors int64
	lastBatch := 0 // only OnBatch uses it
	var batchMirror *podcache.Mirror
	batchMirror = b.Mirror(typ, &podcache.MirrorOptions{
		OnBatch: func(batch podcache.Batch) {
			atomic.AddInt64(&onBatch, 1)
			bad.check("in OnBatch, the mirror", batchMirror.Snapshot())
			state := map[string]string{}
			for _, c := range batch.Entries {
				if !c.Deleted {
					state[c.Key] = c.Value
				}
				if c.Version != batch.Version {
					bad.add(fmt.Sprintf("entry %s has version %s, its batch %s", c.Key, c.Version, batch.Version))
				}
			}
			if len(batch.Entries) != len(batchKeys)+1 {
				bad.add(fmt.Sprintf("a batch event of %d entries", len(batch.Entries)))
			}
			bad.check("OnBatch's entries", state)
			if n, _ := strconv.Atoi(state[batchKeys[0]]); n <= lastBatch {
				bad.add(fmt.Sprintf("OnBatch got batch %d after %d", n, lastBatch))
			} else {
				lastBatch = n
			}
		},
		OnChange: func(c podcache.Change) {
			if c.Origin != podcache.OriginSnapshot {
				bad.add(fmt.Sprintf("OnChange with OnBatch set: %+v", c))
			}
		},
		OnError: func(error) { atomic.AddInt64(&mirrorErrors, 1) },
	})
	defer batchMirror.Close()
	// A Mirror with OnChange only (as before batch events): every call
	// sees the whole batch.
	var onChange int64
	var changeMirror *podcache.Mirror
	changeMirror = b.Mirror(typ, &podcache.MirrorOptions{
		OnChange: func(c podcache.Change) {
			atomic.AddInt64(&onChange, 1)
			bad.check("in OnChange, the mirror", changeMirror.GetMany(allBatchKeys...))
		},
		OnError: func(error) { atomic.AddInt64(&mirrorErrors, 1) },
	})
	defer changeMirror.Close()
	for _, m := range []*podcache.Mirror{batchMirror, changeMirror} {
		if err := m.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
	}

	// A reader of the mirror, as a service's requests would read it.
	readCtx, stopReading := context.WithCancel(ctx)
	defer stopReading()
	var reads int64
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		defer readers.Done()
		for {
			select {
			case <-readCtx.Done():
				return
			default:
			}
			bad.check("a reader's Snapshot", batchMirror.Snapshot())
			bad.check("a reader's GetMany", batchMirror.GetMany(allBatchKeys...))
			atomic.AddInt64(&reads, 1)
			// Pacing only (two cores share the nodes, the writer and
			// this): no result depends on it.
			time.Sleep(200 * time.Microsecond)
		}
	}()

	// Watch streams, applied event by event: one on the mirrors' node, one
	// on the writing node.
	watchCtx, cancelWatch := context.WithTimeout(ctx, 50*time.Second)
	defer cancelWatch()
	peerWatch := startBatchWatcher(t, watchCtx, b, typ, &bad)
	defer peerWatch.stream.Close()
	localWatch := startBatchWatcher(t, watchCtx, a, typ, &bad)
	defer localWatch.stream.Close()

	// The writer: batch i sets every key to i, and sets or deletes oddKey.
	start := time.Now()
	for i := 1; i <= batches; i++ {
		n := strconv.Itoa(i)
		w := podcache.BatchWrite{Set: map[string]string{}}
		for _, k := range batchKeys {
			w.Set[k] = n
		}
		if i%2 == 1 {
			w.Set[oddKey] = n
		} else {
			w.Delete = []string{oddKey}
		}
		r, err := a.WriteBatch(ctx, typ, w)
		if err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
		if r.Count != len(batchKeys)+1 {
			t.Fatalf("batch %d answered %+v", i, r)
		}
	}
	wrote := time.Since(start)

	final := strconv.Itoa(batches)
	eventually(t, 20*time.Second, func() string {
		for name, m := range map[string]*podcache.Mirror{"OnBatch": batchMirror, "OnChange": changeMirror} {
			if v, _ := m.Get(batchKeys[0]); v != final {
				return fmt.Sprintf("the %s mirror is at batch %q", name, v)
			}
		}
		for _, w := range []*batchWatcher{peerWatch, localWatch} {
			if n := atomic.LoadInt64(&w.last); n != batches {
				return fmt.Sprintf("the watcher of %s is at batch %d", w.node, n)
			}
		}
		return ""
	})
	stopReading()
	readers.Wait()
	for _, w := range []*batchWatcher{peerWatch, localWatch} {
		w.stream.Close()
		<-w.done
	}
	batchMirror.Close()
	changeMirror.Close()

	t.Logf("%d batches written in %v; the watcher of the other node saw %d batch events (%d resets), "+
		"of the writing node %d (%d resets); OnBatch %d calls, OnChange %d, %d reads, %d mirror errors",
		batches, wrote.Round(time.Millisecond), peerWatch.batches, peerWatch.resets, localWatch.batches, localWatch.resets,
		onBatch, onChange, reads, mirrorErrors)
	bad.mu.Lock()
	defer bad.mu.Unlock()
	if bad.n > 0 {
		t.Fatalf("%d observations of part of a batch (%v); the first: %s", bad.n, bad.where, strings.Join(bad.first, "; "))
	}
	// The writing node sends every batch as one event (its peers may get
	// several at once, coalesced: only the last of them changes there).
	if localWatch.resets == 0 && localWatch.batches != batches {
		t.Fatalf("the watcher of the writing node saw %d batch events for %d batches", localWatch.batches, batches)
	}
	if onBatch == 0 || peerWatch.batches == 0 || reads == 0 {
		t.Fatal("nothing observed while the batches were written")
	}
}

// batchWatcher follows a watch stream for TestNoObserverSeesPartOfABatch,
// checking its state after every event.
type batchWatcher struct {
	node            string
	stream          *podcache.Stream
	done            chan struct{}
	last            int64 // the batch number the state is at
	batches, resets int64 // read once done is closed
}

func startBatchWatcher(t *testing.T, ctx context.Context, c *podcache.Client, typ int32, bad *violations) *batchWatcher {
	s, err := c.Watch(ctx, typ, podcache.WatchOptions{Snapshot: true})
	if err != nil {
		t.Fatal(err)
	}
	w := &batchWatcher{node: c.URL(), stream: s, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		where := "the watcher of " + w.node
		state := map[string]string{}
		snapshot := true
		for {
			ev, err := s.Next()
			if err != nil {
				return
			}
			switch ev.Kind {
			case podcache.KindReset:
				w.resets++
				state, snapshot = map[string]string{}, true
				continue
			case podcache.KindLive:
				snapshot = false
			case podcache.KindChange:
				c := ev.Change
				if c.Deleted {
					delete(state, c.Key)
				} else {
					state[c.Key] = c.Value
				}
				if snapshot {
					continue
				}
				bad.add(fmt.Sprintf("%s got a change event for %s, not a batch", where, c.Key))
			case podcache.KindBatch:
				w.batches++
				if len(ev.Batch.Entries) != len(batchKeys)+1 || ev.ID == "" {
					bad.add(fmt.Sprintf("%s got a batch event of %d entries, id %q", where, len(ev.Batch.Entries), ev.ID))
				}
				for _, c := range ev.Batch.Entries {
					if c.Deleted {
						delete(state, c.Key)
					} else {
						state[c.Key] = c.Value
					}
				}
			}
			bad.check(where, state)
			n, _ := strconv.Atoi(state[batchKeys[0]])
			if last := atomic.LoadInt64(&w.last); int64(n) < last || (ev.Kind == podcache.KindBatch && int64(n) == last) {
				bad.add(fmt.Sprintf("%s went from batch %d to %d", where, last, n))
			}
			atomic.StoreInt64(&w.last, int64(n))
		}
	}()
	return w
}

// A batch with deletes on real nodes: one shared version, the deleted key
// gone everywhere, one batch event on a watch of another node (whole
// after a resume too), only the key's entry on a watch of one key, and
// the who/why fields of change events.
func TestBatchWithDeletesIsOneEvent(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 2)
	a, b := client(t, nodes[0]), client(t, nodes[1])
	ctx := bg(t)
	const typ = 62
	if _, err := a.SetBatch(ctx, typ, map[string]string{"old": "1", "kept": "1"}, podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	all := watch(t, b, typ, podcache.WatchOptions{})
	one := watch(t, b, typ, podcache.WatchOptions{Key: "old"})
	local := watch(t, a, typ, podcache.WatchOptions{})

	// A single write: its change event says who, from where and why.
	pre, err := a.Set(ctx, typ, "pre", "p", podcache.Reason("before the rollout"))
	if err != nil {
		t.Fatal(err)
	}
	ev := nextChange(t, all, "pre", "p", false, podcache.OriginPeer)
	if c := ev.Change; c.Author != "anonymous" || c.OriginPod != nodes[0].Name || c.Reason != "before the rollout" ||
		!c.WrittenAt.Equal(pre.WrittenAt) || c.Version != pre.Version {
		t.Fatalf("the change event %+v, the write %+v", *c, *pre)
	}
	nextChange(t, local, "pre", "p", false, podcache.OriginLocal)
	resumeFrom := ev.ID

	r, err := a.WriteBatch(ctx, typ, podcache.BatchWrite{
		Set:    map[string]string{"new": "2", "kept": "2"},
		Delete: []string{"old"},
	}, podcache.WaitAll(), podcache.Reason("rollout 42"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Count != 3 || len(r.Versions) != 3 || !r.Replication.AllAcked() || len(r.Replication) != 1 {
		t.Fatalf("the batch answered %+v", r)
	}
	version := r.Versions["old"]
	for k, v := range r.Versions {
		if v != version || v == "" {
			t.Fatalf("the batch's versions are not one: %v (%s)", r.Versions, k)
		}
	}
	for _, c := range []*podcache.Client{a, b} {
		got, err := c.List(ctx, typ)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 3 || got["new"] != "2" || got["kept"] != "2" || got["pre"] != "p" {
			t.Fatalf("%s lists %v after the batch", c.URL(), got)
		}
		if _, err := c.Get(ctx, typ, "old"); !podcache.IsNotFound(err) {
			t.Fatalf("%s: the deleted key reads %v", c.URL(), err)
		}
		e, err := c.Get(ctx, typ, "kept")
		if err != nil || e.Version != version || e.Author != "anonymous" || e.Origin != nodes[0].Name || e.Reason != "rollout 42" {
			t.Fatalf("%s: a batch entry reads %+v, %v", c.URL(), e, err)
		}
		h, err := c.History(ctx, typ, "old")
		if err != nil || len(h) != 2 || !h[0].Deleted || h[0].Version != version || h[0].Reason != "rollout 42" || h[1].Value != "1" {
			t.Fatalf("%s: the deleted key's history %+v, %v", c.URL(), h, err)
		}
	}

	checkBatch := func(where string, ev podcache.Event, origin string, keys ...string) {
		t.Helper()
		bt := ev.Batch
		if ev.Kind != podcache.KindBatch || bt == nil || ev.ID == "" {
			t.Fatalf("%s: want a batch event, got %s %s", where, ev.Kind, ev.Data)
		}
		if bt.Type != typ || bt.Version != version || bt.Origin != origin || bt.Author != "anonymous" ||
			bt.OriginPod != nodes[0].Name || bt.Reason != "rollout 42" || bt.WrittenAt.IsZero() {
			t.Fatalf("%s: the batch event %s", where, ev.Data)
		}
		var got []string
		for _, c := range bt.Entries {
			if c.Version != version || c.Origin != origin || c.Reason != "rollout 42" {
				t.Fatalf("%s: entry %+v", where, c)
			}
			switch {
			case c.Key == "old" && c.Deleted && c.Value == "":
			case (c.Key == "new" || c.Key == "kept") && !c.Deleted && c.Value == "2":
			default:
				t.Fatalf("%s: entry %+v", where, c)
			}
			got = append(got, c.Key)
		}
		sort.Strings(got)
		if strings.Join(got, ",") != strings.Join(keys, ",") {
			t.Fatalf("%s: the batch event lists %v, want %v", where, got, keys)
		}
	}
	checkBatch("a watch of the other node", next(t, all, podcache.KindBatch), podcache.OriginPeer, "kept", "new", "old")
	checkBatch("a watch of the writing node", next(t, local, podcache.KindBatch), podcache.OriginLocal, "kept", "new", "old")
	checkBatch("a watch of one key", next(t, one, podcache.KindBatch), podcache.OriginPeer, "old")

	// Resumed from before it, the batch is replayed whole.
	resumed := watch(t, b, typ, podcache.WatchOptions{LastEventID: resumeFrom})
	checkBatch("a resumed watch", next(t, resumed, podcache.KindBatch), podcache.OriginPeer, "kept", "new", "old")

	// After it, a single write is a change event again, on both.
	if _, err := a.Set(ctx, typ, "old", "back"); err != nil {
		t.Fatal(err)
	}
	nextChange(t, all, "old", "back", false, podcache.OriginPeer)
	nextChange(t, one, "old", "back", false, podcache.OriginPeer)
}
