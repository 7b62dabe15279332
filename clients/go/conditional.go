package podcache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

// Conditional writes (compare-and-set). A write with IfVersion or
// IfAbsent is decided by one replica, the decider, whichever replica the
// client talks to: of two writers that read the same version, exactly one
// wins, and the other gets an *Error with StatusCode 412 (see
// IsPreconditionFailed) naming the version the key holds now. A
// conditional write waits for every peer, as WaitAll does.

// Parameters that writeRequest turns into headers (see reasonParam).
const (
	ifMatchParam     = "\x00if-match"
	ifNoneMatchParam = "\x00if-none-match"
)

// IfVersion makes a write apply only while the entry is at exactly
// version (an Entry's Version, as Get or a write answered it).
func IfVersion(version string) WriteOption {
	return func(q url.Values) { q[ifMatchParam] = []string{`"` + version + `"`} }
}

// IfAbsent makes a write apply only while the key holds no value: it
// creates, never overwrites.
func IfAbsent() WriteOption {
	return func(q url.Values) { q[ifNoneMatchParam] = []string{"*"} }
}

// IsPreconditionFailed reports whether err is the node's 412: a
// conditional write whose expectation did not hold (nothing was written).
// The *Error's CurrentVersion names the version the key holds now.
func IsPreconditionFailed(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.StatusCode == http.StatusPreconditionFailed
}

// isRetryable reports whether a conditional write was refused with nothing
// written and may simply be tried again: no decider right now (a new one
// is being chosen).
func isRetryable(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.StatusCode == http.StatusServiceUnavailable && e.Code == "no_decider"
}

// SetIf writes value only if the entry is at version; an empty version
// means the key must be absent (IfAbsent).
func (c *Client) SetIf(ctx context.Context, typ int32, key, value, version string, opts ...WriteOption) (*Entry, error) {
	return c.Set(ctx, typ, key, value, append(opts, expect(version))...)
}

// DeleteIf deletes the entry only if it is at version.
func (c *Client) DeleteIf(ctx context.Context, typ int32, key, version string, opts ...WriteOption) (*Deletion, error) {
	if version == "" {
		return nil, fmt.Errorf("podcache: DeleteIf needs the version to delete")
	}
	return c.Delete(ctx, typ, key, append(opts, IfVersion(version))...)
}

func expect(version string) WriteOption {
	if version == "" {
		return IfAbsent()
	}
	return IfVersion(version)
}

// UpdateAttempts bounds how often Update reads and tries again.
const UpdateAttempts = 32

// Update reads the entry, asks change for its new value (old is nil when
// the key is absent), and writes it only if the entry is still at the
// version read; when another writer got there first, it reads again and
// retries (at most UpdateAttempts times, with a short growing pause, also
// while no decider is chosen). An error from change ends it with that
// error, nothing written.
func (c *Client) Update(ctx context.Context, typ int32, key string, change func(old *Entry) (string, error), opts ...WriteOption) (*Entry, error) {
	pause := 5 * time.Millisecond
	var last error
	for attempt := 0; attempt < UpdateAttempts; attempt++ {
		old, err := c.Get(ctx, typ, key)
		if err != nil && !IsNotFound(err) {
			return nil, err
		}
		version := ""
		if err == nil {
			version = old.Version
		} else {
			old = nil
		}
		value, err := change(old)
		if err != nil {
			return nil, err
		}
		written, err := c.SetIf(ctx, typ, key, value, version, opts...)
		if err == nil {
			return written, nil
		}
		if !IsPreconditionFailed(err) && !isRetryable(err) {
			return nil, err
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(pause):
		}
		if pause < 200*time.Millisecond {
			pause *= 2
		}
	}
	return nil, fmt.Errorf("podcache: Update of %q gave up after %d attempts: %w", key, UpdateAttempts, last)
}
