package podcache

import (
	"context"
	"errors"
	"math/rand"
	"sync"
	"time"
)

// ErrClosed is returned by WaitReady once the Mirror is closed.
var ErrClosed = errors.New("podcache: the mirror is closed")

// MirrorOptions tune a Mirror. The zero value is fine.
type MirrorOptions struct {
	// OnChange, if set, is called after every change the mirror applies,
	// in order, from the mirror's goroutine (so it must not block for
	// long). The first snapshot calls it once per entry; a snapshot after
	// a reset calls it for what differs from the state held before, with
	// origin OriginSnapshot (deletions with Deleted set). An entry's
	// expiry is not reported: the node sends no event for it, and the
	// mirror's reads skip the entry from its ExpiresAtMs on.
	//
	// The entries of a batch write are applied together, before any
	// callback about them: with OnBatch set they go to OnBatch; without,
	// to OnChange one by one, each call seeing the whole batch in the
	// mirror already.
	OnChange func(Change)
	// OnBatch, if set, is called once for every batch write (SetBatch,
	// WriteBatch: a KindBatch event) the mirror applies, with all of its
	// entries, after the whole batch is in the mirror, in order with the
	// OnChange calls and from the same goroutine. A batch event that
	// changed nothing on the node is not reported.
	OnBatch func(Batch)
	// OnError, if set, is called with the reason of every lost or refused
	// connection, before the mirror retries.
	OnError func(error)
	// MinBackoff and MaxBackoff bound the pause between reconnections
	// (doubling from the first to the second, with jitter; back to the
	// first after a stream that delivered events). Defaults 100ms and 5s.
	MinBackoff, MaxBackoff time.Duration
	// IdleTimeout ends a connection on which nothing arrived, not even
	// the node's keep-alive comments, for that long. Default 45s.
	IdleTimeout time.Duration
}

// Mirror keeps one type of a node in memory and follows its changes: it
// opens the node's watch stream with ?snapshot=true, takes the snapshot,
// then applies every change. When the connection is lost it reconnects by
// itself and resumes after the last event it saw; when the node cannot
// resume (it restarted, or the mirror was away too long) the node sends a
// reset and its whole state, which replaces the mirror's at once.
//
// Reads never block on the network: they answer from memory, the last
// state received. A batch write is applied at once, under one lock: each
// of Get, GetMany, Range and Snapshot sees the whole of it or none of it
// (two Get calls may fall on either side of one; read the keys that belong
// together with one GetMany). It is safe for concurrent use.
type Mirror struct {
	client *Client
	typ    int32
	opts   MirrorOptions
	cancel context.CancelFunc
	done   chan struct{}
	ready  chan struct{}

	mu      sync.RWMutex
	entries map[string]mirrorEntry
	lastID  string
	// swept is when expired entries were last dropped from entries (only
	// the mirror's goroutine uses it).
	swept time.Time
}

// sweepEvery is how often expired entries are dropped from memory (reads
// skip them from their expiry on).
const sweepEvery = 30 * time.Second

type mirrorEntry struct {
	value     string
	version   string
	expiresAt int64 // Unix ms, 0 for never
	who       who
}

// who is who wrote an entry, kept to report it in OnChange after a reset.
type who struct {
	author, originPod, reason string
	writtenAt                 time.Time
}

func entryOf(c Change) mirrorEntry {
	return mirrorEntry{c.Value, c.Version, c.ExpiresAtMs, who{c.Author, c.OriginPod, c.Reason, c.WrittenAt}}
}

// same reports whether two entries hold the same version of the same value.
func (e mirrorEntry) same(o mirrorEntry) bool {
	return e.value == o.value && e.version == o.version && e.expiresAt == o.expiresAt
}

func (e mirrorEntry) live(nowMs int64) bool { return e.expiresAt == 0 || e.expiresAt > nowMs }

// Mirror starts a Mirror of type typ (opts may be nil). Close it when done.
func (c *Client) Mirror(typ int32, opts *MirrorOptions) *Mirror {
	m := &Mirror{
		client:  c,
		typ:     typ,
		done:    make(chan struct{}),
		ready:   make(chan struct{}),
		entries: map[string]mirrorEntry{},
	}
	if opts != nil {
		m.opts = *opts
	}
	if m.opts.MinBackoff <= 0 {
		m.opts.MinBackoff = 100 * time.Millisecond
	}
	if m.opts.MaxBackoff <= 0 {
		m.opts.MaxBackoff = 5 * time.Second
	}
	if m.opts.MaxBackoff < m.opts.MinBackoff {
		m.opts.MaxBackoff = m.opts.MinBackoff
	}
	if m.opts.IdleTimeout <= 0 {
		m.opts.IdleTimeout = 45 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	go m.run(ctx)
	return m
}

// Get returns the value of key, if the mirror holds it (and it has not
// expired by this machine's clock).
func (m *Mirror) Get(key string) (string, bool) {
	m.mu.RLock()
	e, ok := m.entries[key]
	m.mu.RUnlock()
	if !ok || !e.live(nowMs()) {
		return "", false
	}
	return e.value, true
}

// GetMany returns the values of the keys the mirror holds (and that have
// not expired), read under one lock: a batch write is in it whole or not
// at all.
func (m *Mirror) GetMany(keys ...string) map[string]string {
	now := nowMs()
	out := make(map[string]string, len(keys))
	m.mu.RLock()
	for _, k := range keys {
		if e, ok := m.entries[k]; ok && e.live(now) {
			out[k] = e.value
		}
	}
	m.mu.RUnlock()
	return out
}

// Range calls fn for every entry until fn returns false, in no particular
// order. It iterates over a copy taken at the call (under one lock), so fn
// may use the Mirror.
func (m *Mirror) Range(fn func(key, value string) bool) {
	now := nowMs()
	m.mu.RLock()
	pairs := make([][2]string, 0, len(m.entries))
	for k, e := range m.entries {
		if e.live(now) {
			pairs = append(pairs, [2]string{k, e.value})
		}
	}
	m.mu.RUnlock()
	for _, p := range pairs {
		if !fn(p[0], p[1]) {
			return
		}
	}
}

// Snapshot returns a copy of every entry.
func (m *Mirror) Snapshot() map[string]string {
	out := map[string]string{}
	m.Range(func(k, v string) bool {
		out[k] = v
		return true
	})
	return out
}

// Ready is closed once the mirror holds its first complete snapshot. It
// stays closed: after that, the mirror serves the last state it received,
// also while it reconnects.
func (m *Mirror) Ready() <-chan struct{} { return m.ready }

// WaitReady waits until Ready is closed, ctx ends (its error) or the
// mirror is closed (ErrClosed).
func (m *Mirror) WaitReady(ctx context.Context) error {
	select {
	case <-m.ready:
		return nil
	default:
	}
	select {
	case <-m.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-m.done:
		return ErrClosed
	}
}

// LastEventID is the id of the last event applied: where a reconnection
// resumes.
func (m *Mirror) LastEventID() string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.lastID
}

// Close stops following the node and waits until the mirror's goroutine
// has returned (no OnChange call runs after it). Reads keep answering with
// the last state.
func (m *Mirror) Close() error {
	m.cancel()
	<-m.done
	return nil
}

func (m *Mirror) run(ctx context.Context) {
	defer close(m.done)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	backoff := m.opts.MinBackoff
	for {
		delivered, err := m.follow(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil && m.opts.OnError != nil {
			m.opts.OnError(err)
		}
		if delivered {
			backoff = m.opts.MinBackoff
		}
		// Sleep between half and all of the backoff, so that many mirrors
		// of one restarted node do not come back at the same instant.
		pause := backoff/2 + time.Duration(rng.Int63n(int64(backoff/2)+1))
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		if backoff *= 2; backoff > m.opts.MaxBackoff {
			backoff = m.opts.MaxBackoff
		}
	}
}

// follow runs one connection until it breaks. delivered says whether it
// applied any event (then the next retry starts from the shortest pause).
func (m *Mirror) follow(ctx context.Context) (delivered bool, err error) {
	// A node that is still bootstrapping would hand out a partial snapshot.
	if err := m.client.Ready(ctx); err != nil {
		return false, err
	}
	opts := WatchOptions{IdleTimeout: m.opts.IdleTimeout}
	// pending collects a snapshot until its live marker; nil while live.
	var pending map[string]mirrorEntry
	if opts.LastEventID = m.LastEventID(); opts.LastEventID == "" {
		opts.Snapshot = true
		pending = map[string]mirrorEntry{}
	}
	stream, err := m.client.Watch(ctx, m.typ, opts)
	if err != nil {
		return false, err
	}
	defer stream.Close()
	for {
		ev, err := stream.Next()
		if err != nil {
			// A snapshot cut short is dropped: the next connection resumes
			// from the last id, which precedes it.
			return delivered, err
		}
		delivered = true
		switch ev.Kind {
		case KindReset:
			pending = map[string]mirrorEntry{}
		case KindLive:
			if pending != nil {
				m.replace(pending, ev.ID)
				pending = nil
			}
			m.setLastID(ev.ID)
		case KindChange:
			c := ev.Change
			if pending != nil {
				applyTo(pending, *c)
				continue
			}
			m.apply([]Change{*c}, ev.ID)
			if m.opts.OnChange != nil {
				m.opts.OnChange(*c)
			}
		case KindBatch:
			b := ev.Batch
			if pending != nil {
				// Not sent inside a snapshot; kept whole if it were.
				for _, c := range b.Entries {
					applyTo(pending, c)
				}
				continue
			}
			m.apply(b.Entries, ev.ID)
			switch {
			case len(b.Entries) == 0:
			case m.opts.OnBatch != nil:
				m.opts.OnBatch(*b)
			case m.opts.OnChange != nil:
				for _, c := range b.Entries {
					m.opts.OnChange(c)
				}
			}
		}
	}
}

func (m *Mirror) setLastID(id string) {
	if id == "" {
		return
	}
	m.mu.Lock()
	m.lastID = id
	m.mu.Unlock()
}

func applyTo(entries map[string]mirrorEntry, c Change) {
	if c.Deleted {
		delete(entries, c.Key)
	} else {
		entries[c.Key] = entryOf(c)
	}
}

// apply applies the changes of one live event at once, under one lock.
func (m *Mirror) apply(changes []Change, id string) {
	m.mu.Lock()
	for _, c := range changes {
		applyTo(m.entries, c)
	}
	if id != "" {
		m.lastID = id
	}
	if time.Since(m.swept) > sweepEvery {
		m.swept = time.Now()
		now := nowMs()
		for k, e := range m.entries {
			if !e.live(now) {
				delete(m.entries, k)
			}
		}
	}
	m.mu.Unlock()
}

// replace swaps in a complete snapshot and reports what differs.
func (m *Mirror) replace(next map[string]mirrorEntry, id string) {
	var changes []Change
	m.mu.Lock()
	old := m.entries
	m.entries = next
	if id != "" {
		m.lastID = id
	}
	m.mu.Unlock()
	if m.opts.OnChange != nil {
		for k, e := range next {
			if o, ok := old[k]; !ok || !o.same(e) {
				changes = append(changes, Change{Type: m.typ, Key: k, Value: e.value,
					Version: e.version, Origin: OriginSnapshot, ExpiresAtMs: e.expiresAt,
					Author: e.who.author, OriginPod: e.who.originPod, Reason: e.who.reason,
					WrittenAt: e.who.writtenAt})
			}
		}
		for k := range old {
			if _, ok := next[k]; !ok {
				changes = append(changes, Change{Type: m.typ, Key: k, Deleted: true, Origin: OriginSnapshot})
			}
		}
		for _, c := range changes {
			m.opts.OnChange(c)
		}
	}
	select {
	case <-m.ready:
	default:
		close(m.ready)
	}
}

func nowMs() int64 { return time.Now().UnixNano() / int64(time.Millisecond) }
