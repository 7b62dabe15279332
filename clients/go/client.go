// Package podcache is a client of podcache's REST API: reads and writes of
// the small map<string,string> per int32 type that podcache keeps identical
// on every replica, the change stream of a type (Watch), and a Mirror that
// keeps one type in the caller's memory and follows it by itself.
//
// It uses the standard library only.
//
//	c, err := podcache.New("http://127.0.0.1:8087", podcache.WithToken(token))
//	_, err = c.Set(ctx, 2, "feature.x", "on", podcache.WaitAll(), podcache.Reason("INC-7"))
//	e, err := c.Get(ctx, 2, "feature.x") // e.Author, e.Origin, e.Reason, e.WrittenAt
//
//	// Sets and deletes at once: one version, one watch event.
//	_, err = c.WriteBatch(ctx, 2, podcache.BatchWrite{
//		Set:    map[string]string{"feature.y": "on"},
//		Delete: []string{"feature.old"},
//	}, podcache.Reason("rollout 42"))
//
//	// The versions a node keeps, newest first, and an undo.
//	versions, err := c.History(ctx, 2, "feature.x")
//	_, err = c.Rollback(ctx, 2, "feature.x", versions[1].Version, podcache.Reason("undo INC-7"))
//
//	m := c.Mirror(2, nil)
//	defer m.Close()
//	err = m.WaitReady(ctx)
//	v, ok := m.Get("feature.x")
package podcache

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// DefaultTimeout bounds each request but Watch streams, unless WithTimeout
// says otherwise. A write with WaitAll waits up to the node's
// --wait-timeout (5s by default) for its peers.
const DefaultTimeout = 30 * time.Second

// Client talks to one podcache node. It is safe for concurrent use.
type Client struct {
	base    *url.URL
	http    *http.Client
	token   string
	timeout time.Duration
}

type config struct {
	token      string
	tlsConfig  *tls.Config
	caFile     string
	httpClient *http.Client
	timeout    time.Duration
}

// An Option configures a Client.
type Option func(*config)

// WithToken sends "Authorization: Bearer <token>" with every request (a
// read or write token of the node's --auth-token-file).
func WithToken(token string) Option {
	return func(c *config) { c.token = token }
}

// WithTLSConfig uses cfg for https:// nodes.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(c *config) { c.tlsConfig = cfg }
}

// WithCAFile trusts the PEM certificates in path (instead of the system's)
// for https:// nodes. Combined with WithTLSConfig, they are added to a copy
// of that configuration.
func WithCAFile(path string) Option {
	return func(c *config) { c.caFile = path }
}

// WithHTTPClient sends requests through hc. It cannot be combined with
// WithTLSConfig or WithCAFile: configure hc's transport instead. hc should
// have no Timeout, or it cuts Watch streams and Mirrors.
func WithHTTPClient(hc *http.Client) Option {
	return func(c *config) { c.httpClient = hc }
}

// WithTimeout bounds each request but Watch streams (DefaultTimeout if not
// given; 0 means no bound but the caller's context).
func WithTimeout(d time.Duration) Option {
	return func(c *config) { c.timeout = d }
}

// New returns a client of the node at baseURL ("http://host:port" or
// "https://host:port"; a bare "host:port" means http).
func New(baseURL string, opts ...Option) (*Client, error) {
	cfg := config{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&cfg)
	}
	if !strings.Contains(baseURL, "://") {
		baseURL = "http://" + baseURL
	}
	base, err := url.Parse(strings.TrimRight(baseURL, "/"))
	if err != nil {
		return nil, fmt.Errorf("podcache: invalid node address %q: %w", baseURL, err)
	}
	if (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return nil, fmt.Errorf("podcache: invalid node address %q: want http://host:port or https://host:port", baseURL)
	}
	if strings.ContainsAny(cfg.token, "\r\n") {
		return nil, errors.New("podcache: the token holds a line break")
	}
	hc := cfg.httpClient
	if hc != nil && (cfg.tlsConfig != nil || cfg.caFile != "") {
		return nil, errors.New("podcache: WithHTTPClient cannot be combined with WithTLSConfig or WithCAFile")
	}
	if hc == nil {
		transport := http.DefaultTransport.(*http.Transport).Clone()
		tlsConfig, err := buildTLS(cfg.tlsConfig, cfg.caFile)
		if err != nil {
			return nil, err
		}
		transport.TLSClientConfig = tlsConfig
		hc = &http.Client{Transport: transport}
	}
	return &Client{base: base, http: hc, token: cfg.token, timeout: cfg.timeout}, nil
}

func buildTLS(cfg *tls.Config, caFile string) (*tls.Config, error) {
	if caFile == "" {
		return cfg, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("podcache: reading the CA file: %w", err)
	}
	if cfg == nil {
		cfg = &tls.Config{}
	} else {
		cfg = cfg.Clone()
	}
	if cfg.RootCAs == nil {
		cfg.RootCAs = x509.NewCertPool()
	}
	if !cfg.RootCAs.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("podcache: no PEM certificate in the CA file %s", caFile)
	}
	return cfg, nil
}

// URL is the node's base URL.
func (c *Client) URL() string { return c.base.String() }

// Error is an error answer of the node: its HTTP status and the body's
// {"error": code, "message": message}.
type Error struct {
	// StatusCode is the HTTP status, e.g. 400 or 404.
	StatusCode int
	// Code is the stable machine code, e.g. "not_found", "invalid_key",
	// "unauthorized", "forbidden", "payload_too_large", "not_ready",
	// "capacity_exhausted". Empty when the body was not podcache's JSON
	// (a proxy's answer, say). "forbidden_type" and "schema_violation"
	// come as a *ForbiddenTypeError and a *SchemaViolationError, which
	// hold this Error.
	Code string
	// Message is the node's sentence for people (or the start of the body).
	Message string
	// CurrentVersion is, for a failed precondition (412
	// "precondition_failed"), the version the key holds now; empty when
	// it holds none.
	CurrentVersion string
}

func (e *Error) Error() string {
	if e.Code == "" {
		return fmt.Sprintf("podcache: HTTP %d: %s", e.StatusCode, e.Message)
	}
	return fmt.Sprintf("podcache: HTTP %d %s: %s", e.StatusCode, e.Code, e.Message)
}

// IsNotFound reports whether err is the node's 404: an absent entry.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.StatusCode == http.StatusNotFound
}

// url joins escaped path segments and a query onto the base URL.
func (c *Client) url(query url.Values, segments ...string) string {
	var b strings.Builder
	b.WriteString(c.base.String())
	for _, s := range segments {
		b.WriteByte('/')
		b.WriteString(url.PathEscape(s))
	}
	if len(query) > 0 {
		b.WriteByte('?')
		b.WriteString(query.Encode())
	}
	return b.String()
}

func cachePath(typ int32, key ...string) []string {
	return append([]string{"v1", "cache", strconv.FormatInt(int64(typ), 10)}, key...)
}

// send performs a request and returns the response of a 2xx answer; any
// other answer becomes an *Error. The caller closes the body.
func (c *Client) send(ctx context.Context, method, target string, body io.Reader, header http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, target, body)
	if err != nil {
		return nil, fmt.Errorf("podcache: %w", err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("podcache: %w", err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	return nil, readError(resp)
}

func readError(resp *http.Response) error {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &Error{StatusCode: resp.StatusCode}
	var body struct {
		Error          string  `json:"error"`
		Message        string  `json:"message"`
		CurrentVersion *string `json:"current_version"`
	}
	if json.Unmarshal(raw, &body) == nil && body.Error != "" {
		e.Code, e.Message = body.Error, body.Message
		if body.CurrentVersion != nil {
			e.CurrentVersion = *body.CurrentVersion
		}
		return typedError(e, raw)
	} else {
		e.Message = strings.TrimSpace(string(raw))
		if len(e.Message) > 200 {
			e.Message = e.Message[:200] + "..."
		}
		if e.Message == "" {
			e.Message = http.StatusText(resp.StatusCode)
		}
	}
	return e
}

// call performs a bounded request and decodes a JSON answer into out.
func (c *Client) call(ctx context.Context, method, target string, body io.Reader, contentType string, out interface{}) error {
	header := http.Header{}
	if contentType != "" {
		header.Set("Content-Type", contentType)
	}
	return c.callWith(ctx, method, target, body, header, out)
}

// callWith is call with the request's headers.
func (c *Client) callWith(ctx context.Context, method, target string, body io.Reader, header http.Header, out interface{}) error {
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	resp, err := c.send(ctx, method, target, body, header)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("podcache: decoding the answer of %s %s: %w", method, target, err)
	}
	return nil
}

// Ready returns nil once the node reports ready (GET /readyz answers 200:
// its bootstrap pull is done), else the node's error (503 "not_ready").
func (c *Client) Ready(ctx context.Context) error {
	return c.call(ctx, http.MethodGet, c.url(nil, "readyz"), nil, "", nil)
}
