package podcache_test

import (
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// SetIf and DeleteIf apply only at the version read, on any replica;
// a stale one is 412 with the current version named, and nothing changes.
func TestSetIfAndDeleteIf(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 3)
	ctx := bg(t)
	a, b := client(t, nodes[0]), client(t, nodes[2])
	const typ = 61
	// Right after a start a node may not know the decider yet: it answers
	// 503 no_decider, with nothing written, until it does.
	var created *podcache.Entry
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for {
		created, err = a.SetIf(ctx, typ, "limit", "10", "")
		var e *podcache.Error
		if err == nil || !errors.As(err, &e) || e.Code != "no_decider" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.SetIf(ctx, typ, "limit", "99", ""); !podcache.IsPreconditionFailed(err) {
		t.Fatalf("a second create answered %v, want 412", err)
	}
	updated, err := b.SetIf(ctx, typ, "limit", "20", created.Version)
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.SetIf(ctx, typ, "limit", "lost", created.Version)
	var e *podcache.Error
	if !errors.As(err, &e) || e.StatusCode != 412 || e.CurrentVersion != updated.Version {
		t.Fatalf("a stale SetIf answered %v, want 412 naming %s", err, updated.Version)
	}
	if _, err := a.DeleteIf(ctx, typ, "limit", created.Version); !podcache.IsPreconditionFailed(err) {
		t.Fatalf("a stale DeleteIf answered %v", err)
	}
	if _, err := a.DeleteIf(ctx, typ, "limit", updated.Version); err != nil {
		t.Fatal(err)
	}
}

// Update from 8 goroutines on 3 replicas: every increment counts once.
func TestUpdateCountsEveryIncrement(t *testing.T) {
	t.Parallel()
	nodes := testnode.StartCluster(t, 3)
	ctx := bg(t)
	const typ, perWriter, writers = 62, 10, 8
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(c *podcache.Client) {
			defer wg.Done()
			for i := 0; i < perWriter; i++ {
				_, err := c.Update(ctx, typ, "counter", func(old *podcache.Entry) (string, error) {
					if old == nil {
						return "1", nil
					}
					n, err := strconv.Atoi(old.Value)
					return strconv.Itoa(n + 1), err
				})
				if err != nil {
					errs <- err
					return
				}
			}
		}(client(t, nodes[w%len(nodes)]))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got, err := client(t, nodes[0]).Get(ctx, typ, "counter")
	if err != nil {
		t.Fatal(err)
	}
	if got.Value != strconv.Itoa(writers*perWriter) {
		t.Fatalf("counter is %s after %d increments", got.Value, writers*perWriter)
	}
}
