//! Header rewriting shared by both request paths (the upgrade fast path on raw `httparse` headers and the
//! plain-HTTP path on `http::HeaderMap`): which headers are hop-by-hop (RFC 9110 §7.6.1), which forwarding
//! headers a client may not set, and the forwarding headers wsgate adds.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Hop-by-hop headers that never cross the proxy (RFC 9110 §7.6.1, plus the obsolete `Proxy-Connection`).
/// `Upgrade` is listed too: the upgrade path writes its own `Connection: Upgrade` / `Upgrade: websocket` pair.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwarding headers wsgate writes itself; a client's values are dropped.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// Headers a `Connection` token may not remove: without them the request would no longer be the one the
/// client made (a client naming `Host` or its WebSocket key in `Connection` must not strip them).
const PROTECTED: [&str; 2] = ["host", "sec-websocket-"];

fn eq_name(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

/// Whether a comma-separated header value holds `token` (case-insensitive, surrounding whitespace ignored).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn is_protected(name: &[u8]) -> bool {
    PROTECTED
        .iter()
        .any(|p| name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

/// Whether a request header is meant for a proxy (`Proxy-Authorization`, `Proxy-Connection` and every other
/// `Proxy-*`, and `Proxy`, which CGI servers turn into `HTTP_PROXY`): wsgate is no forward proxy, so they are the
/// client's credentials or hop-by-hop orders and never reach a backend.
fn is_proxy_header(name: &[u8]) -> bool {
    eq_name(name, "proxy") || name.get(..6).is_some_and(|p| eq_name(p, "proxy-"))
}

/// Whether a request or response header must be dropped when forwarding: hop-by-hop, named in one of the
/// message's `Connection` values, or (for requests) a `Proxy-*` header or a forwarding header wsgate replaces.
pub(crate) fn drop_when_forwarding<'a>(
    name: &[u8],
    connection_values: impl IntoIterator<Item = &'a [u8]>,
    is_request: bool,
) -> bool {
    if HOP_BY_HOP.iter().any(|h| eq_name(name, h)) {
        return true;
    }
    if is_request && (is_proxy_header(name) || FORWARDING.iter().any(|h| eq_name(name, h))) {
        return true;
    }
    if is_protected(name) {
        return false;
    }
    let name = std::str::from_utf8(name).unwrap_or("");
    !name.is_empty() && connection_values.into_iter().any(|v| has_token(v, name))
}

/// What the forwarding headers say about the client's request.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    pub client_ip: IpAddr,
    /// `http` or `https`: the scheme the client used to reach wsgate.
    pub proto: &'static str,
    /// The client's `Host` header, when it sent one.
    pub host: Option<&'a [u8]>,
}

impl Forwarding<'_> {
    /// Calls `add(name, value)` for each forwarding header, in a fixed order.
    pub(crate) fn each(&self, mut add: impl FnMut(&'static str, &[u8])) {
        let mut ip = String::with_capacity(48);
        let _ = write!(ip, "{}", self.client_ip);
        add("X-Forwarded-For", ip.as_bytes());
        add("X-Forwarded-Proto", self.proto.as_bytes());
        if let Some(host) = self.host {
            add("X-Forwarded-Host", host);
        }
        add("X-Real-IP", ip.as_bytes());
        add("Forwarded", &self.rfc7239());
    }

    /// RFC 7239 `Forwarded: for=...;proto=...;host="..."` (IPv6 addresses quoted and bracketed, the host
    /// always a quoted-string).
    fn rfc7239(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        match self.client_ip {
            IpAddr::V4(ip) => out.extend_from_slice(format!("for={ip}").as_bytes()),
            IpAddr::V6(ip) => out.extend_from_slice(format!("for=\"[{ip}]\"").as_bytes()),
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(self.proto.as_bytes());
        if let Some(host) = self.host {
            out.extend_from_slice(b";host=\"");
            for &b in host {
                if b == b'"' || b == b'\\' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'"');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_case_insensitive_and_trimmed() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!has_token(b"keep-alive, Upgrades", "upgrade"));
    }

    #[test]
    fn connection_named_headers_drop_but_not_protected_ones() {
        let conn: [&[u8]; 1] = [b"X-Secret, Host, Sec-WebSocket-Key"];
        assert!(drop_when_forwarding(b"x-secret", conn, true));
        assert!(!drop_when_forwarding(b"Host", conn, true));
        assert!(!drop_when_forwarding(b"Sec-WebSocket-Key", conn, true));
        assert!(drop_when_forwarding(b"TE", [], true));
        assert!(drop_when_forwarding(b"X-Real-IP", [], true));
        assert!(!drop_when_forwarding(b"X-Real-IP", [], false));
        for name in ["Proxy-Authorization", "proxy-connection", "PROXY-Foo", "Proxy"] {
            assert!(drop_when_forwarding(name.as_bytes(), [], true), "{name}");
        }
        assert!(!drop_when_forwarding(b"Proxyish", [], true));
        assert!(!drop_when_forwarding(b"Proxy-Authenticate", [], false));
    }

    #[test]
    fn rfc7239_quotes_ipv6_and_host() {
        let f = Forwarding {
            client_ip: "::1".parse().unwrap(),
            proto: "http",
            host: Some(b"a\"b:80"),
        };
        assert_eq!(f.rfc7239(), b"for=\"[::1]\";proto=http;host=\"a\\\"b:80\"");
    }
}
