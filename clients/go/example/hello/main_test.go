package main

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

func TestGreetingFollowsTheFlags(t *testing.T) {
	nodes := testnode.StartCluster(t, 2)
	writer, err := podcache.New(nodes[0].URL)
	if err != nil {
		t.Fatal(err)
	}
	reader, err := podcache.New(nodes[1].URL)
	if err != nil {
		t.Fatal(err)
	}
	flags := reader.Mirror(2, nil)
	defer flags.Close()
	srv := httptest.NewServer(NewHandler(flags))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(body))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := flags.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("readyz %d", code)
	}
	if _, body := get("/?name=Ada"); body != "Hello, Ada!" {
		t.Fatalf("without flags: %q", body)
	}
	if _, err := writer.SetBatch(ctx, 2, map[string]string{"greeting": "Howdy", "shout": "on"}); err != nil {
		t.Fatal(err)
	}
	want := "HOWDY, ADA!"
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body := get("/?name=Ada")
		if body == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the greeting is %q, want %q", body, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, body := get("/flags"); body != `{"greeting":"Howdy","shout":"on"}` {
		t.Fatalf("/flags: %s", body)
	}
}
