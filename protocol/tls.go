package protocol

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
)

// ErrFingerprint is a server certificate that does not match the pinned
// fingerprint.
var ErrFingerprint = errors.New("protocol: server certificate does not match the pinned fingerprint")

// Fingerprint is the pin of a certificate: "sha256:" and the hex SHA-256 of
// its DER bytes, as `sqlrebase serve` prints it.
func Fingerprint(certDER []byte) string {
	sum := sha256.Sum256(certDER)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// ParseFingerprint checks a pin's syntax and returns its 32 bytes.
func ParseFingerprint(s string) ([]byte, error) {
	hexPart, ok := strings.CutPrefix(strings.ToLower(strings.TrimSpace(s)), "sha256:")
	if !ok {
		return nil, fmt.Errorf("fingerprint %q: want sha256:<64 hex digits>", s)
	}
	b, err := hex.DecodeString(hexPart)
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("fingerprint %q: want sha256:<64 hex digits>", s)
	}
	return b, nil
}

// ClientTLS returns the TLS configuration of a replica. Exactly one of
// fingerprint (pin the server's certificate, e.g. a self-signed one) and
// caFile (a PEM bundle of CAs that sign the server's certificate for
// serverName) must be given: there is no mode that trusts any server.
func ClientTLS(fingerprint, caFile, serverName string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, ServerName: serverName}
	switch {
	case fingerprint != "" && caFile != "":
		return nil, errors.New("tls: give a fingerprint or a CA file, not both")
	case fingerprint != "":
		pin, err := ParseFingerprint(fingerprint)
		if err != nil {
			return nil, err
		}
		// Pinning replaces chain verification: the pin names the exact
		// certificate, so a CA's opinion adds nothing. Go only lets a
		// client skip chain verification through InsecureSkipVerify; the
		// VerifyConnection hook below is what makes it secure again.
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return ErrFingerprint
			}
			sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if subtle.ConstantTimeCompare(sum[:], pin) != 1 {
				return fmt.Errorf("%w: server presented %s", ErrFingerprint, Fingerprint(cs.PeerCertificates[0].Raw))
			}
			return nil
		}
	case caFile != "":
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("tls: CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls: CA file %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = pool
	default:
		return nil, errors.New("tls: a server fingerprint (sha256:...) or a CA file is required")
	}
	return cfg, nil
}

// ServerTLS returns the TLS configuration of a server presenting cert.
func ServerTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, Certificates: []tls.Certificate{cert}}
}

// LoadOrCreateCertificate loads certFile and keyFile, or, if neither exists,
// creates a self-signed ECDSA P-256 certificate for hosts (DNS names or IP
// addresses, plus localhost) and writes them, the key readable by the owner
// only. created says which happened.
func LoadOrCreateCertificate(certFile, keyFile string, hosts []string) (cert tls.Certificate, created bool, err error) {
	_, certErr := os.Stat(certFile)
	_, keyErr := os.Stat(keyFile)
	if certErr == nil || keyErr == nil {
		cert, err = tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return tls.Certificate{}, false, fmt.Errorf("load certificate: %w", err)
		}
		return cert, false, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, false, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, false, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "sqlrebase server"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
	}
	for _, h := range hosts {
		if ip := parseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" && h != "localhost" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, false, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, false, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		return tls.Certificate{}, false, fmt.Errorf("write key: %w", err)
	}
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return tls.Certificate{}, false, fmt.Errorf("write certificate: %w", err)
	}
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	return cert, true, err
}

// QUICConfig is the QUIC configuration both ends use: keepalives well inside
// the idle timeout, so that an idle but healthy session stays up and a dead
// peer is noticed within the timeout. The handshake timeout is the server's:
// generous, so that a client on a slow link (the seed scenario's client1 has
// 3 s each way) is not turned away. A client dials with the timeout of its
// own link (replica.TransportOptions.HandshakeTimeout): a handshake whose
// server died half way is abandoned only when it runs out.
func QUICConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  20 * time.Second,
		KeepAlivePeriod:       5 * time.Second,
		MaxIdleTimeout:        20 * time.Second,
		MaxIncomingStreams:    256,
		MaxIncomingUniStreams: -1,
	}
}

func parseIP(h string) net.IP { return net.ParseIP(h) }
