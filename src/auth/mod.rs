//! Authentication at the handshake, per route: a JSON Web Token ([`jwt`], keys from a secret, a public key or a
//! key set: [`jwks`]) or an API key ([`api_keys`]), looked for where the route says ([`extract`]). [`Auth::check`]
//! takes a request as routing sees it and returns what the admitted request becomes ([`Admit`]: the identity
//! headers to add, the credentials to remove before forwarding, when the token expires, the key whose limits
//! count it) or why it is refused ([`AuthError`], a 401 through the session's one answer path).
//!
//! It reads nothing from sockets and keeps no counts: the session applies [`Admit`] to what it forwards, and the
//! per-key limits are counted with the other connection limits in `policy`.

pub mod api_keys;
pub mod extract;
pub mod jwks;
pub mod jwt;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use api_keys::{ApiKey, ApiKeys};
use jwt::{Jwt, Source, TokenError};

use crate::http::RequestView;

/// The realm every challenge names.
const REALM: &str = "wsgate";

/// A route's authentication: a token, an API key, or either (when both are configured, either one admits).
#[derive(Debug)]
pub struct Auth {
    pub jwt: Option<Jwt>,
    pub api_keys: Option<ApiKeys>,
    /// Limits per identity (`sub` of a token, or the API key's identity).
    pub limits: crate::config::IdentityLimits,
    /// What is removed from every forwarded request on the route whoever sent it: the identity headers (a client
    /// may not forge them) and every place a credential may travel in.
    strip: Strip,
}

/// What a forwarded request leaves out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Strip {
    /// Header names (lowercase) dropped.
    pub headers: Vec<String>,
    /// A cookie taken out of `Cookie`.
    pub cookie: Option<String>,
    /// Query parameters taken out of the target.
    pub query: Vec<String>,
    /// `bearer.` entries taken out of `Sec-WebSocket-Protocol`.
    pub bearer_protocol: bool,
}

/// What an admitted request becomes.
#[derive(Debug)]
pub struct Admit {
    /// Identity headers added (name as configured, value).
    pub identity: Vec<(String, String)>,
    pub strip: Strip,
    /// When the session is to be closed (`close_on_expiry`): the token's `exp` plus the leeway.
    pub expires: Option<SystemTime>,
    /// The API key that admitted the request, whose limits count it.
    pub key: Option<ApiKey>,
    /// Who the request was admitted as, for the access log: the token's `sub` claim (when a string), or the API
    /// key's identity.
    pub subject: Option<String>,
}

/// Why a request is not admitted. All of these are a 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: {}", missing(*.jwt, *.api_key))]
    Missing { jwt: bool, api_key: bool },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("API key not known")]
    UnknownKey,
}

fn missing(jwt: bool, api_key: bool) -> &'static str {
    match (jwt, api_key) {
        (true, true) => "neither a token nor an API key",
        (true, false) => "no token",
        _ => "no API key",
    }
}

impl AuthError {
    /// The `WWW-Authenticate` challenges of the 401 (RFC 6750 §3 for bearer tokens: `error` only when a token was
    /// sent).
    pub fn challenges(&self) -> Vec<Cow<'static, str>> {
        let bearer = format!("Bearer realm=\"{REALM}\"");
        let api_key = format!("ApiKey realm=\"{REALM}\"");
        match self {
            Self::Missing { jwt, api_key: key } => [(*jwt, bearer), (*key, api_key)]
                .into_iter()
                .filter_map(|(on, c)| on.then_some(Cow::Owned(c)))
                .collect(),
            Self::Token(_) => vec![format!("{bearer}, error=\"invalid_token\"").into()],
            Self::UnknownKey => vec![api_key.into()],
        }
    }

    /// The remote key set to refresh before trying the request again: the token names a key id it lacks.
    pub fn refresh(&self) -> Option<Arc<jwks::Remote>> {
        match self {
            Self::Token(TokenError::UnknownKid { remote, .. }) => remote.clone(),
            Self::Token(TokenError::NoKeysYet { remote }) => Some(remote.clone()),
            _ => None,
        }
    }
}

impl Auth {
    pub fn new(jwt: Option<Jwt>, api_keys: Option<ApiKeys>) -> Auth {
        let mut strip = Strip::default();
        if let Some(jwt) = &jwt {
            strip
                .headers
                .extend(jwt.claims_to_headers.iter().map(|(_, h)| h.to_ascii_lowercase()));
            for source in &jwt.from {
                match source {
                    Source::Cookie(name) => strip.cookie = Some(name.clone()),
                    Source::Query(name) => strip.query.push(name.clone()),
                    Source::Subprotocol => strip.bearer_protocol = true,
                    Source::Bearer => {}
                }
            }
        }
        if let Some(keys) = &api_keys {
            strip.headers.push(keys.identity_header.to_ascii_lowercase());
            strip.headers.push(keys.header.clone());
            strip.query.extend(keys.query.clone());
        }
        strip.headers.sort();
        strip.headers.dedup();
        Auth {
            jwt,
            api_keys,
            limits: crate::config::IdentityLimits::default(),
            strip,
        }
    }

    /// The query parameters this route reads a credential from (secrets wherever they are logged).
    pub fn query_names(&self) -> &[String] {
        &self.strip.query
    }

    /// Checks a request's credentials. `upgrade`: a WebSocket upgrade (only those may carry a token in
    /// `Sec-WebSocket-Protocol`).
    pub fn check(&self, req: &impl RequestView, upgrade: bool) -> Result<Admit, AuthError> {
        let mut error = None;
        if let Some(jwt) = &self.jwt
            && let Some(token) = find_token(jwt, req, upgrade)
        {
            match jwt.verify(&token) {
                Ok(verified) => {
                    let expires = verified.expires.filter(|_| jwt.close_on_expiry);
                    let mut admit = self.admit(req, jwt.identity(&verified.claims), expires, None);
                    admit.subject = verified.claims.get("sub").and_then(|s| s.as_str()).map(str::to_string);
                    return Ok(admit);
                }
                Err(e) => error = Some(AuthError::Token(e)),
            }
        }
        if let Some(keys) = &self.api_keys
            && let Some(presented) = find_key(keys, req)
        {
            match keys.lookup(&presented) {
                Some(key) => {
                    let identity = vec![(keys.identity_header.clone(), key.identity.clone())];
                    let mut admit = self.admit(req, identity, None, Some(key.clone()));
                    admit.subject = Some(key.identity.clone());
                    return Ok(admit);
                }
                None => error = error.or(Some(AuthError::UnknownKey)),
            }
        }
        Err(error.unwrap_or(AuthError::Missing {
            jwt: self.jwt.is_some(),
            api_key: self.api_keys.is_some(),
        }))
    }

    fn admit(
        &self,
        req: &impl RequestView,
        identity: Vec<(String, String)>,
        expires: Option<SystemTime>,
        key: Option<ApiKey>,
    ) -> Admit {
        let mut strip = self.strip.clone();
        // `Authorization` is the client's business unless it carried a token the route reads.
        let bearer = self.jwt.as_ref().is_some_and(|j| j.from.contains(&Source::Bearer));
        if bearer && req.header_values("authorization").any(|v| extract::bearer(v).is_some()) {
            strip.headers.push("authorization".into());
        }
        Admit {
            identity,
            strip,
            expires,
            key,
            subject: None,
        }
    }
}

/// The route's token, from the first place in `from` that has one.
fn find_token<'r>(jwt: &Jwt, req: &'r impl RequestView, upgrade: bool) -> Option<Cow<'r, [u8]>> {
    jwt.from.iter().find_map(|source| match source {
        Source::Bearer => req
            .header_values("authorization")
            .find_map(extract::bearer)
            .map(Cow::Borrowed),
        Source::Cookie(name) => req.cookie(name).map(Cow::Borrowed),
        Source::Query(name) => extract::query(req.target(), name),
        Source::Subprotocol if upgrade => req
            .header_values("sec-websocket-protocol")
            .find_map(extract::bearer_protocol)
            .map(Cow::Borrowed),
        Source::Subprotocol => None,
    })
}

/// The presented API key: its header first, then its query parameter.
fn find_key<'r>(keys: &ApiKeys, req: &'r impl RequestView) -> Option<Cow<'r, [u8]>> {
    if let Some(value) = req.header(&keys.header) {
        return Some(Cow::Borrowed(value.trim_ascii()));
    }
    extract::query(req.target(), keys.query.as_deref()?)
}

impl Admit {
    /// Applies the admission to a request forwarded through hyper: credentials and forged identity headers out,
    /// the identity in.
    pub fn rewrite<B>(&self, req: &mut http::Request<B>) {
        let strip = &self.strip;
        if !strip.query.is_empty()
            && let Some(pq) = req.uri().path_and_query()
            && let Cow::Owned(target) = extract::without_query(pq.as_str(), &strip.query)
        {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = target.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        let headers = req.headers_mut();
        let stripped: Vec<http::HeaderName> = headers
            .keys()
            .filter(|name| strip.headers.iter().any(|s| same_header(name.as_str(), s)))
            .cloned()
            .collect();
        for name in stripped {
            headers.remove(name);
        }
        if let Some(cookie) = &strip.cookie {
            rewrite_values(headers, http::header::COOKIE, |v| {
                crate::http::handshake::without_cookie(v, cookie)
            });
        }
        if strip.bearer_protocol {
            rewrite_values(
                headers,
                http::header::SEC_WEBSOCKET_PROTOCOL,
                extract::without_bearer_protocols,
            );
        }
        for (name, value) in &self.identity {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
    }
}

/// Replaces every value of a header by `f(value)`, dropping those left empty.
fn rewrite_values(headers: &mut http::HeaderMap, name: http::HeaderName, f: impl Fn(&[u8]) -> Vec<u8>) {
    let kept: Vec<http::HeaderValue> = headers
        .get_all(&name)
        .iter()
        .map(|v| f(v.as_bytes()))
        .filter(|v| !v.is_empty())
        .filter_map(|v| http::HeaderValue::from_bytes(&v).ok())
        .collect();
    headers.remove(&name);
    for v in kept {
        headers.append(&name, v);
    }
}

/// The JWKS URLs of a config's routes.
pub fn remotes(config: &crate::config::Config) -> Vec<std::sync::Arc<jwks::Remote>> {
    config
        .routes
        .iter()
        .filter_map(|r| match &r.auth.as_ref()?.jwt.as_ref()?.keys {
            jwt::Keys::Remote(remote) => Some(remote.clone()),
            _ => None,
        })
        .collect()
}

/// Whether two header names are the same to a backend: ASCII case aside, and with `_` as `-`, as CGI, WSGI, PHP
/// and many frameworks read them (`X_Auth_Subject` arrives as `HTTP_X_AUTH_SUBJECT`, as `X-Auth-Subject` does).
pub fn same_header(a: &str, b: &str) -> bool {
    let norm = |c: u8| if c == b'_' { b'-' } else { c.to_ascii_lowercase() };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| norm(x) == norm(y))
}
