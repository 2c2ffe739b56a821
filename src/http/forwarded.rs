//! Who a request comes from when proxies stand in front of wsgate. From a peer in the listener's
//! `trusted_proxies`, the `X-Forwarded-For` chain (or, without one, the `for=` nodes of RFC 7239 `Forwarded`) names
//! the client: the rightmost address that is not itself a trusted proxy. From any other peer the peer is the client,
//! and what it says about forwarding is dropped (see [`super::headers`], which writes the headers forwarded).
//! Pure: headers in, a [`Client`] out; the session logs what was ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::TrustedProxies;

use super::headers::Forwarding;

/// The longest ignored chain entry kept for the log line, in bytes.
const MAX_ECHOED: usize = 64;

impl TrustedProxies {
    /// Whether `ip` is one of the trusted proxies (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The forwarding headers a trusted peer sent, each header's lines joined with `, ` (RFC 9110 §5.3): kept to be
/// passed on, its chains with the peer appended.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Relayed {
    pub x_forwarded_for: Vec<u8>,
    pub forwarded: Vec<u8>,
    pub proto: Option<Vec<u8>>,
    pub host: Option<Vec<u8>>,
}

/// A request's client, as far as wsgate can tell.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Client {
    /// The client: the peer itself, or the one a trusted peer's chain names. Route rules, the handshake rate, the
    /// server choice and the access log read it; it is sent as `X-Real-IP`.
    pub ip: IpAddr,
    /// Where the request came from: the TCP peer, or the source of a PROXY protocol header. Appended to the
    /// forwarded chains.
    pub peer: IpAddr,
    /// What a trusted peer sent (`None` from any other peer, or when it sent none).
    pub relayed: Option<Box<Relayed>>,
    /// The first chain entry that named no address and was passed over, for a debug log line.
    pub ignored: Option<String>,
}

impl Client {
    /// A request whose peer is its client: nothing the request says about forwarding is believed.
    pub fn direct(peer: IpAddr) -> Client {
        Client {
            ip: peer,
            peer,
            relayed: None,
            ignored: None,
        }
    }

    /// The client of a request from `peer` with these header lines (name, value).
    pub fn of<'a>(
        peer: IpAddr,
        trusted: &TrustedProxies,
        headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Client {
        if !trusted.contains(peer) {
            return Client::direct(peer);
        }
        let mut relayed = Relayed::default();
        for (name, value) in headers {
            let joined = if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                &mut relayed.x_forwarded_for
            } else if name.eq_ignore_ascii_case(b"forwarded") {
                &mut relayed.forwarded
            } else if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
                relayed.proto.get_or_insert_default()
            } else if name.eq_ignore_ascii_case(b"x-forwarded-host") {
                relayed.host.get_or_insert_default()
            } else {
                continue;
            };
            join(joined, value);
        }
        let mut client = Client::direct(peer);
        client.ip = derive(peer, trusted, &relayed, &mut client.ignored);
        if relayed != Relayed::default() {
            client.relayed = Some(Box::new(relayed));
        }
        client
    }

    /// The forwarding headers for a request of this client that reached wsgate over `proto` with this `Host`.
    pub fn forwarding<'a>(&'a self, proto: &'static str, host: Option<&'a [u8]>) -> Forwarding<'a> {
        Forwarding {
            client_ip: self.ip,
            peer: self.peer,
            proto,
            host,
            relayed: self.relayed.as_deref(),
        }
    }
}

fn join(out: &mut Vec<u8>, value: &[u8]) {
    let value = value.trim_ascii();
    if value.is_empty() {
        return;
    }
    if !out.is_empty() {
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(value);
}

/// A node of a forwarded chain (RFC 7239 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Ip(IpAddr),
    /// `unknown`, an obfuscated `_identifier`, or no `for=` at all: a hop that names no address.
    Unnamed,
    Malformed,
}

/// The client a trusted `peer`'s chain names: walking from the right, the first address that is not a trusted
/// proxy; when every address is one, the leftmost; with no address at all, the peer. An entry naming no address
/// (`unknown`, an obfuscated `_name`, garbage) ends the walk at the trusted hop to its right (or the peer): what is
/// left of it was written by whoever that hop could not name, the client itself perhaps, and is not believed. The
/// entry is noted in `ignored`.
fn derive(peer: IpAddr, trusted: &TrustedProxies, relayed: &Relayed, ignored: &mut Option<String>) -> IpAddr {
    let mut nodes = Vec::new();
    if !relayed.x_forwarded_for.is_empty() {
        for entry in relayed.x_forwarded_for.split(|&b| b == b',') {
            nodes.push((node(entry.trim_ascii()), entry));
        }
    } else {
        for element in split_outside_quotes(&relayed.forwarded, b',') {
            nodes.push(for_node(element));
        }
    }
    let mut leftmost = peer;
    for (node, text) in nodes.into_iter().rev() {
        match node {
            Node::Ip(ip) if !trusted.contains(ip) => return ip,
            Node::Ip(ip) => leftmost = ip,
            Node::Unnamed | Node::Malformed => {
                let text = String::from_utf8_lossy(text);
                *ignored = Some(text.trim().chars().take(MAX_ECHOED).collect());
                return leftmost;
            }
        }
    }
    leftmost
}

/// The node of a `Forwarded` element's `for=` (an element without one, or with two, names none), with the
/// element's text.
fn for_node(element: &[u8]) -> (Node, &[u8]) {
    let mut found = None;
    for pair in split_outside_quotes(element, b';') {
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            return (Node::Malformed, element);
        };
        let (name, value) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
        if !name.eq_ignore_ascii_case(b"for") {
            continue;
        }
        if found.is_some() {
            return (Node::Malformed, element);
        }
        found = Some(match unquote(value) {
            Some(value) => node(&value),
            None => Node::Malformed,
        });
    }
    (found.unwrap_or(Node::Unnamed), element)
}

/// `value`, or the content of a quoted-string (RFC 9110 §5.6.4, backslash escapes undone); `None` for an
/// unterminated one.
fn unquote(value: &[u8]) -> Option<Vec<u8>> {
    let Some(inner) = value.strip_prefix(b"\"") else {
        return Some(value.to_vec());
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => out.push(*bytes.next()?),
            b'"' => return bytes.as_slice().is_empty().then_some(out),
            _ => out.push(b),
        }
    }
    None
}

/// Splits at `sep` where it stands outside a quoted-string.
fn split_outside_quotes(text: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, &b) in text.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                _ if b == sep && !quoted => {
                    rest = text.get(i + 1..);
                    return Some(&text[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(text)
    })
}

/// A chain entry as `X-Forwarded-For` and `Forwarded`'s `for=` write one: an IPv4 address or an IPv6 one, bare or
/// in brackets, either with a port (a number, or an obfuscated `_port`); `unknown`; an obfuscated `_identifier`.
fn node(text: &[u8]) -> Node {
    let Ok(text) = std::str::from_utf8(text) else {
        return Node::Malformed;
    };
    if text.eq_ignore_ascii_case("unknown") || text.starts_with('_') {
        return Node::Unnamed;
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Node::Ip(ip.to_canonical());
    }
    let ip = match text.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').and_then(|(ip, port)| {
            let ip = ip.parse::<Ipv6Addr>().ok()?;
            (port.is_empty() || port.strip_prefix(':').is_some_and(is_port)).then_some(IpAddr::V6(ip))
        }),
        None => text.rsplit_once(':').and_then(|(ip, port)| {
            let ip = ip.parse::<Ipv4Addr>().ok()?;
            is_port(port).then_some(IpAddr::V4(ip))
        }),
    };
    ip.map_or(Node::Malformed, |ip| Node::Ip(ip.to_canonical()))
}

/// A port in a chain entry: 1 to 5 digits up to 65535, or obfuscated (`_` and letters, digits, `.`, `_`, `-`).
fn is_port(text: &str) -> bool {
    match text.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => {
            !text.is_empty()
                && text.len() <= 5
                && text.bytes().all(|b| b.is_ascii_digit())
                && text.parse::<u16>().is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(peer: &str, headers: &[(&str, &str)]) -> Client {
        let proxies = trusted(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        Client::of(
            ip(peer),
            &proxies,
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test]
    fn nodes_in_every_written_form() {
        for (text, want) in [
            ("192.0.2.1", Node::Ip(ip("192.0.2.1"))),
            ("192.0.2.1:4711", Node::Ip(ip("192.0.2.1"))),
            ("192.0.2.1:_port", Node::Ip(ip("192.0.2.1"))),
            ("2001:db8::1", Node::Ip(ip("2001:db8::1"))),
            ("[2001:db8::1]", Node::Ip(ip("2001:db8::1"))),
            ("[2001:db8::1]:4711", Node::Ip(ip("2001:db8::1"))),
            ("::ffff:192.0.2.1", Node::Ip(ip("192.0.2.1"))),
            ("unknown", Node::Unnamed),
            ("UNKNOWN", Node::Unnamed),
            ("_hidden", Node::Unnamed),
            ("", Node::Malformed),
            ("192.0.2.1:", Node::Malformed),
            ("192.0.2.1:65536", Node::Malformed),
            ("192.0.2.256", Node::Malformed),
            ("[192.0.2.1]", Node::Malformed),
            ("[2001:db8::1", Node::Malformed),
            ("[2001:db8::1]x", Node::Malformed),
            ("2001:db8::1:_", Node::Malformed),
            ("example.com", Node::Malformed),
            ("\u{fffd}", Node::Malformed),
        ] {
            assert_eq!(node(text.as_bytes()), want, "{text:?}");
        }
    }

    #[test]
    fn forwarded_for_values_are_unquoted_and_elements_split_outside_quotes() {
        let value = b"for=192.0.2.43;host=\"a,b;c\", For=\"[2001:db8:cafe::17]:4711\";proto=https, for=unknown, \
                      proto=http, for=\"_gazonk\", for=\"1.2.3.4\\\"\", for=1.1.1.1;for=2.2.2.2";
        let nodes: Vec<Node> = split_outside_quotes(value, b',').map(|e| for_node(e).0).collect();
        assert_eq!(
            nodes,
            [
                Node::Ip(ip("192.0.2.43")),
                Node::Ip(ip("2001:db8:cafe::17")),
                Node::Unnamed,
                Node::Unnamed,
                Node::Unnamed,
                Node::Malformed,
                Node::Malformed,
            ]
        );
        assert_eq!(unquote(b"\"a\\\"b\""), Some(b"a\"b".to_vec()));
        assert_eq!(unquote(b"\"open"), None);
        assert_eq!(unquote(b"\"a\"b"), None);
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let c = client(
            "192.0.2.9",
            &[("X-Forwarded-For", "198.51.100.1"), ("Forwarded", "for=198.51.100.1")],
        );
        assert_eq!(c, Client::direct(ip("192.0.2.9")));
    }

    #[test]
    fn the_client_is_the_rightmost_address_not_trusted() {
        let c = client(
            "10.0.0.1",
            &[("X-Forwarded-For", "198.51.100.7, 203.0.113.5, 10.1.1.1")],
        );
        assert_eq!((c.ip, c.peer), (ip("203.0.113.5"), ip("10.0.0.1")));
        // Lines of one header are one list.
        let c = client(
            "10.0.0.1",
            &[("x-forwarded-for", "198.51.100.7"), ("X-FORWARDED-FOR", " 10.2.2.2 ")],
        );
        assert_eq!(c.ip, ip("198.51.100.7"));
        assert_eq!(c.relayed.unwrap().x_forwarded_for, b"198.51.100.7, 10.2.2.2");
        // Every hop trusted: the leftmost.
        let c = client("10.0.0.1", &[("X-Forwarded-For", "10.9.9.9, 2001:db8:ffff::1")]);
        assert_eq!(c.ip, ip("10.9.9.9"));
        // No chain at all: the peer.
        let c = client("10.0.0.1", &[("X-Forwarded-Proto", "https")]);
        assert_eq!(c.ip, ip("10.0.0.1"));
        assert_eq!(c.relayed.unwrap().proto.as_deref(), Some(&b"https"[..]));
        let c = client("10.0.0.1", &[]);
        assert_eq!((c.ip, c.relayed), (ip("10.0.0.1"), None));
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let c = client(
            "::ffff:10.0.0.1",
            &[(
                "Forwarded",
                "for=198.51.100.7;proto=https, for=\"[2001:db8:ffff::2]:80\"",
            )],
        );
        assert_eq!(c.ip, ip("198.51.100.7"));
        let c = client(
            "10.0.0.1",
            &[("Forwarded", "for=198.51.100.7"), ("X-Forwarded-For", "203.0.113.1")],
        );
        assert_eq!(c.ip, ip("203.0.113.1"), "X-Forwarded-For first");
    }

    #[test]
    fn an_entry_naming_no_address_ends_the_walk_at_the_trusted_hop_after_it() {
        // What is left of `unknown` may be the client's own writing: 198.51.100.7 is not believed.
        let c = client(
            "10.0.0.1",
            &[("X-Forwarded-For", "198.51.100.7, garbage, unknown, 10.3.3.3")],
        );
        assert_eq!(c.ip, ip("10.3.3.3"));
        assert_eq!(c.ignored.as_deref(), Some("unknown"));
        let c = client("10.0.0.1", &[("X-Forwarded-For", "1.2.3.4, _hidden")]);
        assert_eq!((c.ip, c.ignored.as_deref()), (ip("10.0.0.1"), Some("_hidden")));
        let c = client("10.0.0.1", &[("X-Forwarded-For", ",,,")]);
        assert_eq!(c.ip, ip("10.0.0.1"));
        let c = client("10.0.0.1", &[("Forwarded", "for=_hidden, for=\"[::1\"")]);
        assert_eq!((c.ip, c.ignored.as_deref()), (ip("10.0.0.1"), Some("for=\"[::1\"")));
    }

    proptest! {
        #[test]
        fn arbitrary_chains_never_panic(xff in ".{0,80}", fwd in proptest::collection::vec(any::<u8>(), 0..80)) {
            let proxies = trusted(&["0.0.0.0/0"]);
            let c = Client::of(ip("10.0.0.1"), &proxies, [(&b"x-forwarded-for"[..], xff.as_bytes())]);
            c.forwarding("http", None).each(|_, _| {});
            let _ = Client::of(ip("10.0.0.1"), &proxies, [(&b"forwarded"[..], &fwd[..])]);
        }
    }
}
