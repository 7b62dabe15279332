// Package testnode starts real podcache nodes for tests: `podcache serve`
// processes on their own loopback addresses (127.x.y.z, distinct per
// cluster, so tests and test packages can run in parallel), ready-polled
// with deadlines and killed by PID when the test ends.
//
// The binary is $PODCACHE_BIN, by default ../../target/debug/podcache
// relative to the Go module's root (clients/go); a relative
// $PODCACHE_BIN is taken relative to that root too.
package testnode

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// StartTimeout bounds how long a node may take to report ready.
const StartTimeout = 30 * time.Second

// Node is one `podcache serve` process.
type Node struct {
	Name     string
	IP       string
	HTTPAddr string
	GRPCAddr string
	// URL is the REST base URL, http://<HTTPAddr> (https:// with TLS).
	URL string

	t     testing.TB
	args  []string
	log   string
	probe *http.Client

	mu   sync.Mutex
	cmd  *exec.Cmd
	exit chan struct{}
}

// Binary returns the podcache binary the tests run, failing the test when
// it is missing.
func Binary(t testing.TB) string {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	bin := os.Getenv("PODCACHE_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "target", "debug", "podcache")
	}
	if !filepath.IsAbs(bin) {
		bin = filepath.Join(root, bin)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("podcache binary %s: %v (build it with `cargo build --bin podcache`, or set PODCACHE_BIN)", bin, err)
	}
	return bin
}

var clusters int32

// subnet returns a 127.x.y prefix no other cluster of this run (or, by the
// process id, of a concurrent test binary) uses.
func subnet() string {
	n := int(atomic.AddInt32(&clusters, 1))
	pid := os.Getpid()
	return fmt.Sprintf("127.%d.%d", 10+pid%200, (pid/200+n)%250+1)
}

// freeAddrs returns n distinct addresses on ip whose ports are free at the
// moment of the call (held open together, so no two are the same).
func freeAddrs(t testing.TB, ip string, n int) []string {
	addrs := make([]string, n)
	for i := range addrs {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			t.Fatalf("finding a free port on %s: %v", ip, err)
		}
		defer l.Close()
		addrs[i] = l.Addr().String()
	}
	return addrs
}

// Config describes a cluster to start.
type Config struct {
	// Nodes is how many nodes to start.
	Nodes int
	// Args, if set, returns a node's extra serve flags; its addresses are
	// known by then (for a certificate that names its IP, say).
	Args func(n *Node) []string
	// TLS, if set, means the nodes serve HTTPS: URL is https:// and the
	// readiness polls use this configuration.
	TLS *tls.Config
}

// StartCluster starts n nodes that know each other as static peers, each
// with the extra serve flags, and waits until every one is ready. They are
// killed when the test ends.
func StartCluster(t testing.TB, n int, extra ...string) []*Node {
	t.Helper()
	return Start(t, Config{Nodes: n, Args: func(*Node) []string { return extra }})
}

// Start starts the cluster cfg describes and waits until every node is
// ready. The nodes are killed when the test ends.
func Start(t testing.TB, cfg Config) []*Node {
	t.Helper()
	bin := Binary(t)
	prefix := subnet()
	scheme := "http"
	probe := &http.Client{Timeout: time.Second}
	if cfg.TLS != nil {
		scheme = "https"
		probe.Transport = &http.Transport{TLSClientConfig: cfg.TLS}
	}
	nodes := make([]*Node, cfg.Nodes)
	peers := make([]string, cfg.Nodes)
	for i := range nodes {
		ip := fmt.Sprintf("%s.%d", prefix, i+1)
		addrs := freeAddrs(t, ip, 2)
		nodes[i] = &Node{
			Name:     fmt.Sprintf("node%d", i+1),
			IP:       ip,
			HTTPAddr: addrs[0],
			GRPCAddr: addrs[1],
			URL:      scheme + "://" + addrs[0],
			t:        t,
			probe:    probe,
		}
		peers[i] = nodes[i].GRPCAddr
	}
	dir := t.TempDir()
	for _, node := range nodes {
		node.log = filepath.Join(dir, node.Name+".log")
		node.args = []string{bin, "serve",
			"--pod-ip", node.IP,
			"--pod-name", node.Name,
			"--http-addr", node.HTTPAddr,
			"--grpc-addr", node.GRPCAddr,
			"--peers", strings.Join(peers, ","),
			"--anti-entropy-interval", "300ms",
			"--heartbeat-interval", "200ms",
		}
		if cfg.Args != nil {
			node.args = append(node.args, cfg.Args(node)...)
		}
		node := node
		t.Cleanup(func() {
			node.Kill()
			if t.Failed() {
				node.dumpLog()
			}
		})
	}
	for _, node := range nodes {
		node.spawn()
	}
	for _, node := range nodes {
		node.WaitReady()
	}
	return nodes
}

func (n *Node) spawn() {
	n.t.Helper()
	log, err := os.OpenFile(n.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		n.t.Fatalf("%s: %v", n.Name, err)
	}
	defer log.Close()
	fmt.Fprintf(log, "=== %s\n", strings.Join(n.args, " "))
	cmd := exec.Command(n.args[0], n.args[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = procAttr()
	if err := cmd.Start(); err != nil {
		n.t.Fatalf("starting %s: %v", n.Name, err)
	}
	exit := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exit)
	}()
	n.mu.Lock()
	n.cmd, n.exit = cmd, exit
	n.mu.Unlock()
}

// WaitReady polls GET /readyz until it answers 200, failing the test after
// StartTimeout or when the process exits.
func (n *Node) WaitReady() {
	n.t.Helper()
	n.mu.Lock()
	exit := n.exit
	n.mu.Unlock()
	deadline := time.Now().Add(StartTimeout)
	for time.Now().Before(deadline) {
		select {
		case <-exit:
			n.dumpLog()
			n.t.Fatalf("%s exited before it was ready", n.Name)
		default:
		}
		if resp, err := n.probe.Get(n.URL + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	n.dumpLog()
	n.t.Fatalf("%s not ready within %v", n.Name, StartTimeout)
}

// Kill sends SIGKILL to the process (if it runs) and waits until it is
// gone.
func (n *Node) Kill() {
	n.mu.Lock()
	cmd, exit := n.cmd, n.exit
	n.cmd = nil
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exit
}

// Restart starts the node again with the same name, addresses and flags,
// and waits until it is ready.
func (n *Node) Restart() {
	n.t.Helper()
	n.Kill()
	n.spawn()
	n.WaitReady()
}

func (n *Node) dumpLog() {
	text, err := os.ReadFile(n.log)
	if err != nil {
		return
	}
	if len(text) > 8000 {
		text = text[len(text)-8000:]
	}
	n.t.Logf("--- log of %s (%s):\n%s", n.Name, n.log, text)
}
