package podcache

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Entry is one entry of a type, as a read or a write answers it.
type Entry struct {
	Type  int32  `json:"type"`
	Key   string `json:"key"`
	Value string `json:"value"`
	// Version is "<wall ms>.<logical>@<node id>"; per key, the highest
	// version wins on every replica.
	Version string `json:"version"`
	// ExpiresAtMs is the Unix time in milliseconds at which the entry
	// expires on every replica, 0 without a TTL.
	ExpiresAtMs int64 `json:"expires_at_ms,omitempty"`
	// Deleted is true only in the answer of a Rollback to a deletion: the
	// rollback wrote a tombstone, and Value is empty.
	Deleted bool `json:"deleted,omitempty"`
	// Author is who wrote the entry: the name of the REST token (or
	// "token:" and a short fingerprint of an unnamed one), the subject of
	// the client certificate, "anonymous" on an open port, "sync" for a
	// write through the original hellorpc.Sync service, "import" for
	// `podcache ctl import`. Empty for an entry written by a podcache
	// version that did not record it.
	Author string `json:"author"`
	// Origin is the pod name of the replica that took the write (empty
	// like Author for older entries). Not to be confused with
	// Change.Origin, which says how a change reached the watched node.
	Origin string `json:"origin"`
	// Reason is the writer's reason (see the Reason write option), empty
	// when none was given.
	Reason string `json:"reason"`
	// WrittenAt is when the write was taken (the wall-clock part of its
	// version, in milliseconds, UTC); zero when the node did not say.
	WrittenAt time.Time `json:"written_at"`
	// Replication is the delivery report of a write made with WaitAll.
	Replication DeliveryReport `json:"replication,omitempty"`
}

// Deletion is the answer to a Delete.
type Deletion struct {
	Type int32  `json:"type"`
	Key  string `json:"key"`
	// Version is the tombstone's version.
	Version string `json:"version"`
	// Author, Origin, Reason and WrittenAt say who deleted the entry,
	// through which replica, why and when, as for an Entry.
	Author    string    `json:"author"`
	Origin    string    `json:"origin"`
	Reason    string    `json:"reason"`
	WrittenAt time.Time `json:"written_at"`
	// Replication is the delivery report of a delete made with WaitAll.
	Replication DeliveryReport `json:"replication,omitempty"`
}

// BatchResult is the answer to a SetBatch or WriteBatch.
type BatchResult struct {
	Type int32 `json:"type"`
	// Count is the number of entries written, deletions included.
	Count int `json:"count"`
	// Versions holds the version each key was written (or deleted) with:
	// one version, shared by every entry of the batch.
	Versions map[string]string `json:"versions"`
	// Replication is the delivery report of a batch made with WaitAll.
	Replication DeliveryReport `json:"replication,omitempty"`
}

// Delivery statuses of a DeliveryReport.
const (
	// DeliveryAcked: the peer holds this version of the key or a newer one.
	DeliveryAcked = "acked"
	// DeliveryTimeout: the peer had not acknowledged within the node's
	// --wait-timeout; the write is still being sent to it.
	DeliveryTimeout = "timeout"
	// DeliveryPeerDown: the peer was down past --down-peer-retention and
	// released; anti-entropy repairs it when it returns.
	DeliveryPeerDown = "dropped_peer_down"
	// DeliveryPeerLeft: the peer left the membership.
	DeliveryPeerLeft = "peer_left"
)

// Delivery says what one peer did with a write.
type Delivery struct {
	// Peer is the peer's gRPC address.
	Peer string `json:"peer"`
	// Name is the peer's pod name.
	Name string `json:"name"`
	// Status is one of the Delivery* constants.
	Status string `json:"status"`
	// Error is the last error talking to the peer, if any.
	Error string `json:"error,omitempty"`
}

// DeliveryReport is what each peer known to the node at the moment of a
// write did with it (only for writes made with WaitAll).
type DeliveryReport []Delivery

// AllAcked reports whether every peer acknowledged (true when the node had
// no peer).
func (r DeliveryReport) AllAcked() bool {
	for _, d := range r {
		if d.Status != DeliveryAcked {
			return false
		}
	}
	return true
}

// A WriteOption modifies a write: Set, SetBatch, WriteBatch, Delete or
// Rollback.
type WriteOption func(url.Values)

// WaitAll makes the write answer only once every peer the node knows has
// acknowledged it, or after the node's --wait-timeout; the answer's
// Replication says what each peer did.
func WaitAll() WriteOption {
	return func(q url.Values) { q.Set("wait", "all") }
}

// TTL makes the written entries expire after d on every replica at the
// same moment. d is rounded up to whole seconds (the node's unit). Not
// valid on Delete.
func TTL(d time.Duration) WriteOption {
	secs := int64(math.Ceil(d.Seconds()))
	return func(q url.Values) { q.Set("ttl", strconv.FormatInt(secs, 10)) }
}

// ReasonHeader is the request header that carries a write's reason.
const ReasonHeader = "X-Podcache-Reason"

// reasonParam carries Reason's text through a WriteOption's url.Values;
// writeRequest takes it out again and sends it as ReasonHeader. The NUL
// byte keeps it apart from any real query parameter.
const reasonParam = "\x00reason"

// Reason records why the write is made: it travels with the written
// entries (or tombstones) to every replica and is read back as their
// Reason, in watch events and in History. It is sent as the
// X-Podcache-Reason header: UTF-8, at most 256 bytes (the node answers a
// longer one with 400 "invalid_reason"), no line breaks or other control
// characters; surrounding white space is dropped, as HTTP does for any
// header. An empty reason sends none.
func Reason(reason string) WriteOption {
	return func(q url.Values) { q.Set(reasonParam, reason) }
}

// writeRequest turns write options into the query and headers of the
// request.
func writeRequest(opts []WriteOption) (url.Values, http.Header, error) {
	q := url.Values{}
	for _, opt := range opts {
		opt(q)
	}
	header := http.Header{}
	for param, name := range map[string]string{ifMatchParam: "If-Match", ifNoneMatchParam: "If-None-Match"} {
		if values, ok := q[param]; ok {
			delete(q, param)
			header.Set(name, values[0])
		}
	}
	if reasons, ok := q[reasonParam]; ok {
		delete(q, reasonParam)
		reason := strings.Trim(reasons[0], " \t")
		for _, r := range reason {
			if (r < 0x20 && r != '\t') || r == 0x7f {
				return nil, nil, fmt.Errorf("podcache: the reason %q holds a control character", reason)
			}
		}
		if reason != "" {
			header.Set(ReasonHeader, reason)
		}
	}
	return q, header, nil
}

// Get reads one entry from the node's replica. An absent (or expired)
// entry is an *Error with StatusCode 404: see IsNotFound.
func (c *Client) Get(ctx context.Context, typ int32, key string) (*Entry, error) {
	var e Entry
	if err := c.call(ctx, http.MethodGet, c.url(nil, cachePath(typ, key)...), nil, "", &e); err != nil {
		return nil, err
	}
	return &e, nil
}

// write sends a write with its options and decodes the answer into out.
func (c *Client) write(ctx context.Context, method string, path []string, body io.Reader, contentType string, opts []WriteOption, extra url.Values, out interface{}) error {
	q, header, err := writeRequest(opts)
	if err != nil {
		return err
	}
	for k, v := range extra {
		q[k] = v
	}
	if contentType != "" {
		header.Set("Content-Type", contentType)
	}
	return c.callWith(ctx, method, c.url(q, path...), body, header, out)
}

// Set writes one entry; the node applies it and sends it to every peer.
func (c *Client) Set(ctx context.Context, typ int32, key, value string, opts ...WriteOption) (*Entry, error) {
	var e Entry
	err := c.write(ctx, http.MethodPut, cachePath(typ, key), strings.NewReader(value), "text/plain; charset=utf-8", opts, nil, &e)
	if err != nil {
		return nil, err
	}
	return &e, nil
}

// Delete deletes one entry everywhere (a versioned tombstone). An absent
// entry is an *Error with StatusCode 404.
func (c *Client) Delete(ctx context.Context, typ int32, key string, opts ...WriteOption) (*Deletion, error) {
	var d Deletion
	if err := c.write(ctx, http.MethodDelete, cachePath(typ, key), nil, "", opts, nil, &d); err != nil {
		return nil, err
	}
	return &d, nil
}

// List returns the whole type as the node's replica holds it.
func (c *Client) List(ctx context.Context, typ int32) (map[string]string, error) {
	var body struct {
		Entries map[string]string `json:"entries"`
	}
	if err := c.call(ctx, http.MethodGet, c.url(nil, cachePath(typ)...), nil, "", &body); err != nil {
		return nil, err
	}
	if body.Entries == nil {
		body.Entries = map[string]string{}
	}
	return body.Entries, nil
}

// SetBatch writes every entry of entries at once (all or nothing); an empty
// batch is refused by the node (400 "empty_batch"). It is WriteBatch
// without deletions.
func (c *Client) SetBatch(ctx context.Context, typ int32, entries map[string]string, opts ...WriteOption) (*BatchResult, error) {
	return c.WriteBatch(ctx, typ, BatchWrite{Set: entries}, opts...)
}

// BatchWrite is what one WriteBatch sets and deletes.
type BatchWrite struct {
	// Set maps keys to their new values.
	Set map[string]string
	// Delete lists keys to delete (each becomes a tombstone, as with
	// Delete; a key the node does not hold is no error).
	Delete []string
}

// WriteBatch sets and deletes the keys of b at once, as one change: all
// or nothing, one version shared by every entry, applied whole on every
// replica and delivered to watchers as one KindBatch event (a Mirror
// applies it at once). A key both set and deleted is an error, and an
// empty batch is refused by the node (400 "empty_batch"); the node's
// --max-batch-entries bounds its size. TTL applies to the set entries.
func (c *Client) WriteBatch(ctx context.Context, typ int32, b BatchWrite, opts ...WriteOption) (*BatchResult, error) {
	entries := make(map[string]*string, len(b.Set)+len(b.Delete))
	for k, v := range b.Set {
		v := v
		entries[k] = &v
	}
	for _, k := range b.Delete {
		if _, ok := b.Set[k]; ok {
			return nil, fmt.Errorf("podcache: the batch both sets and deletes %q", k)
		}
		entries[k] = nil
	}
	body, err := json.Marshal(entries)
	if err != nil {
		return nil, fmt.Errorf("podcache: %w", err)
	}
	var r BatchResult
	if err := c.write(ctx, http.MethodPost, cachePath(typ), bytes.NewReader(body), "application/json", opts, nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// HistoryEntry is one version of a key in the node's history: a value, or
// a deletion, with who wrote it, through which replica, why and when.
type HistoryEntry struct {
	Version string
	// Value is the value of this version; empty when Deleted.
	Value string
	// Deleted is true for a deletion (a tombstone).
	Deleted bool
	// ExpiresAtMs is the version's expiry (Unix ms), 0 without a TTL or
	// when the node does not say.
	ExpiresAtMs int64
	// Author, Origin, Reason and WrittenAt are as in Entry.
	Author    string
	Origin    string
	Reason    string
	WrittenAt time.Time
}

// History returns the versions of key that the node keeps, newest first:
// the first is the current entry (also when it is a deletion or has
// expired). How many the node keeps is bounded by its --history-versions
// and --history-max-bytes. A key the node holds no trace of is an *Error
// with StatusCode 404 ("not_found").
func (c *Client) History(ctx context.Context, typ int32, key string) ([]HistoryEntry, error) {
	var body struct {
		Versions []struct {
			Version     string    `json:"version"`
			Value       *string   `json:"value"`
			Deleted     bool      `json:"deleted"`
			ExpiresAtMs int64     `json:"expires_at_ms"`
			Author      string    `json:"author"`
			Origin      string    `json:"origin"`
			Reason      string    `json:"reason"`
			WrittenAt   time.Time `json:"written_at"`
		} `json:"versions"`
	}
	target := c.url(nil, append(cachePath(typ, key), "history")...)
	if err := c.call(ctx, http.MethodGet, target, nil, "", &body); err != nil {
		return nil, err
	}
	versions := make([]HistoryEntry, len(body.Versions))
	for i, v := range body.Versions {
		versions[i] = HistoryEntry{Version: v.Version, Deleted: v.Deleted || v.Value == nil,
			ExpiresAtMs: v.ExpiresAtMs, Author: v.Author, Origin: v.Origin, Reason: v.Reason, WrittenAt: v.WrittenAt}
		if v.Value != nil {
			versions[i].Value = *v.Value
		}
	}
	return versions, nil
}

// Rollback writes the value (or the deletion) that key had at version, one
// of its History, again as a new version: every replica converges on it as
// on any write, and it records its own author and reason (give one with
// Reason). WaitAll applies. The answer is the written entry; when version
// was a deletion, its Deleted is set. A version the node's history does
// not hold is an *Error with StatusCode 404 and Code "version_not_found".
func (c *Client) Rollback(ctx context.Context, typ int32, key, version string, opts ...WriteOption) (*Entry, error) {
	var e Entry
	path := append(cachePath(typ, key), "rollback")
	if err := c.write(ctx, http.MethodPost, path, nil, "", opts, url.Values{"version": {version}}, &e); err != nil {
		return nil, err
	}
	return &e, nil
}
