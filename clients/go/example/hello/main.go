// Command hello is a small web service that reads its feature flags from
// memory, as the original Go services did: a podcache Mirror keeps type
// -type of the node at -podcache in this process and follows its changes,
// so a request never waits on the network for a flag.
//
//	hello -listen 127.0.0.1:8080 -podcache http://127.0.0.2:8087 -type 2
//	curl -X PUT -d Howdy http://127.0.0.2:8087/v1/cache/2/greeting
//	curl 'http://127.0.0.1:8080/?name=Ada'     # Howdy, Ada!
//
// Routes: / (the greeting, flags "greeting" and "shout"), /flags (every
// flag as JSON), /readyz (200 once the flags are loaded).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"podcache.dev/podcache"
)

// Flags is what the service needs of its flag store; *podcache.Mirror has
// it.
type Flags interface {
	Get(key string) (string, bool)
	Range(fn func(key, value string) bool)
	Ready() <-chan struct{}
}

// NewHandler serves the service's routes from flags.
func NewHandler(flags Flags) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		greeting, ok := flags.Get("greeting")
		if !ok {
			greeting = "Hello"
		}
		name := r.URL.Query().Get("name")
		if name == "" {
			name = "world"
		}
		text := fmt.Sprintf("%s, %s!", greeting, name)
		if shout, _ := flags.Get("shout"); shout == "on" {
			text = strings.ToUpper(text)
		}
		fmt.Fprintln(w, text)
	})
	mux.HandleFunc("/flags", func(w http.ResponseWriter, r *http.Request) {
		all := map[string]string{}
		flags.Range(func(k, v string) bool {
			all[k] = v
			return true
		})
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(all)
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-flags.Ready():
			fmt.Fprintln(w, "ready")
		default:
			http.Error(w, "loading the flags", http.StatusServiceUnavailable)
		}
	})
	return mux
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to serve on")
	node := flag.String("podcache", "http://127.0.0.1:8087", "the podcache node's REST URL")
	typ := flag.Int("type", 2, "the podcache type that holds the flags")
	tokenFile := flag.String("token-file", "", "a file whose first line is a podcache read token")
	caFile := flag.String("ca-file", "", "CA certificates (PEM) for an https:// node")
	flag.Parse()

	var opts []podcache.Option
	if *tokenFile != "" {
		raw, err := os.ReadFile(*tokenFile)
		if err != nil {
			log.Fatal(err)
		}
		opts = append(opts, podcache.WithToken(strings.TrimSpace(strings.SplitN(string(raw), "\n", 2)[0])))
	}
	if *caFile != "" {
		opts = append(opts, podcache.WithCAFile(*caFile))
	}
	client, err := podcache.New(*node, opts...)
	if err != nil {
		log.Fatal(err)
	}
	flags := client.Mirror(int32(*typ), &podcache.MirrorOptions{
		OnChange: func(c podcache.Change) {
			if c.Deleted {
				log.Printf("flag %s removed", c.Key)
			} else {
				log.Printf("flag %s = %q (%s)", c.Key, c.Value, c.Origin)
			}
		},
		OnError: func(err error) { log.Printf("following %s: %v (retrying)", *node, err) },
	})
	defer flags.Close()

	srv := &http.Server{Addr: *listen, Handler: NewHandler(flags), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	log.Printf("serving on %s, flags from type %d of %s", *listen, *typ, *node)
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}
