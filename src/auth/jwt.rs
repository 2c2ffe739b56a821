//! JSON Web Tokens (RFC 7519) as a route checks them: the token's header read first (JSON, an allowed algorithm,
//! never `none`), a key picked for it (a secret, a public key, or a key set by `kid`), then the signature and the
//! time and audience claims through `jsonwebtoken`. Every refusal is a [`TokenError`] that says precisely why, for
//! the log; the token itself is never in it.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::{KeySet, Remote};

/// The longest `kid` or `alg` a log line repeats, in characters.
const MAX_LOGGED: usize = 64;

/// Client-sent text for a log line: visible ASCII only (no line breaks or escapes), at most [`MAX_LOGGED`]
/// characters.
pub fn logged(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_LOGGED)
        .collect()
}

/// Why a token is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token header is not JSON")]
    HeaderNotJson,
    #[error("token with alg `none` (unsigned) refused")]
    AlgNone,
    #[error("token algorithm `{0}` is not allowed on this route")]
    AlgorithmNotAllowed(String),
    #[error("token names an unknown key id (kid `{kid}`)")]
    UnknownKid {
        kid: String,
        /// The remote key set that may know it after a refresh.
        remote: Option<Arc<Remote>>,
    },
    #[error("no key for a token signed with {0:?}")]
    NoKey(Algorithm),
    /// The route's JWKS URL has given no keys yet (wsgate just started or reloaded, or the issuer is unreachable).
    #[error("no keys fetched yet from the JWKS URL")]
    NoKeysYet { remote: Arc<Remote> },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("token has the wrong audience")]
    WrongAudience,
    #[error("token has the wrong issuer")]
    WrongIssuer,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("token algorithm does not fit the key")]
    KeyMismatch,
    #[error("token refused: {0}")]
    Other(String),
}

impl TokenError {
    fn from_jwt(e: &jsonwebtoken::errors::Error) -> TokenError {
        match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => TokenError::BadSignature,
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(logged(c)),
            ErrorKind::InvalidAlgorithm => TokenError::KeyMismatch,
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                TokenError::Malformed("not three base64url parts")
            }
            ErrorKind::Json(_) => TokenError::Malformed("claims are not a JSON object"),
            other => TokenError::Other(format!("{other:?}")),
        }
    }
}

/// Where a route looks for its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <token>`.
    Bearer,
    Cookie(String),
    Query(String),
    /// An entry `bearer.<token>` of `Sec-WebSocket-Protocol` (upgrades only).
    Subprotocol,
}

/// The keys tokens are verified with.
pub enum Keys {
    /// An HMAC secret (HS256/384/512).
    Secret(DecodingKey),
    /// One public key (RSA, EC or Ed25519).
    Public(DecodingKey),
    /// A JWKS file's keys.
    Set(KeySet),
    /// A JWKS URL's keys, refreshed.
    Remote(Arc<Remote>),
}

impl std::fmt::Debug for Keys {
    /// Key material is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keys::Secret(_) => f.write_str("Secret(..)"),
            Keys::Public(_) => f.write_str("Public(..)"),
            Keys::Set(set) => write!(f, "Set({} keys)", set.key_count()),
            Keys::Remote(remote) => write!(f, "Remote({})", remote.url()),
        }
    }
}

/// A route's JWT rules, with their keys loaded.
#[derive(Debug)]
pub struct Jwt {
    pub keys: Keys,
    /// One prepared validation per allowed algorithm.
    pub validations: Vec<(Algorithm, Validation)>,
    pub from: Vec<Source>,
    /// (claim, header name).
    pub claims_to_headers: Vec<(String, String)>,
    pub close_on_expiry: bool,
    pub leeway: Duration,
}

/// A verified token's claims, and when the token stops being valid (its `exp` plus the leeway).
pub struct Verified {
    pub claims: Map<String, Value>,
    pub expires: Option<SystemTime>,
}

/// The rules shared by every allowed algorithm: issuer, audience, leeway; `exp` required, `nbf` checked.
pub fn validation(alg: Algorithm, issuer: Option<&str>, audience: Option<&str>, leeway: Duration) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway.as_secs();
    v.validate_nbf = true;
    if let Some(issuer) = issuer {
        v.set_issuer(&[issuer]);
        v.set_required_spec_claims(&["exp", "iss"]);
    }
    match audience {
        Some(audience) => {
            v.set_audience(&[audience]);
            let mut required: Vec<&str> = vec!["exp", "aud"];
            if issuer.is_some() {
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
        }
        // Without a configured audience a token's `aud` is not looked at (jsonwebtoken would refuse any).
        None => v.validate_aud = false,
    }
    v
}

/// The parts of a token's header wsgate decides on before any key is touched.
struct Head {
    alg: String,
    kid: Option<String>,
}

fn read_head(token: &str) -> Result<Head, TokenError> {
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    let Ok(Value::Object(head)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(TokenError::HeaderNotJson);
    };
    let Some(Value::String(alg)) = head.get("alg") else {
        return Err(TokenError::Malformed("header has no alg"));
    };
    let kid = match head.get("kid") {
        Some(Value::String(kid)) => Some(kid.clone()),
        None => None,
        Some(_) => return Err(TokenError::Malformed("kid is not a string")),
    };
    Ok(Head { alg: alg.clone(), kid })
}

impl Jwt {
    /// Verifies `token`: header, algorithm, key, signature and claims.
    pub fn verify(&self, token: &[u8]) -> Result<Verified, TokenError> {
        let token = std::str::from_utf8(token).map_err(|_| TokenError::Malformed("not ASCII"))?;
        let head = read_head(token)?;
        if head.alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone);
        }
        let alg = Algorithm::from_str(&head.alg).map_err(|_| TokenError::AlgorithmNotAllowed(logged(&head.alg)))?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == alg) else {
            return Err(TokenError::AlgorithmNotAllowed(logged(&head.alg)));
        };
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
                .map(|data| data.claims)
                .map_err(|e| TokenError::from_jwt(&e))
        };
        let claims = match &self.keys {
            Keys::Secret(key) | Keys::Public(key) => decode(key)?,
            Keys::Set(set) => set.verify(head.kid.as_deref(), alg, None, decode)?,
            Keys::Remote(remote) => remote.keys().verify(head.kid.as_deref(), alg, Some(remote), decode)?,
        };
        // jsonwebtoken takes a fractional `exp` too (rounded): so does the expiry the session is closed at.
        let expires = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_u64().or_else(|| {
                    exp.as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(|f| f.round() as u64)
                })
            })
            .and_then(|exp| UNIX_EPOCH.checked_add(Duration::from_secs(exp)))
            .and_then(|exp| exp.checked_add(self.leeway));
        Ok(Verified { claims, expires })
    }

    /// The identity headers for verified claims: each configured claim that is a string or a number, as a header
    /// value with no control characters.
    pub fn identity(&self, claims: &Map<String, Value>) -> Vec<(String, String)> {
        self.claims_to_headers
            .iter()
            .filter_map(|(claim, header)| {
                let value = match claims.get(claim)? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                let clean = value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
                clean.then(|| (header.clone(), value))
            })
            .collect()
    }
}

/// Which kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Hmac => "HMAC",
            Family::Rsa => "RSA",
            Family::Ec => "EC",
            Family::Ed => "Ed25519",
        }
    }
}

pub fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
    }
}

impl Keys {
    /// An HMAC secret: the file's bytes, less one trailing newline (`\n` or `\r\n`).
    pub fn secret_file(path: &Path) -> Result<Keys, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
        let secret = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(&bytes);
        if secret.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Keys::Secret(DecodingKey::from_secret(secret)))
    }

    /// A PEM public key of the kind `family` names.
    pub fn public_key_file(path: &Path, family: Family) -> Result<Keys, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
        let key = match family {
            Family::Rsa => DecodingKey::from_rsa_pem(&pem),
            Family::Ec => DecodingKey::from_ec_pem(&pem),
            Family::Ed => DecodingKey::from_ed_pem(&pem),
            Family::Hmac => return Err("a public key cannot verify HS (HMAC) tokens: use secret_file".into()),
        };
        let key = key.map_err(|e| format!("not a PEM {} public key: {e}", family.name()))?;
        Ok(Keys::Public(key))
    }

    /// A JWK set file.
    pub fn jwks_file(path: &Path) -> Result<Keys, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
        KeySet::parse(&bytes).map(Keys::Set).map_err(|e| e.to_string())
    }

    /// A JWKS URL, fetched once wsgate runs.
    pub fn jwks_url(url: &str, ca: Option<&std::path::Path>) -> Result<Keys, String> {
        Remote::new(url, ca).map(|r| Keys::Remote(Arc::new(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn headers_are_read_before_any_key() {
        let token = |head: &str| format!("{}.{}.sig", b64(head), b64("{}"));
        assert!(matches!(read_head(&token("not json")), Err(TokenError::HeaderNotJson)));
        assert!(matches!(read_head(&token("[1]")), Err(TokenError::HeaderNotJson)));
        assert!(matches!(read_head("a.b"), Err(TokenError::Malformed(_))));
        assert!(matches!(
            read_head(&token("{\"typ\":\"JWT\"}")),
            Err(TokenError::Malformed(_))
        ));
        let head = read_head(&token("{\"alg\":\"ES256\",\"kid\":\"k1\"}")).expect("a header");
        assert_eq!((head.alg.as_str(), head.kid.as_deref()), ("ES256", Some("k1")));
    }
}
