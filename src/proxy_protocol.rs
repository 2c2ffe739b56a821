//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer in front of wsgate writes before
//! the client's first byte, saying which address the connection really comes from. [`parse`] is the pure core
//! (bytes in, a header or "need more bytes" out); [`read`] is the thin shell that takes exactly the header's bytes
//! off a raw TCP stream and leaves every byte after it (HTTP, or a TLS hello) unread for whoever reads next.
//!
//! Whether a connection may or must carry a header (the listener's `proxy_protocol`, the peer among its
//! `trusted_proxies`) is the session's decision, not this module's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest version 1 header, `\r\n` included (the specification's bound).
pub const V1_MAX_LEN: usize = 107;
/// The 12 bytes a version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// Fixed part of a version 2 header: signature, version and command, family and transport, length.
const V2_FIXED_LEN: usize = 16;
/// Address block of an `AF_INET` / `AF_INET6` version 2 header: two addresses and two ports.
const V2_INET_LEN: usize = 12;
const V2_INET6_LEN: usize = 36;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection was proxied for a client at this address.
    Proxied { source: SocketAddr },
    /// No client address: a version 2 `LOCAL` connection (the proxy's own health check), version 1 `UNKNOWN`, or a
    /// family with no IP address (`AF_UNSPEC`, `AF_UNIX`). The connection's own peer stands.
    Local,
}

/// What the bytes so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Every byte given belongs to a header that is not complete yet.
    Incomplete,
    /// The header and its whole length, which may run past the bytes given (version 2 TLVs, skipped unread).
    Complete { header: Header, len: usize },
}

/// Why bytes are no PROXY protocol header. Every one is the peer's doing, and a retry on the same connection can
/// never help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol signature (neither `PROXY ` nor the version 2 signature)")]
    NoSignature,
    #[error("PROXY protocol v1 line longer than {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("malformed PROXY protocol v1 line: {0}")]
    V1(&'static str),
    #[error("PROXY protocol v2 header of version {0} (only 2 exists)")]
    V2Version(u8),
    #[error("PROXY protocol v2 header with unknown command {0}")]
    V2Command(u8),
    #[error("PROXY protocol v2 header with unknown address family or transport 0x{0:02x}")]
    V2Family(u8),
    #[error("PROXY protocol v2 address block of {len} bytes, too short for its family ({need} needed)")]
    V2Short { len: usize, need: usize },
}

/// Parses the start of a connection's bytes as a PROXY protocol header (version 1 or 2). `Incomplete` only while
/// every byte so far can still be part of a header, so a reader may take them all off the stream.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&first) = bytes.first() else {
        return Ok(Parsed::Incomplete);
    };
    match first {
        b'P' => parse_v1(bytes),
        b'\r' => parse_v2(bytes),
        _ => Err(ProxyError::NoSignature),
    }
}

/// Whether bytes start like a PROXY protocol header (what a connection that may not send one is checked for, to
/// say so in the log): `PROXY `, or the first 5 bytes of the version 2 signature (`\r\n\r\n\0`, which no HTTP
/// request starts with).
pub fn has_signature(bytes: &[u8]) -> bool {
    bytes.starts_with(V1_PREFIX) || bytes.starts_with(&V2_SIGNATURE[..5])
}

/// `PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT\r\n` or `PROXY UNKNOWN ...\r\n`.
fn parse_v1(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    let prefix = V1_PREFIX.len().min(bytes.len());
    if bytes[..prefix] != V1_PREFIX[..prefix] {
        return Err(ProxyError::NoSignature);
    }
    let window = &bytes[..bytes.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if bytes.len() >= V1_MAX_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = lf + 1;
    let line = match window[..lf].strip_suffix(b"\r") {
        Some(line) if line.len() >= V1_PREFIX.len() => &line[V1_PREFIX.len()..],
        _ => return Err(ProxyError::V1("the line does not end in CRLF")),
    };
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not ASCII"))?;
    if line.starts_with("UNKNOWN") {
        // The specification: whatever follows UNKNOWN up to the CRLF is ignored.
        return Ok(Parsed::Complete {
            header: Header::Local,
            len,
        });
    }
    let mut fields = line.split(' ');
    let (Some(protocol), Some(source), Some(destination), Some(port), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::V1("expected PROTOCOL SOURCE DESTINATION SPORT DPORT"));
    };
    let ip = match protocol {
        "TCP4" => source.parse::<Ipv4Addr>().map(IpAddr::V4),
        "TCP6" => source.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => return Err(ProxyError::V1("the protocol is neither TCP4, TCP6 nor UNKNOWN")),
    }
    .map_err(|_| ProxyError::V1("the source address is not one of the protocol's family"))?;
    let port = parse_port(port).ok_or(ProxyError::V1("the source port is not a number from 0 to 65535"))?;
    // The destination is checked as strictly as the source: a line that is wrong anywhere is not believed.
    if parse_port(dport).is_none() || destination.parse::<IpAddr>().map(|d| d.is_ipv4()) != Ok(ip.is_ipv4()) {
        return Err(ProxyError::V1("malformed destination address or port"));
    }
    Ok(Parsed::Complete {
        header: Header::Proxied {
            source: SocketAddr::new(ip, port),
        },
        len,
    })
}

/// A decimal port as version 1 writes it: 1 to 5 digits, no sign, no leading zero.
fn parse_port(text: &str) -> Option<u16> {
    let digits = text.as_bytes();
    let plain = !digits.is_empty() && digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit);
    if !plain || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    text.parse().ok()
}

/// The binary version 2 header: signature, version and command, family and transport, a big-endian length, the
/// address block and TLVs (which wsgate does not read).
fn parse_v2(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    let signature = V2_SIGNATURE.len().min(bytes.len());
    if bytes[..signature] != V2_SIGNATURE[..signature] {
        return Err(ProxyError::NoSignature);
    }
    let Some(&[version_command, family, high, low]) = bytes.get(12..V2_FIXED_LEN) else {
        return Ok(Parsed::Incomplete);
    };
    if version_command >> 4 != 2 {
        return Err(ProxyError::V2Version(version_command >> 4));
    }
    let block = usize::from(u16::from_be_bytes([high, low]));
    let len = V2_FIXED_LEN + block;
    let local = Parsed::Complete {
        header: Header::Local,
        len,
    };
    match version_command & 0x0f {
        // LOCAL: the proxy speaking for itself; the address block, whatever it holds, is skipped.
        0 => return Ok(local),
        1 => {}
        command => return Err(ProxyError::V2Command(command)),
    }
    if family & 0x0f > 2 {
        return Err(ProxyError::V2Family(family));
    }
    let need = match family >> 4 {
        0 | 3 => return Ok(local),
        1 => V2_INET_LEN,
        2 => V2_INET6_LEN,
        _ => return Err(ProxyError::V2Family(family)),
    };
    if block < need {
        return Err(ProxyError::V2Short { len: block, need });
    }
    let Some(addresses) = bytes.get(V2_FIXED_LEN..V2_FIXED_LEN + need) else {
        return Ok(Parsed::Incomplete);
    };
    Ok(Parsed::Complete {
        header: Header::Proxied {
            source: v2_source(addresses),
        },
        len,
    })
}

/// The source of an `AF_INET` (12 bytes) or `AF_INET6` (36 bytes) address block: source address, destination
/// address, source port, destination port.
fn v2_source(addresses: &[u8]) -> SocketAddr {
    if let Ok(a) = <[u8; V2_INET_LEN]>::try_from(addresses) {
        return SocketAddr::from((Ipv4Addr::new(a[0], a[1], a[2], a[3]), u16::from_be_bytes([a[8], a[9]])));
    }
    let mut ip = [0u8; 16];
    let mut port = [0u8; 2];
    if let Ok(a) = <[u8; V2_INET6_LEN]>::try_from(addresses) {
        ip.copy_from_slice(&a[..16]);
        port = [a[32], a[33]];
    }
    SocketAddr::from((Ipv6Addr::from(ip), u16::from_be_bytes(port)))
}

/// Why no header could be read off a connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("closed before a whole PROXY protocol header")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(#[from] ProxyError),
}

/// Reads a PROXY protocol header off `stream`, taking exactly its bytes: what follows stays in the socket for the
/// next reader (HTTP or TLS). The bytes are peeked first and only those known to belong to the header are read;
/// peeking again waits for new bytes, so a header that trickles in costs no busy loop. No time limit of its own:
/// the caller bounds it.
pub async fn read(stream: &mut TcpStream) -> Result<Header, ReadError> {
    let mut buf = [0u8; V1_MAX_LEN];
    let mut taken = 0;
    loop {
        let peeked = stream.peek(&mut buf[taken..]).await?;
        if peeked == 0 {
            return Err(ReadError::Closed);
        }
        let seen = taken + peeked;
        match parse(&buf[..seen])? {
            Parsed::Incomplete => {
                stream.read_exact(&mut buf[taken..seen]).await?;
                taken = seen;
            }
            Parsed::Complete { header, len } => {
                // `len` > `taken`: the bytes taken so far were all part of an incomplete header.
                let in_buf = len.min(seen);
                if let Some(rest) = buf.get_mut(taken..in_buf) {
                    stream.read_exact(rest).await?;
                }
                skip(stream, len.saturating_sub(in_buf)).await?;
                return Ok(header);
            }
        }
    }
}

/// Reads and drops exactly `n` bytes (a version 2 header's TLVs).
async fn skip(stream: &mut TcpStream, mut n: usize) -> Result<(), ReadError> {
    let mut sink = [0u8; 256];
    while n > 0 {
        let chunk = n.min(sink.len());
        stream
            .read_exact(&mut sink[..chunk])
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ReadError::Closed,
                _ => ReadError::Io(e),
            })?;
        n -= chunk;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn proxied(source: &str, len: usize) -> Result<Parsed, ProxyError> {
        Ok(Parsed::Complete {
            header: Header::Proxied {
                source: source.parse().unwrap(),
            },
            len,
        })
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(parse(line), proxied("192.0.2.1:56324", 45));
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 80\r\n";
        assert_eq!(parse(line), proxied("[2001:db8::1]:4711", line.len()));
        let local = Ok(Parsed::Complete {
            header: Header::Local,
            len: 15,
        });
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), local);
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"),
            Ok(Parsed::Complete {
                header: Header::Local,
                len: 35
            })
        );
    }

    #[test]
    fn v1_needs_more_until_the_line_ends_within_its_bound() {
        for partial in [
            &b""[..],
            b"P",
            b"PROX",
            b"PROXY ",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r",
        ] {
            assert_eq!(parse(partial), Ok(Parsed::Incomplete), "{partial:?}");
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'x');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        long.truncate(V1_MAX_LEN - 2);
        long.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&long), Ok(Parsed::Complete { len: V1_MAX_LEN, .. })));
    }

    #[test]
    fn v1_malformed_lines_are_refused() {
        for line in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 9\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 56324 443\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 56324 443\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 x\r\n",
            b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert!(
                matches!(parse(line), Err(ProxyError::V1(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(line),
                parse(line)
            );
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NoSignature));
        assert_eq!(parse(b"PROXI"), Err(ProxyError::NoSignature));
        assert_eq!(parse(b"PROXY\r\n"), Err(ProxyError::NoSignature));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ProxyError::NoSignature));
    }

    #[test]
    fn v2_inet_inet6_local_and_unspec() {
        let block = [192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 1, 187];
        assert_eq!(parse(&v2(1, 0x11, &block)), proxied("192.0.2.1:56324", 28));
        let mut block6 = [0u8; 36];
        block6[0] = 0x20;
        block6[1] = 0x01;
        block6[15] = 1;
        block6[32] = 0x12;
        block6[33] = 0x67;
        assert_eq!(parse(&v2(1, 0x21, &block6)), proxied("[2001::1]:4711", 52));
        // TLVs after the addresses: counted in the length, never read.
        let mut with_tlvs = block.to_vec();
        with_tlvs.extend_from_slice(&[0x04, 0, 3, b'a', b'b', b'c']);
        let header = v2(1, 0x11, &with_tlvs);
        assert_eq!(parse(&header[..28]), proxied("192.0.2.1:56324", 34));
        let local = |len| {
            Ok(Parsed::Complete {
                header: Header::Local,
                len,
            })
        };
        assert_eq!(parse(&v2(0, 0x11, &block)), local(28), "LOCAL ignores the addresses");
        assert_eq!(parse(&v2(0, 0x00, &[])), local(16));
        assert_eq!(parse(&v2(1, 0x00, &[])), local(16), "AF_UNSPEC");
        assert_eq!(parse(&v2(1, 0x31, &[0; 216])[..16]), local(232), "AF_UNIX");
    }

    #[test]
    fn v2_truncated_needs_more_and_garbage_is_refused() {
        let header = v2(1, 0x21, &[7; 36]);
        for end in 0..header.len() {
            assert_eq!(parse(&header[..end]), Ok(Parsed::Incomplete), "{end} bytes");
        }
        let mut bad = header.clone();
        bad[12] = 0x11;
        assert_eq!(parse(&bad), Err(ProxyError::V2Version(1)));
        bad[12] = 0x22;
        assert_eq!(parse(&bad), Err(ProxyError::V2Command(2)));
        bad[12] = 0x21;
        bad[13] = 0x41;
        assert_eq!(parse(&bad), Err(ProxyError::V2Family(0x41)));
        bad[13] = 0x13;
        assert_eq!(parse(&bad), Err(ProxyError::V2Family(0x13)));
        assert_eq!(
            parse(&v2(1, 0x21, &[0; 12])),
            Err(ProxyError::V2Short { len: 12, need: 36 })
        );
        assert_eq!(parse(&v2(1, 0x11, &[])), Err(ProxyError::V2Short { len: 0, need: 12 }));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyError::NoSignature));
        assert_eq!(parse(b"\r\n\r\nGET"), Err(ProxyError::NoSignature));
        assert!(has_signature(&header) && has_signature(b"PROXY TCP4") && has_signature(b"\r\n\r\n\0\r"));
        assert!(!has_signature(b"\r\n\r\nGET"));
        assert!(!has_signature(b"PROXYZ") && !has_signature(b"GET /"));
    }

    /// Feeds `header` and then `rest` to [`read`] over a real socket, `header` in pieces; what `read` returns
    /// and what is left for the next reader.
    async fn read_over_socket(pieces: Vec<Vec<u8>>, rest: &'static [u8]) -> (Result<Header, String>, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            for piece in pieces {
                client.write_all(&piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            client.write_all(rest).await.unwrap();
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let header = read(&mut server).await.map_err(|e| e.to_string());
        writer.await.unwrap();
        let mut left = Vec::new();
        if header.is_ok() {
            server.read_to_end(&mut left).await.unwrap();
        }
        (header, left)
    }

    #[tokio::test]
    async fn read_takes_exactly_the_header_even_in_pieces() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
        let (header, left) = read_over_socket(vec![line.to_vec()], b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            header,
            Ok(Header::Proxied {
                source: "192.0.2.1:56324".parse().unwrap()
            })
        );
        assert_eq!(left, b"GET / HTTP/1.1\r\n\r\n");
        let pieces = line.chunks(7).map(<[u8]>::to_vec).collect();
        let (header, left) = read_over_socket(pieces, b"after").await;
        assert!(header.is_ok(), "{header:?}");
        assert_eq!(left, b"after");
        let mut block = vec![10, 0, 0, 9, 10, 0, 0, 1, 0, 80, 0, 81];
        block.extend(std::iter::repeat_n(0xee, 1000));
        let binary = v2(1, 0x11, &block);
        let pieces = binary.chunks(300).map(<[u8]>::to_vec).collect();
        let (header, left) = read_over_socket(pieces, b"\x16\x03\x01 tls").await;
        assert_eq!(
            header,
            Ok(Header::Proxied {
                source: "10.0.0.9:80".parse().unwrap()
            })
        );
        assert_eq!(left, b"\x16\x03\x01 tls");
        let (header, _) = read_over_socket(vec![b"GET / HTTP/1.1\r\n".to_vec()], b"").await;
        assert_eq!(header, Err(ProxyError::NoSignature.to_string()));
        let (header, _) = read_over_socket(vec![b"PROXY TCP4".to_vec()], b"").await;
        assert_eq!(header, Err(ReadError::Closed.to_string()));
        let (header, _) = read_over_socket(vec![v2(1, 0x11, &[0; 40])[..30].to_vec()], b"").await;
        assert_eq!(header, Err(ReadError::Closed.to_string()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Complete { len, .. }) = parse(&bytes) {
                prop_assert!(len >= 15);
            }
        }

        #[test]
        fn bytes_after_a_signature_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..120), v1 in any::<bool>()) {
            let mut bytes = if v1 { V1_PREFIX.to_vec() } else { V2_SIGNATURE.to_vec() };
            bytes.extend_from_slice(&tail);
            match parse(&bytes) {
                Ok(Parsed::Complete { len, .. }) if v1 => prop_assert!(len <= V1_MAX_LEN && len <= bytes.len()),
                Ok(Parsed::Complete { len, .. }) => prop_assert!(len >= V2_FIXED_LEN),
                Ok(Parsed::Incomplete) => prop_assert!(bytes.len() < V1_MAX_LEN.max(V2_FIXED_LEN + V2_INET6_LEN)),
                Err(_) => {}
            }
        }

        #[test]
        fn v1_and_v2_headers_give_their_source(source in any::<SocketAddr>(), destination in any::<SocketAddr>()) {
            let source = SocketAddr::new(source.ip(), source.port());
            let destination = match (source, destination) {
                (SocketAddr::V4(_), SocketAddr::V6(d)) => SocketAddr::from(([192, 0, 2, 9], d.port())),
                (SocketAddr::V6(_), SocketAddr::V4(d)) => SocketAddr::from((Ipv6Addr::LOCALHOST, d.port())),
                _ => destination,
            };
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            let line = format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(), destination.ip(), source.port(), destination.port()
            );
            prop_assert_eq!(parse(line.as_bytes()), proxied(&source.to_string(), line.len()));
            let block: Vec<u8> = match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => [&s.ip().octets()[..], &d.ip().octets(), &s.port().to_be_bytes(), &d.port().to_be_bytes()].concat(),
                (SocketAddr::V6(s), SocketAddr::V6(d)) => [&s.ip().octets()[..], &d.ip().octets(), &s.port().to_be_bytes(), &d.port().to_be_bytes()].concat(),
                _ => unreachable!(),
            };
            let header = v2(1, if source.is_ipv4() { 0x11 } else { 0x21 }, &block);
            let want = Parsed::Complete { header: Header::Proxied { source }, len: header.len() };
            prop_assert_eq!(parse(&header), Ok(want));
        }
    }
}
