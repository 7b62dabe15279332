package podcache_test

import (
	"context"
	"fmt"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// recorder keeps what a Mirror's callbacks saw.
type recorder struct {
	mu      sync.Mutex
	changes []podcache.Change
	errors  []error
}

func (r *recorder) options() *podcache.MirrorOptions {
	return &podcache.MirrorOptions{
		OnChange: func(c podcache.Change) {
			r.mu.Lock()
			r.changes = append(r.changes, c)
			r.mu.Unlock()
		},
		OnError: func(err error) {
			r.mu.Lock()
			r.errors = append(r.errors, err)
			r.mu.Unlock()
		},
		MaxBackoff: time.Second,
	}
}

func (r *recorder) counts() (changes, errors int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.changes), len(r.errors)
}

// sameAs is "" when the mirror holds exactly what every node lists.
func sameAs(ctx context.Context, m *podcache.Mirror, typ int32, clients ...*podcache.Client) string {
	got := m.Snapshot()
	for _, c := range clients {
		want, err := c.List(ctx, typ)
		if err != nil {
			return err.Error()
		}
		if !reflect.DeepEqual(got, want) {
			return fmt.Sprintf("the mirror holds %d entries, %s lists %d; first difference: %s",
				len(got), c.URL(), len(want), firstDifference(got, want))
		}
	}
	return ""
}

func firstDifference(got, want map[string]string) string {
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			return fmt.Sprintf("%q is %q in the mirror (present %v), %q in the node", k, g, ok, v)
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			return fmt.Sprintf("%q=%q is only in the mirror", k, v)
		}
	}
	return "none"
}

func TestMirrorFollowsItsType(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 2)
	a, b := client(t, nodes[0]), client(t, nodes[1])
	ctx := bg(t)
	const typ = 21
	if _, err := a.SetBatch(ctx, typ, map[string]string{"x": "1", "y": "2"}, podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	m := b.Mirror(typ, rec.options())
	defer m.Close()
	if err := m.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if v, ok := m.Get("x"); !ok || v != "1" {
		t.Fatalf("x is %q %v", v, ok)
	}
	if n, _ := rec.counts(); n != 2 {
		t.Fatalf("the first snapshot made %d OnChange calls, want 2", n)
	}
	if m.LastEventID() == "" {
		t.Fatal("no last event id after the live marker")
	}

	if _, err := a.Set(ctx, typ, "z", "3"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Delete(ctx, typ, "x"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Set(ctx, typ, "brief", "gone soon", podcache.TTL(time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Set(ctx, typ+1, "elsewhere", "not mirrored"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() string {
		if _, ok := m.Get("brief"); !ok {
			return "the TTL entry has not arrived"
		}
		return sameAs(ctx, m, typ, a, b)
	})
	// The expiry sends no event: the mirror drops the entry by its clock.
	eventually(t, 5*time.Second, func() string {
		if _, ok := m.Get("brief"); ok {
			return "the entry outlived its TTL"
		}
		return sameAs(ctx, m, typ, a)
	})
	stopped := 0
	m.Range(func(k, v string) bool {
		stopped++
		return false
	})
	if stopped != 1 {
		t.Fatalf("Range went on after false (%d calls)", stopped)
	}
	rec.mu.Lock()
	last := rec.changes[len(rec.changes)-1]
	deletes := 0
	for _, c := range rec.changes {
		if c.Deleted && c.Key == "x" && c.Origin == podcache.OriginPeer {
			deletes++
		}
	}
	rec.mu.Unlock()
	if deletes != 1 || last.Key != "brief" {
		t.Fatalf("OnChange saw %d deletes of x, the last change is %+v", deletes, last)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if v, ok := m.Get("z"); !ok || v != "3" {
		t.Fatal("a closed mirror forgot its state")
	}

	// A mirror of a node that is down waits, and reports why.
	var down recorder
	nodes[0].Kill()
	m2 := a.Mirror(typ, down.options())
	defer m2.Close()
	eventually(t, 10*time.Second, func() string {
		if _, errs := down.counts(); errs < 2 {
			return "no retries reported"
		}
		return ""
	})
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := m2.WaitReady(short); err != context.DeadlineExceeded {
		t.Fatalf("a mirror of a dead node is ready: %v", err)
	}
	m2.Close()
	if err := m2.WaitReady(ctx); err != podcache.ErrClosed {
		t.Fatalf("WaitReady of a closed mirror: %v", err)
	}
}

// writer writes through the given nodes until stopped: sets, deletes and
// batches over a small set of keys, so that a mirror which misses a delete
// or keeps a stale value ends different.
type writer struct {
	writes int64
	stop   chan struct{}
	done   chan struct{}
}

func startWriter(t *testing.T, typ int32, through ...*podcache.Client) *writer {
	w := &writer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		rng := rand.New(rand.NewSource(1))
		ctx := context.Background()
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			c := through[i%len(through)]
			key := fmt.Sprintf("k%02d", rng.Intn(40))
			var err error
			switch r := rng.Intn(20); {
			case r < 11:
				_, err = c.Set(ctx, typ, key, fmt.Sprintf("v%d", i))
			case r < 16:
				if _, err = c.Delete(ctx, typ, key); podcache.IsNotFound(err) {
					err = nil
				}
			default:
				_, err = c.SetBatch(ctx, typ, map[string]string{
					key: fmt.Sprintf("b%d", i), key + "/b": fmt.Sprintf("b%d", i),
				})
			}
			if err != nil {
				t.Errorf("write %d through %s: %v", i, c.URL(), err)
				return
			}
			atomic.AddInt64(&w.writes, 1)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return w
}

// waitWrites waits until n more writes are done.
func (w *writer) waitWrites(t *testing.T, n int64) {
	t.Helper()
	target := atomic.LoadInt64(&w.writes) + n
	eventually(t, 30*time.Second, func() string {
		if got := atomic.LoadInt64(&w.writes); got < target {
			return fmt.Sprintf("%d writes of %d", got, target)
		}
		return ""
	})
}

func (w *writer) finish() {
	close(w.stop)
	<-w.done
}

func TestMirrorSurvivesItsNodeKilledAndRestarted(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 3)
	a, b, c := client(t, nodes[0]), client(t, nodes[1]), client(t, nodes[2])
	ctx := bg(t)
	const typ = 31

	w := startWriter(t, typ, a, c)
	defer func() {
		select {
		case <-w.stop:
		default:
			w.finish()
		}
	}()
	w.waitWrites(t, 50)
	var rec recorder
	m := b.Mirror(typ, rec.options())
	defer m.Close()
	if err := m.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	// Keys the writer does not touch: deleted and changed while the
	// mirror's node is down, left alone after it returns.
	marks := map[string]string{}
	for i := 0; i < 10; i++ {
		marks[fmt.Sprintf("gone/%d", i)] = "here"
		marks[fmt.Sprintf("changed/%d", i)] = "old"
	}
	if _, err := a.SetBatch(ctx, typ, marks, podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() string {
		if v, _ := m.Get("changed/9"); v != "old" {
			return "the marks have not reached the mirror"
		}
		return ""
	})
	w.waitWrites(t, 100)
	before := m.LastEventID()

	nodes[1].Kill() // SIGKILL: no goodbye on the stream
	for i := 0; i < 10; i++ {
		if _, err := c.Delete(ctx, typ, fmt.Sprintf("gone/%d", i)); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Set(ctx, typ, fmt.Sprintf("changed/%d", i), "new"); err != nil {
			t.Fatal(err)
		}
	}
	w.waitWrites(t, 150)
	if len(m.Snapshot()) == 0 {
		t.Fatal("the mirror lost its state when its node died")
	}
	nodes[1].Restart()
	// A new incarnation has a new node id: the mirror was reset onto it.
	eventually(t, 20*time.Second, func() string {
		id := m.LastEventID()
		if strings.SplitN(id, "-", 2)[0] == strings.SplitN(before, "-", 2)[0] {
			return "the mirror still follows the old incarnation: " + id
		}
		return ""
	})
	w.waitWrites(t, 150)
	w.finish()
	if t.Failed() {
		t.FailNow()
	}

	eventually(t, 20*time.Second, func() string { return sameAs(ctx, m, typ, a, b, c) })
	if _, ok := m.Get("gone/3"); ok {
		t.Fatal("the mirror kept a key deleted while its node was down")
	}
	if v, _ := m.Get("changed/3"); v != "new" {
		t.Fatalf("the mirror holds %q for a key changed while its node was down", v)
	}
	if _, errs := rec.counts(); errs == 0 {
		t.Fatal("the mirror reported no lost connection")
	}
	t.Logf("%d writes; mirror at %s", atomic.LoadInt64(&w.writes), m.LastEventID())
}

// A connection that breaks while the node stays up is resumed from the
// last event id: the missed changes are replayed, no reset, no snapshot.
func TestMirrorResumesAfterABrokenConnection(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 1)
	direct := client(t, nodes[0])
	ctx := bg(t)
	const typ = 41
	target, _ := url.Parse(nodes[0].URL)
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1
	var down int32
	var resumes int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if atomic.LoadInt32(&down) == 1 {
			http.Error(w, "down for the test", http.StatusBadGateway)
			return
		}
		if r.Header.Get("Last-Event-ID") != "" {
			atomic.AddInt32(&resumes, 1)
		}
		proxy.ServeHTTP(w, r)
	}))
	defer srv.Close()
	viaProxy, err := podcache.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Set(ctx, typ, "before", "1"); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	opts := rec.options()
	opts.MinBackoff, opts.MaxBackoff = 10*time.Millisecond, 50*time.Millisecond
	m := viaProxy.Mirror(typ, opts)
	defer m.Close()
	if err := m.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	changesBefore, _ := rec.counts()

	atomic.StoreInt32(&down, 1)
	srv.CloseClientConnections()
	eventually(t, 10*time.Second, func() string {
		if _, errs := rec.counts(); errs < 2 {
			return "the mirror has not noticed the broken connection"
		}
		return ""
	})
	if _, err := direct.Set(ctx, typ, "during", "2"); err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Delete(ctx, typ, "before"); err != nil {
		t.Fatal(err)
	}
	if v, ok := m.Get("before"); !ok || v != "1" {
		t.Fatal("the mirror stopped serving its state while disconnected")
	}
	atomic.StoreInt32(&down, 0)
	eventually(t, 10*time.Second, func() string { return sameAs(ctx, m, typ, direct) })
	if atomic.LoadInt32(&resumes) == 0 {
		t.Fatal("the mirror did not send Last-Event-ID")
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for _, c := range rec.changes[changesBefore:] {
		if c.Origin == podcache.OriginSnapshot {
			t.Fatalf("the mirror took a snapshot instead of resuming: %+v", c)
		}
	}
	if got := len(rec.changes) - changesBefore; got != 2 {
		t.Fatalf("%d changes after the resume, want 2", got)
	}
}
