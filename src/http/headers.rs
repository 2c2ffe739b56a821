//! Header rewriting shared by both request paths (the upgrade fast path on raw `httparse` headers and the
//! plain-HTTP path on `http::HeaderMap`): which headers are hop-by-hop (RFC 9110 §7.6.1), which forwarding
//! headers a client may not set, and the forwarding headers wsgate adds.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::forwarded::Relayed;

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
    /// The client (`X-Real-IP`): the peer, or the client a trusted peer's chain names.
    pub client_ip: IpAddr,
    /// Where the request came from (the TCP peer or a PROXY protocol source): the hop appended to the chains.
    pub peer: IpAddr,
    /// `http` or `https`: the scheme the client used to reach wsgate.
    pub proto: &'static str,
    /// The client's `Host` header, when it sent one.
    pub host: Option<&'a [u8]>,
    /// What a trusted peer sent: its chains go on with the peer appended, its proto and host as they are.
    pub relayed: Option<&'a Relayed>,
}

impl Forwarding<'_> {
    /// Calls `add(name, value)` for each forwarding header, in a fixed order.
    pub(crate) fn each(&self, mut add: impl FnMut(&'static str, &[u8])) {
        let relayed = self.relayed;
        let mut peer = String::with_capacity(48);
        let _ = write!(peer, "{}", self.peer);
        let xff = relayed.map(|r| &r.x_forwarded_for[..]);
        add_appended(&mut add, "X-Forwarded-For", xff, peer.as_bytes());
        match relayed.and_then(|r| r.proto.as_deref()) {
            Some(proto) => add("X-Forwarded-Proto", proto),
            None => add("X-Forwarded-Proto", self.proto.as_bytes()),
        }
        if let Some(host) = relayed.and_then(|r| r.host.as_deref()).or(self.host) {
            add("X-Forwarded-Host", host);
        }
        let mut ip = String::with_capacity(48);
        let _ = write!(ip, "{}", self.client_ip);
        add("X-Real-IP", ip.as_bytes());
        let forwarded = relayed.map(|r| &r.forwarded[..]);
        add_appended(&mut add, "Forwarded", forwarded, &self.rfc7239());
    }

    /// RFC 7239 `Forwarded: for=...;proto=...;host="..."` for the hop from the peer (IPv6 addresses quoted and
    /// bracketed, the host always a quoted-string).
    fn rfc7239(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        match self.peer {
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

/// Adds a chain as a trusted peer sent it with `hop` appended; `hop` alone when there is none.
fn add_appended(add: &mut impl FnMut(&'static str, &[u8]), name: &'static str, chain: Option<&[u8]>, hop: &[u8]) {
    match chain.filter(|c| !c.is_empty()) {
        Some(chain) => add(name, &[chain, b", ", hop].concat()),
        None => add(name, hop),
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
            peer: "::1".parse().unwrap(),
            proto: "http",
            host: Some(b"a\"b:80"),
            relayed: None,
        };
        assert_eq!(f.rfc7239(), b"for=\"[::1]\";proto=http;host=\"a\\\"b:80\"");
    }

    fn headers(f: &Forwarding<'_>) -> Vec<String> {
        let mut out = Vec::new();
        f.each(|name, value| out.push(format!("{name}: {}", String::from_utf8_lossy(value))));
        out
    }

    #[test]
    fn a_trusted_peers_chains_go_on_and_its_proto_and_host_stay() {
        let relayed = Relayed {
            x_forwarded_for: b"198.51.100.7, 10.1.1.1".to_vec(),
            forwarded: b"for=198.51.100.7;proto=https".to_vec(),
            proto: Some(b"https".to_vec()),
            host: Some(b"public.example".to_vec()),
        };
        let f = Forwarding {
            client_ip: "198.51.100.7".parse().unwrap(),
            peer: "10.0.0.1".parse().unwrap(),
            proto: "http",
            host: Some(b"inner:8080"),
            relayed: Some(&relayed),
        };
        assert_eq!(
            headers(&f),
            [
                "X-Forwarded-For: 198.51.100.7, 10.1.1.1, 10.0.0.1",
                "X-Forwarded-Proto: https",
                "X-Forwarded-Host: public.example",
                "X-Real-IP: 198.51.100.7",
                "Forwarded: for=198.51.100.7;proto=https, for=10.0.0.1;proto=http;host=\"inner:8080\"",
            ]
        );
        let direct = Forwarding {
            relayed: None,
            client_ip: f.peer,
            ..f
        };
        assert_eq!(
            headers(&direct),
            [
                "X-Forwarded-For: 10.0.0.1",
                "X-Forwarded-Proto: http",
                "X-Forwarded-Host: inner:8080",
                "X-Real-IP: 10.0.0.1",
                "Forwarded: for=10.0.0.1;proto=http;host=\"inner:8080\"",
            ]
        );
    }
}
