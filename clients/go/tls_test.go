package podcache_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"podcache.dev/podcache"
	"podcache.dev/podcache/internal/testnode"
)

// pki is a test CA that issues server and client certificates.
type pki struct {
	t    *testing.T
	dir  string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newPKI(t *testing.T) *pki {
	p := &pki{t: t, dir: t.TempDir()}
	p.cert, p.key = p.issue(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "podcache test CA"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}, "ca")
	p.pool = x509.NewCertPool()
	p.pool.AddCert(p.cert)
	return p
}

var serial int64

// issue signs template (self-signed while the CA is being made) and
// writes <name>.pem and <name>-key.pem.
func (p *pki) issue(template *x509.Certificate, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	serial++
	template.SerialNumber = big.NewInt(serial)
	template.NotBefore = time.Now().Add(-time.Hour)
	template.NotAfter = time.Now().Add(time.Hour)
	parent, signer := template, key
	if p.cert != nil {
		parent, signer = p.cert, p.key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, parent, &key.PublicKey, signer)
	if err != nil {
		p.t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		p.t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		p.t.Fatal(err)
	}
	p.write(name+".pem", "CERTIFICATE", der)
	p.write(name+"-key.pem", "PRIVATE KEY", keyDER)
	return cert, key
}

func (p *pki) write(name, kind string, der []byte) {
	if err := os.WriteFile(p.path(name), pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// clientCert issues a client certificate for a tls.Config.
func (p *pki) clientCert() tls.Certificate {
	cert, key := p.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "go client"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, "client")
	return tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}
}

// A node serving HTTPS and asking for client certificates
// (--http-tls-cert, --http-tls-key, --http-tls-client-ca).
func TestTLS(t *testing.T) {
	t.Parallel()
	ca := newPKI(t)
	clientCert := ca.clientCert()
	nodes := testnode.Start(t, testnode.Config{
		Nodes: 2,
		Args: func(n *testnode.Node) []string {
			ca.issue(&x509.Certificate{
				Subject:     pkix.Name{CommonName: n.Name},
				IPAddresses: []net.IP{net.ParseIP(n.IP)},
				KeyUsage:    x509.KeyUsageDigitalSignature,
				ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			}, n.Name)
			return []string{
				"--http-tls-cert", ca.path(n.Name + ".pem"),
				"--http-tls-key", ca.path(n.Name + "-key.pem"),
				"--http-tls-client-ca", ca.path("ca.pem"),
			}
		},
		TLS: &tls.Config{RootCAs: ca.pool, Certificates: []tls.Certificate{clientCert}},
	})
	ctx := bg(t)
	withCert := &tls.Config{Certificates: []tls.Certificate{clientCert}}

	// The CA from a file, the client certificate from a tls.Config.
	a := client(t, nodes[0], podcache.WithCAFile(ca.path("ca.pem")), podcache.WithTLSConfig(withCert))
	if _, err := a.Set(ctx, 1, "k", "v", podcache.WaitAll()); err != nil {
		t.Fatal(err)
	}
	// Both from a tls.Config.
	b := client(t, nodes[1], podcache.WithTLSConfig(&tls.Config{RootCAs: ca.pool, Certificates: []tls.Certificate{clientCert}}))
	if got, err := b.Get(ctx, 1, "k"); err != nil || got.Value != "v" {
		t.Fatalf("over TLS: %+v, %v", got, err)
	}
	m := b.Mirror(1, nil)
	defer m.Close()
	if err := m.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if v, _ := m.Get("k"); v != "v" {
		t.Fatalf("the mirror over TLS holds %q", v)
	}

	untrusted := client(t, nodes[0], podcache.WithTLSConfig(withCert))
	if _, err := untrusted.Get(ctx, 1, "k"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a node of an unknown CA was accepted: %v", err)
	}
	anonymous := client(t, nodes[0], podcache.WithCAFile(ca.path("ca.pem")))
	if _, err := anonymous.Get(ctx, 1, "k"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client without a certificate was served: %v", err)
	}
	plain, err := podcache.New(strings.Replace(nodes[0].URL, "https://", "http://", 1), podcache.WithTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := plain.Get(ctx, 1, "k"); err == nil {
		t.Fatal("plain HTTP was answered on a TLS port")
	}
	if _, err := podcache.New(nodes[0].URL, podcache.WithCAFile(ca.path("missing.pem"))); err == nil {
		t.Fatal("a missing CA file was accepted")
	}
}
