//! The `[route.auth]` keys (`[route.auth.jwt]`, `[route.auth.api_keys]`): checked like every other key, and their
//! key files read and parsed here, when the config is built, so that `wsgate check` and a reload name a missing or
//! bad file as they name any other problem. A relative file path is read from the config file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use toml::Spanned;

use super::{Dur, Report, is_token};
use crate::auth::api_keys::ApiKeys;
use crate::auth::jwt::{self, Family, Jwt, Keys, Source};
use crate::auth::{self, Auth};
use crate::config::{HandshakeRate, IdentityLimits, MAX_HANDSHAKE_RATE, Relay};

/// Default leeway for `exp` and `nbf`: clocks of issuers and wsgate may differ by this much.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default header an API key is sent in.
pub const DEFAULT_API_KEY_HEADER: &str = "X-API-Key";
/// Default header the identity is forwarded in: `sub` of a token, the name of an API key.
pub const DEFAULT_IDENTITY_HEADER: &str = "X-Auth-Subject";
/// The claim forwarded by default.
const DEFAULT_CLAIM: &str = "sub";

/// Headers an identity header may not be: they carry the request itself.
const RESERVED_HEADERS: [&str; 8] = [
    "host",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "cookie",
    "authorization",
    "sec-websocket-",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    jwt: Option<Spanned<RawJwt>>,
    api_keys: Option<Spanned<RawApiKeys>>,
    max_connections_per_identity: Option<Spanned<u32>>,
    handshakes_per_second_per_identity: Option<Spanned<u32>>,
    identity_burst: Option<Spanned<u32>>,
    on_redis_down: Option<super::RawOnRedisDown>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    secret_file: Option<Spanned<String>>,
    public_key_file: Option<Spanned<String>>,
    jwks_file: Option<Spanned<String>>,
    jwks_url: Option<Spanned<String>>,
    jwks_ca: Option<Spanned<String>>,
    algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    issuer: Option<Spanned<String>>,
    audience: Option<Spanned<String>>,
    from: Option<Spanned<Vec<Spanned<String>>>>,
    claims_to_headers: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    close_on_expiry: Option<Spanned<bool>>,
    leeway: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKeys {
    file: Spanned<String>,
    header: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    identity_header: Option<Spanned<String>>,
}

/// A route's `auth` table, its files read.
pub(super) fn build(raw: Option<&Spanned<RawAuth>>, relay: &Relay, report: &mut Report<'_>) -> Option<Arc<Auth>> {
    let raw = raw?;
    let a = raw.get_ref();
    if a.jwt.is_none() && a.api_keys.is_none() {
        report.key(raw, "auth", "needs [route.auth.jwt] or [route.auth.api_keys] (or both)");
        return None;
    }
    let jwt = a.jwt.as_ref().and_then(|j| build_jwt(j, relay, report));
    let api_keys = a.api_keys.as_ref().and_then(|k| build_api_keys(k.get_ref(), report));
    let limits = build_identity_limits(a, report);
    let complete = a.jwt.is_some() == jwt.is_some() && a.api_keys.is_some() == api_keys.is_some();
    complete.then(|| {
        let mut auth = Auth::new(jwt, api_keys);
        auth.limits = limits;
        Arc::new(auth)
    })
}

/// `max_connections_per_identity`, `handshakes_per_second_per_identity` with its `identity_burst` (one second's
/// worth when not given), and `on_redis_down`.
fn build_identity_limits(a: &RawAuth, report: &mut Report<'_>) -> IdentityLimits {
    let max_connections = super::limited(
        &a.max_connections_per_identity,
        "auth.max_connections_per_identity",
        1..=u32::MAX,
        report,
    );
    let rate = super::limited(
        &a.handshakes_per_second_per_identity,
        "auth.handshakes_per_second_per_identity",
        1..=MAX_HANDSHAKE_RATE,
        report,
    );
    if let (Some(burst), None) = (&a.identity_burst, rate) {
        report.key(
            burst,
            "auth.identity_burst",
            "applies only with `handshakes_per_second_per_identity`",
        );
    }
    IdentityLimits {
        max_connections,
        rate: rate.map(|per_second| HandshakeRate {
            per_second,
            burst: a.identity_burst.as_ref().map_or(per_second, |b| *b.get_ref()),
        }),
        on_redis_down: a.on_redis_down.map(Into::into),
    }
}

/// A key file's path: relative ones from the config file's folder.
fn resolve(report: &Report<'_>, file: &str) -> PathBuf {
    let path = Path::new(file);
    match Path::new(report.file).parent() {
        Some(dir) if path.is_relative() && !dir.as_os_str().is_empty() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

fn build_jwt(raw: &Spanned<RawJwt>, relay: &Relay, report: &mut Report<'_>) -> Option<Jwt> {
    let j = raw.get_ref();
    let algorithms = build_algorithms(raw, report)?;
    let families: Vec<Family> = algorithms.iter().map(|&a| jwt::family(a)).collect();
    let hmac = families.contains(&Family::Hmac);
    if hmac && families.iter().any(|&f| f != Family::Hmac) {
        report.key(
            raw,
            "auth.jwt.algorithms",
            "mixes HS (HMAC) with public-key algorithms: a route verifies with one kind of key",
        );
        return None;
    }
    let sources: Vec<(&str, &Spanned<String>)> = [
        ("secret_file", &j.secret_file),
        ("public_key_file", &j.public_key_file),
        ("jwks_file", &j.jwks_file),
        ("jwks_url", &j.jwks_url),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let [(kind, value)] = sources[..] else {
        report.key(
            raw,
            "auth.jwt",
            "needs exactly one of `secret_file`, `public_key_file`, `jwks_file` and `jwks_url`",
        );
        return None;
    };
    if let (Some(ca), false) = (&j.jwks_ca, kind == "jwks_url") {
        report.key(ca, "auth.jwt.jwks_ca", "applies with `jwks_url` only");
        return None;
    }
    let key_name = format!("auth.jwt.{kind}");
    let path = resolve(report, value.get_ref());
    let keys = match kind {
        "secret_file" if !hmac => Err("a secret verifies HS256/384/512 only: `algorithms` lists others".into()),
        "secret_file" => Keys::secret_file(&path),
        "public_key_file" if hmac => Err("a public key cannot verify HS (HMAC) tokens: use secret_file".into()),
        "public_key_file" => match families[..] {
            [first, ref rest @ ..] if rest.iter().all(|&f| f == first) => Keys::public_key_file(&path, first),
            _ => Err("one public key verifies one kind of algorithm: `algorithms` mixes RSA, EC and EdDSA".into()),
        },
        "jwks_file" => Keys::jwks_file(&path),
        _ => {
            let ca = j.jwks_ca.as_ref().map(|ca| resolve(report, ca.get_ref()));
            Keys::jwks_url(value.get_ref(), ca.as_deref())
        }
    };
    let keys = match keys {
        Ok(keys) => keys,
        Err(why) if kind == "jwks_url" => {
            report.key(value, &key_name, why);
            return None;
        }
        Err(why) => {
            report.key(value, &key_name, format!("{}: {why}", path.display()));
            return None;
        }
    };
    let leeway = j.leeway.as_ref().map_or(DEFAULT_LEEWAY, |l| l.get_ref().0);
    let close_on_expiry = j.close_on_expiry.as_ref().is_some_and(|c| *c.get_ref());
    if close_on_expiry && matches!(relay, Relay::Tunnel(_)) {
        if let Some(c) = &j.close_on_expiry {
            report.key(
                c,
                "auth.jwt.close_on_expiry",
                "needs relay = \"frames\" (a tunnel cannot send a close frame)",
            );
        }
        return None;
    }
    let issuer = j.issuer.as_ref().map(|i| i.get_ref().as_str());
    let audience = j.audience.as_ref().map(|a| a.get_ref().as_str());
    Some(Jwt {
        keys,
        validations: algorithms
            .iter()
            .map(|&alg| (alg, jwt::validation(alg, issuer, audience, leeway)))
            .collect(),
        from: build_from(j, report)?,
        claims_to_headers: build_claims(j, report)?,
        close_on_expiry,
        leeway,
    })
}

fn build_algorithms(raw: &Spanned<RawJwt>, report: &mut Report<'_>) -> Option<Vec<Algorithm>> {
    let Some(list) = &raw.get_ref().algorithms else {
        report.key(
            raw,
            "auth.jwt.algorithms",
            "is required: the algorithms tokens may be signed with, e.g. [\"ES256\"]",
        );
        return None;
    };
    if list.get_ref().is_empty() {
        report.key(list, "auth.jwt.algorithms", "is empty: list at least one algorithm");
        return None;
    }
    let mut algorithms = Vec::new();
    for name in list.get_ref() {
        match name.get_ref().parse::<Algorithm>() {
            Ok(alg) => algorithms.push(alg),
            Err(_) if name.get_ref().eq_ignore_ascii_case("none") => {
                report.key(name, "auth.jwt.algorithms", "`none` (unsigned tokens) is never allowed");
            }
            Err(_) => report.key(
                name,
                "auth.jwt.algorithms",
                format!(
                    "unknown algorithm `{}`: expected HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, \
                     ES256, ES384 or EdDSA",
                    name.get_ref()
                ),
            ),
        }
    }
    (algorithms.len() == list.get_ref().len()).then_some(algorithms)
}

fn build_from(j: &RawJwt, report: &mut Report<'_>) -> Option<Vec<Source>> {
    let Some(list) = &j.from else {
        return Some(vec![Source::Bearer]);
    };
    if list.get_ref().is_empty() {
        report.key(
            list,
            "auth.jwt.from",
            "is empty: leave it out to read `Authorization: Bearer`",
        );
        return None;
    }
    let mut sources = Vec::new();
    for entry in list.get_ref() {
        let source = match entry.get_ref().split_once(':') {
            None if entry.get_ref() == "bearer" => Some(Source::Bearer),
            None if entry.get_ref() == "subprotocol" => Some(Source::Subprotocol),
            Some(("cookie", name)) if is_token(name) => Some(Source::Cookie(name.into())),
            Some(("query", name)) if !name.is_empty() => Some(Source::Query(name.into())),
            _ => None,
        };
        match source {
            Some(s) => sources.push(s),
            None => report.key(
                entry,
                "auth.jwt.from",
                format!(
                    "`{}`: expected bearer, cookie:NAME, query:NAME or subprotocol",
                    entry.get_ref()
                ),
            ),
        }
    }
    let cookies = sources.iter().filter(|s| matches!(s, Source::Cookie(_))).count();
    if cookies > 1 {
        report.key(list, "auth.jwt.from", "names more than one cookie");
        return None;
    }
    (sources.len() == list.get_ref().len()).then_some(sources)
}

fn build_claims(j: &RawJwt, report: &mut Report<'_>) -> Option<Vec<(String, String)>> {
    let Some(map) = &j.claims_to_headers else {
        return Some(vec![(DEFAULT_CLAIM.into(), DEFAULT_IDENTITY_HEADER.into())]);
    };
    let mut claims = Vec::new();
    for (claim, header) in map.get_ref() {
        if let Err(why) = check_identity_header(header.get_ref()) {
            report.key(header, "auth.jwt.claims_to_headers", why);
            continue;
        }
        claims.push((claim.clone(), header.get_ref().clone()));
    }
    (claims.len() == map.get_ref().len()).then_some(claims)
}

fn check_identity_header(name: &str) -> Result<(), String> {
    if !is_token(name) {
        return Err(format!("`{name}` is not a valid header name"));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS
        .iter()
        .any(|r| lower.starts_with(r) && (r.ends_with('-') || lower == *r))
        || crate::http::headers::drop_when_forwarding(lower.as_bytes(), std::iter::empty(), true)
    {
        return Err(format!("`{name}` carries the request itself: pick another header"));
    }
    Ok(())
}

fn build_api_keys(k: &RawApiKeys, report: &mut Report<'_>) -> Option<ApiKeys> {
    let path = resolve(report, k.file.get_ref());
    let keys = match auth::api_keys::load(&path) {
        Ok(keys) => keys,
        Err(why) => {
            report.key(&k.file, "auth.api_keys.file", format!("{}: {why}", path.display()));
            return None;
        }
    };
    let mut ok = true;
    let header = k
        .header
        .as_ref()
        .map_or(DEFAULT_API_KEY_HEADER, |h| h.get_ref().as_str());
    if let (Some(h), Err(why)) = (&k.header, check_identity_header(header)) {
        report.key(h, "auth.api_keys.header", why);
        ok = false;
    }
    let identity_header = k
        .identity_header
        .as_ref()
        .map_or(DEFAULT_IDENTITY_HEADER, |h| h.get_ref().as_str());
    if let (Some(h), Err(why)) = (&k.identity_header, check_identity_header(identity_header)) {
        report.key(h, "auth.api_keys.identity_header", why);
        ok = false;
    }
    if let Some(q) = &k.query
        && q.get_ref().is_empty()
    {
        report.key(
            q,
            "auth.api_keys.query",
            "is empty: leave it out to read the header only",
        );
        ok = false;
    }
    ok.then(|| ApiKeys {
        keys,
        header: header.to_ascii_lowercase(),
        query: k.query.as_ref().map(|q| q.get_ref().clone()),
        identity_header: identity_header.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::file::parse;

    fn problems(auth: &str) -> Vec<String> {
        let dir = env!("CARGO_MANIFEST_DIR");
        let text = format!(
            "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n{auth}\n\
             [[upstream]]\nname = \"u\"\n[[upstream.server]]\naddress = \"127.0.0.1:1\"\n"
        )
        .replace("DIR", dir);
        match parse(&text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn key_sources_and_algorithms_must_fit_together() {
        let jwt = |keys: &str| problems(&format!("[route.auth.jwt]\n{keys}"));
        assert!(jwt("secret_file = \"DIR/tests/auth/hs.key\"\nalgorithms = [\"HS256\"]").is_empty());
        assert!(jwt("public_key_file = \"DIR/tests/auth/es.pub.pem\"\nalgorithms = [\"ES256\"]").is_empty());
        let mixed = jwt("public_key_file = \"DIR/tests/auth/rs.pub.pem\"\nalgorithms = [\"RS256\", \"HS256\"]");
        assert!(
            mixed[0].contains("mixes HS (HMAC) with public-key algorithms"),
            "{mixed:?}"
        );
        let hs_on_pem = jwt("public_key_file = \"DIR/tests/auth/rs.pub.pem\"\nalgorithms = [\"HS256\"]");
        assert!(
            hs_on_pem[0].contains("rs.pub.pem: a public key cannot verify HS"),
            "{hs_on_pem:?}"
        );
        let wrong_kind = jwt("public_key_file = \"DIR/tests/auth/rs.pub.pem\"\nalgorithms = [\"ES256\"]");
        assert!(
            wrong_kind[0].contains("rs.pub.pem: not a PEM EC public key"),
            "{wrong_kind:?}"
        );
        let none = jwt("secret_file = \"DIR/tests/auth/hs.key\"\nalgorithms = [\"none\"]");
        assert!(
            none[0].contains("`none` (unsigned tokens) is never allowed"),
            "{none:?}"
        );
        assert!(jwt("secret_file = \"DIR/tests/auth/hs.key\"")[0].contains("`auth.jwt.algorithms`: is required"));
        let two = jwt("secret_file = \"x\"\njwks_url = \"http://a/\"\nalgorithms = [\"HS256\"]");
        assert!(two[0].contains("exactly one of"), "{two:?}");
        let ftp = jwt("jwks_url = \"ftp://issuer/keys\"\nalgorithms = [\"RS256\"]");
        assert!(ftp[0].contains("only http:// and https:// URLs"), "{ftp:?}");
        let ca = jwt("jwks_url = \"https://issuer/keys\"\njwks_ca = \"missing.pem\"\nalgorithms = [\"RS256\"]");
        assert!(ca[0].contains("missing.pem: cannot read"), "{ca:?}");
        let from = jwt("secret_file = \"DIR/tests/auth/hs.key\"\nalgorithms = [\"HS256\"]\nfrom = [\"header:x\"]");
        assert!(from[0].contains("expected bearer, cookie:NAME"), "{from:?}");
        let host = jwt(
            "secret_file = \"DIR/tests/auth/hs.key\"\nalgorithms = [\"HS256\"]\nclaims_to_headers = { sub = \"Host\" }",
        );
        assert!(host[0].contains("carries the request itself"), "{host:?}");
    }

    #[test]
    fn close_on_expiry_needs_the_frames_relay() {
        let p = problems(
            "relay = \"tunnel\"\n[route.auth.jwt]\nsecret_file = \"DIR/tests/auth/hs.key\"\nalgorithms = [\"HS256\"]\n\
             close_on_expiry = true",
        );
        assert!(p[0].contains("needs relay = \"frames\""), "{p:?}");
        assert!(problems("[route.auth]\n")[0].contains("needs [route.auth.jwt] or [route.auth.api_keys]"));
    }
}
