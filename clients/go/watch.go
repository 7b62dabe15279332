package podcache

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Event names of a watch stream.
const (
	// KindChange: an entry was written or deleted (or, with origin
	// OriginSnapshot, is an entry of the current state).
	KindChange = "change"
	// KindReset: the node could not resume the stream (another node's or
	// a too old Last-Event-ID, or a watcher that fell behind); the whole
	// current state follows, then a KindLive marker.
	KindReset = "reset"
	// KindLive: the current state has been sent; what follows is every
	// change after it.
	KindLive = "live"
	// KindBatch: a batch write (SetBatch, WriteBatch), delivered whole as
	// one event: every entry it set or deleted on the node. Snapshots
	// never hold one (their entries are KindChange events).
	KindBatch = "batch"
)

// Origins of a change or batch event: how it reached the watched node.
const (
	OriginLocal     = "local"     // written through this node's REST API
	OriginPeer      = "peer"      // received from a peer (or repaired by anti-entropy)
	OriginBootstrap = "bootstrap" // pulled while the node bootstrapped
	OriginSnapshot  = "snapshot"  // an entry of the current state after ?snapshot=true or a reset
)

// Event is one Server-Sent Event of GET /v1/watch/{type}.
type Event struct {
	// Kind is the SSE event name: KindChange, KindBatch, KindReset,
	// KindLive, or a name this client does not know (then only Data is
	// set).
	Kind string
	// ID is the event's own SSE id, to resume after it. A snapshot's
	// entries and its reset have the snapshot's id (ending "-snapshot"):
	// resuming from one starts over with a reset.
	ID string
	// Data is the event's JSON.
	Data []byte
	// Change is set for KindChange.
	Change *Change
	// Batch is set for KindBatch.
	Batch *Batch
	// Reset is set for KindReset.
	Reset *Reset
	// Live is set for KindLive.
	Live *Live
}

// Change is the data of a change event.
type Change struct {
	Type int32
	Key  string
	// Value is the new value; empty when Deleted.
	Value   string
	Version string
	// Deleted is true for a delete (the value is null on the wire).
	Deleted bool
	// Origin is one of the Origin* constants.
	Origin string
	// ExpiresAtMs is the entry's expiry (Unix ms), 0 without a TTL. No
	// event marks the expiry itself: a reader drops the entry at that time.
	ExpiresAtMs int64
	// Author is who wrote (or deleted) the entry, as in Entry.Author.
	Author string
	// OriginPod is the pod name of the replica that took the write (what
	// Entry.Origin says; Origin above says how it reached this node).
	OriginPod string
	// Reason is the writer's reason, empty when none was given.
	Reason string
	// WrittenAt is when the write was taken; zero when the node did not
	// say.
	WrittenAt time.Time
}

// Batch is the data of a batch event: one batch write, whole. Every entry
// shares its version; Entries lists what it changed on the watched node
// (entries the node already held newer are left out; with
// WatchOptions.Key, only that key's entry). Each entry is a Change with
// the batch's Type, Origin, Author, OriginPod, Reason and WrittenAt.
type Batch struct {
	Type    int32
	Version string
	// Origin is OriginLocal, OriginPeer or OriginBootstrap.
	Origin    string
	Author    string
	OriginPod string
	Reason    string
	WrittenAt time.Time
	// Entries holds the entries set (Deleted false) and deleted.
	Entries []Change
}

// Reset is the data of a reset event.
type Reset struct {
	Type   int32  `json:"type"`
	Reason string `json:"reason"`
}

// Live is the data of a live event.
type Live struct {
	Type int32 `json:"type"`
	// Entries is the number of snapshot entries that preceded it.
	Entries int `json:"entries"`
}

// WatchOptions select what a watch stream starts with.
type WatchOptions struct {
	// Key, if set, restricts the stream to that one key.
	Key string
	// Snapshot starts the stream with every current entry (change events
	// with origin OriginSnapshot, no id) and a KindLive marker.
	Snapshot bool
	// LastEventID resumes right after that event (sent as the
	// Last-Event-ID header). When the node cannot, the stream starts with
	// a KindReset event and the current state.
	LastEventID string
	// IdleTimeout, if positive, ends the stream with an error when the
	// node sends nothing, not even its keep-alive comments (every 15s),
	// for that long: how a connection lost without a FIN is noticed.
	IdleTimeout time.Duration
}

// Stream is an open watch stream. Next is meant for one goroutine; Close
// may be called from any.
type Stream struct {
	body   io.ReadCloser
	r      *bufio.Reader
	cancel context.CancelFunc
	idle   *idleReader
	once   sync.Once
}

// Watch opens the change stream of type typ. It returns once the node has
// answered; read the events with Next and end with Close.
func (c *Client) Watch(ctx context.Context, typ int32, opts WatchOptions) (*Stream, error) {
	q := url.Values{}
	if opts.Key != "" {
		q.Set("key", opts.Key)
	}
	if opts.Snapshot {
		q.Set("snapshot", "true")
	}
	header := http.Header{"Accept": {"text/event-stream"}}
	if opts.LastEventID != "" {
		header.Set("Last-Event-ID", opts.LastEventID)
	}
	ctx, cancel := context.WithCancel(ctx)
	target := c.url(q, "v1", "watch", strconv.FormatInt(int64(typ), 10))
	resp, err := c.send(ctx, http.MethodGet, target, nil, header)
	if err != nil {
		cancel()
		return nil, err
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("podcache: the watch answered %q, not text/event-stream", ct)
	}
	s := &Stream{body: resp.Body, cancel: cancel}
	var r io.Reader = resp.Body
	if opts.IdleTimeout > 0 {
		s.idle = &idleReader{r: resp.Body, d: opts.IdleTimeout}
		s.idle.t = time.AfterFunc(opts.IdleTimeout, func() {
			atomic.StoreInt32(&s.idle.fired, 1)
			cancel()
		})
		r = s.idle
	}
	s.r = bufio.NewReaderSize(r, 64<<10)
	return s, nil
}

// Next returns the next event. It returns io.EOF when the node ends the
// stream (it is shutting down) and another error when the connection
// breaks or the stream is closed; either way, open a new one (with the
// last ID seen as LastEventID to resume).
func (s *Stream) Next() (Event, error) {
	ev, err := s.next()
	if err != nil && s.idle != nil && atomic.LoadInt32(&s.idle.fired) == 1 {
		err = fmt.Errorf("podcache: the watch stream was silent for %v", s.idle.d)
	}
	return ev, err
}

func (s *Stream) next() (Event, error) {
	var (
		kind, id string
		data     []string
	)
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			// An event cut short by the end of the stream is dropped, as
			// the SSE specification says.
			if err == io.EOF {
				return Event{}, io.EOF
			}
			return Event{}, fmt.Errorf("podcache: reading the watch stream: %w", err)
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			if data == nil {
				kind, id = "", ""
				continue
			}
			return decodeEvent(kind, id, strings.Join(data, "\n"))
		}
		if strings.HasPrefix(line, ":") {
			continue // a comment: the node's keep-alive
		}
		field, value := line, ""
		if i := strings.IndexByte(line, ':'); i >= 0 {
			field, value = line[:i], strings.TrimPrefix(line[i+1:], " ")
		}
		switch field {
		case "event":
			kind = value
		case "data":
			data = append(data, value)
		case "id":
			if !strings.ContainsRune(value, 0) {
				id = value
			}
		}
	}
}

func decodeEvent(kind, id, data string) (Event, error) {
	if kind == "" {
		kind = "message"
	}
	ev := Event{Kind: kind, ID: id, Data: []byte(data)}
	var err error
	switch kind {
	case KindChange:
		var c struct {
			wireEntry
			wireWho
			Type   int32  `json:"type"`
			Origin string `json:"origin"`
		}
		if err = json.Unmarshal(ev.Data, &c); err == nil {
			ch := c.wireEntry.change(c.Type, c.Origin, c.wireWho)
			ev.Change = &ch
		}
	case KindBatch:
		var b struct {
			wireWho
			Type    int32       `json:"type"`
			Version string      `json:"version"`
			Origin  string      `json:"origin"`
			Entries []wireEntry `json:"entries"`
		}
		if err = json.Unmarshal(ev.Data, &b); err == nil {
			ev.Batch = &Batch{Type: b.Type, Version: b.Version, Origin: b.Origin, Author: b.Author,
				OriginPod: b.OriginPod, Reason: b.Reason, WrittenAt: b.WrittenAt,
				Entries: make([]Change, len(b.Entries))}
			for i, e := range b.Entries {
				if e.Version == "" {
					e.Version = b.Version
				}
				ev.Batch.Entries[i] = e.change(b.Type, b.Origin, b.wireWho)
			}
		}
	case KindReset:
		ev.Reset = new(Reset)
		err = json.Unmarshal(ev.Data, ev.Reset)
	case KindLive:
		ev.Live = new(Live)
		err = json.Unmarshal(ev.Data, ev.Live)
	}
	if err != nil {
		return Event{}, fmt.Errorf("podcache: a %s event with bad data %q: %w", kind, data, err)
	}
	return ev, nil
}

// wireEntry is an entry of a change or batch event on the wire.
type wireEntry struct {
	Key         string  `json:"key"`
	Value       *string `json:"value"`
	Version     string  `json:"version"`
	Deleted     bool    `json:"deleted"`
	ExpiresAtMs int64   `json:"expires_at_ms"`
}

// wireWho is who wrote a change or batch, on the wire.
type wireWho struct {
	Author    string    `json:"author"`
	OriginPod string    `json:"origin_pod"`
	Reason    string    `json:"reason"`
	WrittenAt time.Time `json:"written_at"`
}

func (e wireEntry) change(typ int32, origin string, who wireWho) Change {
	c := Change{Type: typ, Key: e.Key, Version: e.Version, Deleted: e.Deleted || e.Value == nil,
		Origin: origin, ExpiresAtMs: e.ExpiresAtMs, Author: who.Author, OriginPod: who.OriginPod,
		Reason: who.Reason, WrittenAt: who.WrittenAt}
	if e.Value != nil && !c.Deleted {
		c.Value = *e.Value
	}
	return c
}

// Close ends the stream.
func (s *Stream) Close() error {
	s.once.Do(func() {
		if s.idle != nil {
			s.idle.t.Stop()
		}
		s.cancel()
		s.body.Close()
	})
	return nil
}

// idleReader pushes a timer back on every read that returns data.
type idleReader struct {
	r     io.Reader
	d     time.Duration
	t     *time.Timer
	fired int32
}

func (i *idleReader) Read(p []byte) (int, error) {
	n, err := i.r.Read(p)
	if n > 0 {
		i.t.Reset(i.d)
	}
	return n, err
}
