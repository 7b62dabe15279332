package podcache

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
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
	// Replication is the delivery report of a write made with WaitAll.
	Replication DeliveryReport `json:"replication,omitempty"`
}

// Deletion is the answer to a Delete.
type Deletion struct {
	Type int32  `json:"type"`
	Key  string `json:"key"`
	// Version is the tombstone's version.
	Version string `json:"version"`
	// Replication is the delivery report of a delete made with WaitAll.
	Replication DeliveryReport `json:"replication,omitempty"`
}

// BatchResult is the answer to a SetBatch.
type BatchResult struct {
	Type  int32 `json:"type"`
	Count int   `json:"count"`
	// Versions holds the version each key was written with.
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

// A WriteOption modifies a Set, SetBatch or Delete.
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

func writeQuery(opts []WriteOption) url.Values {
	q := url.Values{}
	for _, opt := range opts {
		opt(q)
	}
	return q
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

// Set writes one entry; the node applies it and sends it to every peer.
func (c *Client) Set(ctx context.Context, typ int32, key, value string, opts ...WriteOption) (*Entry, error) {
	var e Entry
	target := c.url(writeQuery(opts), cachePath(typ, key)...)
	err := c.call(ctx, http.MethodPut, target, strings.NewReader(value), "text/plain; charset=utf-8", &e)
	if err != nil {
		return nil, err
	}
	return &e, nil
}

// Delete deletes one entry everywhere (a versioned tombstone). An absent
// entry is an *Error with StatusCode 404.
func (c *Client) Delete(ctx context.Context, typ int32, key string, opts ...WriteOption) (*Deletion, error) {
	var d Deletion
	if err := c.call(ctx, http.MethodDelete, c.url(writeQuery(opts), cachePath(typ, key)...), nil, "", &d); err != nil {
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
// batch is refused by the node (400 "empty_batch").
func (c *Client) SetBatch(ctx context.Context, typ int32, entries map[string]string, opts ...WriteOption) (*BatchResult, error) {
	if entries == nil {
		entries = map[string]string{}
	}
	body, err := json.Marshal(entries)
	if err != nil {
		return nil, fmt.Errorf("podcache: %w", err)
	}
	var r BatchResult
	target := c.url(writeQuery(opts), cachePath(typ)...)
	if err := c.call(ctx, http.MethodPost, target, bytes.NewReader(body), "application/json", &r); err != nil {
		return nil, err
	}
	return &r, nil
}
