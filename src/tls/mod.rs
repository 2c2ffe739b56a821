//! TLS with rustls and its `ring` crypto provider: the server side of listeners with `tls` ([`server`]:
//! certificates chosen by SNI, reloaded in place) and the client side of upstreams with `tls` ([`client`]).
//!
//! `ring` rather than `aws-lc-rs`: it builds with nothing but a C compiler (aws-lc-sys wants CMake or a long
//! build of its own on a fresh machine), it is small, and its X25519, P-256 and Ed25519 code is assembly as fast
//! as aws-lc's for the handshakes a proxy makes (ECDHE + an ECDSA or Ed25519 signature). What it lacks is the
//! post-quantum hybrid key exchange X25519MLKEM768: clients offering it get X25519.
//!
//! Only TLS 1.3 and 1.2 are offered (rustls has nothing older), with rustls's default cipher suites: AEADs with
//! forward secrecy only.

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate, a key or a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a PEM file of certificates: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: no certificate in the file (a PEM `CERTIFICATE` block is expected)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key in the file (a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block is expected)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: the key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: a CA certificate is not usable: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// The crypto provider of every TLS config wsgate makes.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    // Deprecated only for having no post-quantum key exchange (X25519MLKEM768, aws-lc-rs's): clients that offer
    // it also offer X25519, which is what they get.
    #[allow(deprecated)]
    let ring = rustls::crypto::ring::default_provider;
    PROVIDER.get_or_init(|| Arc::new(ring())).clone()
}

/// The protocol versions wsgate speaks: TLS 1.3 and 1.2.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The ALPN protocol of every connection: WebSocket over HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file, in order; an error when it holds none.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::BadKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// A certificate chain with its key, checked to belong together.
fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = certificates(cert_path, cert_pem)?;
    let key = private_key(key_path, key_pem)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: key_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err(TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}
