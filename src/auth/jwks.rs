//! JSON Web Key Sets (RFC 7517): parsed from a file when the config is built, or fetched from a URL and refreshed:
//! every [`REFRESH_EVERY`] by the control thread, and at once when a token names a key id the set lacks (at most
//! every [`UNKNOWN_KID_REFRESH`], so tokens with made-up ids cannot make wsgate hammer the issuer). A failed
//! refresh keeps the keys it had and logs why. `http://` and `https://` URLs are fetched (https verified against
//! `jwks_ca` or the system's CA certificates).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::jwt::{TokenError, family};
use crate::conn::Conn;
use crate::tls::client::{ClientTls, TlsSettings};

/// How often a JWKS URL is fetched again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// The least time between two fetches of a JWKS URL asked for by tokens with an unknown key id.
pub const UNKNOWN_KID_REFRESH: Duration = Duration::from_secs(30);
/// The time a fetch of a JWKS URL may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a key set cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JWK set: expected an object with a `keys` array")]
    NotASet,
    #[error("key #{index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("no usable key")]
    Empty,
}

/// One key of a set.
struct Entry {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
    family: super::jwt::Family,
}

impl Entry {
    /// A JWK as a key that verifies signatures, or why it is not one.
    fn of(key: &Value) -> Result<Entry, String> {
        if let Some(usage) = key.get("use").and_then(Value::as_str)
            && usage != "sig"
        {
            return Err(format!("`use` is {usage:?}, not \"sig\""));
        }
        let jwk: Jwk = serde_json::from_value(key.clone()).map_err(|e| e.to_string())?;
        let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        let alg = match &jwk.common.key_algorithm {
            // Its signing algorithms are spelled as `Algorithm`'s.
            Some(a) => Some(
                format!("{a:?}")
                    .parse::<Algorithm>()
                    .map_err(|_| format!("unsupported alg {a:?}"))?,
            ),
            None => None,
        };
        let family = match &jwk.algorithm {
            // ES256 and ES384 only: no algorithm here verifies with a P-521 key.
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                if matches!(ec.curve, jsonwebtoken::jwk::EllipticCurve::P521) =>
            {
                return Err("curve P-521: no supported algorithm uses it".into());
            }
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => super::jwt::Family::Ec,
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => super::jwt::Family::Rsa,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => super::jwt::Family::Hmac,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => super::jwt::Family::Ed,
        };
        Ok(Entry {
            kid: jwk.common.key_id.clone(),
            alg,
            key: decoding,
            family,
        })
    }
}

/// The keys of a JWK set.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Entry>,
}

impl KeySet {
    /// Parses a JWK set. Keys that cannot verify a signature here (an encryption key, `use` other than `sig`, an
    /// algorithm or curve jsonwebtoken lacks) are left out, as identity providers publish such keys beside their
    /// signing keys; a set with no usable key is an error naming why its first key was not usable.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, JwksError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| JwksError::NotJson(e.to_string()))?;
        let Some(Value::Array(keys)) = value.get("keys") else {
            return Err(JwksError::NotASet);
        };
        let mut set = KeySet::default();
        let mut first_unusable = None;
        for (index, key) in keys.iter().enumerate() {
            match Entry::of(key) {
                Ok(entry) => set.keys.push(entry),
                Err(reason) => {
                    tracing::debug!(key = index, %reason, "JWK left out");
                    first_unusable.get_or_insert(JwksError::BadKey { index, reason });
                }
            }
        }
        if set.keys.is_empty() {
            return Err(first_unusable.unwrap_or(JwksError::Empty));
        }
        Ok(set)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Verifies with the key named `kid`, or without a `kid` with each key that fits `alg` in turn.
    pub fn verify<T>(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        remote: Option<&Arc<Remote>>,
        decode: impl Fn(&DecodingKey) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let fits = |e: &&Entry| e.family == family(alg) && e.alg.is_none_or(|a| a == alg);
        if let (true, Some(remote)) = (self.keys.is_empty(), remote) {
            return Err(TokenError::NoKeysYet { remote: remote.clone() });
        }
        if let Some(kid) = kid {
            let Some(entry) = self.keys.iter().find(|e| e.kid.as_deref() == Some(kid)) else {
                return Err(TokenError::UnknownKid {
                    kid: super::jwt::logged(kid),
                    remote: remote.cloned(),
                });
            };
            if !fits(&entry) {
                return Err(TokenError::KeyMismatch);
            }
            return decode(&entry.key);
        }
        let mut last = TokenError::NoKey(alg);
        for entry in self.keys.iter().filter(fits) {
            match decode(&entry.key) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Why a fetch of a JWKS URL failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("timed out after {FETCH_TIMEOUT:?}")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("body unreadable or larger than {MAX_JWKS_BYTES} bytes")]
    Body,
    #[error("{0}")]
    Keys(#[from] JwksError),
}

/// A JWKS URL and the keys last fetched from it.
pub struct Remote {
    url: http::Uri,
    /// `host:port` to connect to.
    authority: String,
    /// For an https URL: its TLS, and the host its certificate must name.
    tls: Option<(ClientTls, String)>,
    keys: ArcSwap<KeySet>,
    /// Bumped by every successful fetch.
    generation: AtomicU64,
    /// When the last fetch was tried; held while a fetch runs, so that one fetch serves everyone waiting.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

impl Remote {
    /// A JWKS URL (`http://` or `https://host[:port]/path`) with no keys fetched yet. An https URL's server must
    /// present a certificate chaining to `ca` (a PEM file), or without one to the system's CA certificates.
    pub fn new(url: &str, ca: Option<&std::path::Path>) -> Result<Remote, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let (tls, default_port) = match uri.scheme_str() {
            Some("http") if ca.is_some() => return Err("`jwks_ca` applies to https:// URLs only".into()),
            Some("http") => (None, 80),
            Some("https") => {
                let tls = match ca {
                    Some(ca) => ClientTls::load(TlsSettings {
                        ca: Some(ca.to_path_buf()),
                        ..TlsSettings::default()
                    }),
                    None => ClientTls::system_roots(),
                };
                (Some(tls.map_err(|e| e.to_string())?), 443)
            }
            _ => return Err(format!("`{url}`: only http:// and https:// URLs are fetched")),
        };
        let Some(authority) = uri.authority() else {
            return Err(format!("`{url}` has no host"));
        };
        let host = authority.host().to_string();
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{host}:{default_port}"),
        };
        Ok(Remote {
            url: uri,
            tls: tls.map(|tls| (tls, host)),
            authority,
            keys: ArcSwap::from_pointee(KeySet::default()),
            generation: AtomicU64::new(0),
            last_attempt: tokio::sync::Mutex::new(None),
        })
    }

    /// Takes the keys `previous` (the same URL before a reload) fetched, so that a reload does not leave the route
    /// without keys until its first fetch.
    pub fn adopt(&self, previous: &Remote) {
        if previous.url == self.url && self.keys.load().keys.is_empty() {
            self.keys.store(previous.keys.load_full());
        }
    }

    pub fn url(&self) -> &http::Uri {
        &self.url
    }

    /// The keys in force.
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Fetches the keys again unless the last try was less than `min_interval` ago. Returns whether the keys
    /// changed since the call (by this fetch, or by one that ran while this call waited for it).
    pub async fn refresh(&self, min_interval: Duration) -> bool {
        let before = self.generation.load(Ordering::Acquire);
        let mut last = self.last_attempt.lock().await;
        if self.generation.load(Ordering::Acquire) != before {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        match timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .unwrap_or(Err(FetchError::Timeout))
        {
            Ok(set) => {
                tracing::debug!(url = %self.url, keys = set.key_count(), "JWKS fetched");
                self.keys.store(Arc::new(set));
                self.generation.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed: the keys in force are kept");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(FetchError::Connect)?;
        let stream = match &self.tls {
            None => Conn::Tcp(stream),
            Some((tls, host)) => {
                let name = tls.server_name(host).map_err(|e| FetchError::Tls(e.to_string()))?;
                let stream = tls
                    .connect(stream, name)
                    .await
                    .map_err(|e| FetchError::Tls(e.to_string()))?;
                Conn::ClientTls(Box::new(stream))
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Owned by this fetch: it ends with the connection, when the answer has been read or the fetch dropped.
        // When the connection ends first, the exchange fails on its own.
        let conn = async move {
            let _ = conn.await;
            std::future::pending::<()>().await;
        };
        let exchange = async {
            let path = self.url.path_and_query().map_or("/", |p| p.as_str());
            let req = http::Request::get(path)
                .header(http::header::HOST, self.url.authority().map_or("", |a| a.as_str()))
                .header(http::header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|_| FetchError::Body)?;
            let resp = sender.send_request(req).await?;
            if resp.status() != http::StatusCode::OK {
                return Err(FetchError::Status(resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|_| FetchError::Body)?
                .to_bytes();
            Ok(KeySet::parse(&body)?)
        };
        tokio::select! {
            result = exchange => result,
            () = conn => Err(FetchError::Body),
        }
    }

    /// Refreshes every [`REFRESH_EVERY`] until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.refresh(Duration::ZERO).await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_cannot_verify_signatures_are_left_out_of_a_set() {
        let mut set: Value = serde_json::from_str(include_str!("../../tests/auth/keys.jwks.json")).expect("json");
        let keys = set["keys"].as_array_mut().expect("keys");
        let usable = keys.len();
        let mut encryption = keys[0].clone();
        encryption["use"] = Value::from("enc");
        encryption["kid"] = Value::from("enc-1");
        keys.push(encryption.clone());
        keys.push(serde_json::json!({"kty": "RSA", "alg": "RSA-OAEP", "kid": "oaep", "n": "AQAB", "e": "AQAB"}));
        keys.push(serde_json::json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}));
        let parsed = KeySet::parse(set.to_string().as_bytes()).expect("the usable keys");
        assert_eq!(parsed.key_count(), usable);
        let only_enc = serde_json::json!({ "keys": [encryption] });
        match KeySet::parse(only_enc.to_string().as_bytes()) {
            Err(JwksError::BadKey { index: 0, reason }) => assert!(reason.contains("\"enc\""), "{reason}"),
            other => panic!(
                "expected the encryption key refused, got {:?}",
                other.map(|s| s.key_count())
            ),
        }
    }
}
