//! The opening handshake's pure parsers on arbitrary bytes: `inspect_request` as if a client sent them,
//! `inspect_response` as if a backend answered with them, and the body-end trackers (`BodyEnd` after a non-101
//! head, `ChunkedEnd` on the raw bytes) fed the bytes in two pieces.
//!
//! Input layout (missing bytes read as 0):
//! - byte 0: flags. bit 0: the client address is IPv6 (else IPv4); bit 1: the client came over `https`.
//! - byte 1: where the body bytes are cut in two, as a fraction (byte / 255) of their length.
//! - the rest: the bytes of a request or response head, and possibly what follows it.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use wsgate::http::handshake::{
    self, BackendAnswer, BodyEnd, BodyFraming, ChunkedEnd, ChunkedError, HandshakeError, Inspected, MAX_HEAD_BYTES,
};

/// The RFC 6455 example key: the accept value a backend's 101 must carry when the bytes are no upgrade request.
const RFC_KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let cut = data.get(1).copied().unwrap_or(0);
    let buf = data.get(2..).unwrap_or_default();
    let ip: IpAddr = if flags & 1 == 0 {
        Ipv4Addr::new(10, 1, 2, 3).into()
    } else {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into()
    };
    let proto = if flags & 2 == 0 { "http" } else { "https" };

    let accept = check_request(buf, ip, proto).unwrap_or_else(|| wsgate::ws::accept_key(RFC_KEY));
    check_response(buf, &accept, cut);

    // The chunked-body tracker on its own, so that its states are reached without a response head in front.
    let whole = ChunkedEnd::default().feed(buf);
    assert_eq!(feed_in_two(BodyEnd::Chunked(ChunkedEnd::default()), buf, cut), whole);
});

/// Returns the accept key of a valid upgrade request.
fn check_request(buf: &[u8], ip: IpAddr, proto: &'static str) -> Option<[u8; 28]> {
    match handshake::inspect_request(buf, ip, proto) {
        Ok(Inspected::Partial) => {
            assert!(buf.len() < MAX_HEAD_BYTES, "a {}-byte head is still partial", buf.len());
            None
        }
        Ok(Inspected::Plain { head_len }) => {
            assert!(
                head_len > 0 && head_len <= buf.len(),
                "head_len {head_len} of {}",
                buf.len()
            );
            // Bytes after the head are not looked at.
            assert_eq!(
                handshake::inspect_request(&buf[..head_len], ip, proto),
                Ok(Inspected::Plain { head_len })
            );
            None
        }
        Ok(Inspected::Upgrade(up)) => {
            assert!(up.head_len <= buf.len(), "head_len {} of {}", up.head_len, buf.len());
            assert!(
                up.forward.starts_with(b"GET "),
                "forwarded head: {:?}",
                String::from_utf8_lossy(&up.forward)
            );
            assert!(
                up.forward.ends_with(b"\r\n\r\n"),
                "forwarded head: {:?}",
                String::from_utf8_lossy(&up.forward)
            );
            assert_eq!(
                parsed_request_len(&up.forward),
                Some(up.forward.len()),
                "forwarded head is not one complete HTTP request: {:?}",
                String::from_utf8_lossy(&up.forward)
            );
            // What follows the head (the first frames) is not looked at.
            let head_only = handshake::inspect_request(&buf[..up.head_len], ip, proto);
            assert!(
                matches!(&head_only, Ok(Inspected::Upgrade(u)) if *u == up),
                "{head_only:?}"
            );
            // The forwarded head is itself a valid upgrade that forwards unchanged, unless it grew past a limit.
            match handshake::inspect_request(&up.forward, ip, proto) {
                Ok(Inspected::Upgrade(again)) => {
                    assert_eq!(again.head_len, up.forward.len());
                    assert_eq!(again.accept, up.accept);
                    assert!(
                        again.forward == up.forward,
                        "forwarding is not idempotent:\n{:?}\n{:?}",
                        String::from_utf8_lossy(&up.forward),
                        String::from_utf8_lossy(&again.forward)
                    );
                }
                Err(HandshakeError::HeadTooLarge | HandshakeError::TooManyHeaders) => {}
                other => panic!(
                    "forwarded head {:?} inspects as {other:?}",
                    String::from_utf8_lossy(&up.forward)
                ),
            }
            Some(up.accept)
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 426 | 431), "{e:?}");
            let _ = e.to_string();
            None
        }
    }
}

fn check_response(buf: &[u8], accept: &[u8; 28], cut: u8) {
    match handshake::inspect_response(buf, accept) {
        Ok(BackendAnswer::Partial) => assert!(buf.len() < MAX_HEAD_BYTES),
        Ok(BackendAnswer::Switching { head_len, .. }) => {
            assert!(
                head_len > 0 && head_len <= buf.len(),
                "head_len {head_len} of {}",
                buf.len()
            );
        }
        Ok(BackendAnswer::Other {
            status,
            head_len,
            head,
            framing,
        }) => {
            assert!(
                head_len > 0 && head_len <= buf.len(),
                "head_len {head_len} of {}",
                buf.len()
            );
            assert_ne!(status, 101);
            assert!(head.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(&head));
            assert!(head.ends_with(b"\r\n\r\n"), "{:?}", String::from_utf8_lossy(&head));
            assert_eq!(
                parsed_response_len(&head),
                Some(head.len()),
                "rewritten head is not one complete HTTP response: {:?}",
                String::from_utf8_lossy(&head)
            );
            let body = &buf[head_len..];
            match BodyEnd::new(framing) {
                None => assert!(matches!(framing, BodyFraming::Empty)),
                Some(end) => {
                    let whole = BodyEnd::new(framing).map(|mut e| e.feed(body));
                    assert_eq!(Some(feed_in_two(end, body, cut)), whole);
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Feeds `bytes` in two pieces cut at `cut / 255` of their length; the end offset must be within what was fed,
/// and is returned relative to the start of `bytes`.
fn feed_in_two(mut end: BodyEnd, bytes: &[u8], cut: u8) -> Result<Option<usize>, ChunkedError> {
    let at = bytes.len() * usize::from(cut) / 255;
    let (first, second) = bytes.split_at(at);
    if let Some(n) = end.feed(first)? {
        assert!(n <= first.len(), "body ends at {n} of {} bytes fed", first.len());
        return Ok(Some(n));
    }
    match end.feed(second)? {
        Some(n) => {
            assert!(n <= second.len(), "body ends at {n} of {} bytes fed", second.len());
            Ok(Some(first.len() + n))
        }
        None => Ok(None),
    }
}

fn parsed_request_len(head: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    match httparse::Request::new(&mut headers).parse(head) {
        Ok(httparse::Status::Complete(n)) => Some(n),
        _ => None,
    }
}

fn parsed_response_len(head: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    match httparse::Response::new(&mut headers).parse(head) {
        Ok(httparse::Status::Complete(n)) => Some(n),
        _ => None,
    }
}
