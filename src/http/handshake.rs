//! The WebSocket opening handshake as pure functions over bytes (RFC 6455 §4): reading a client's request head
//! and deciding whether it is a valid upgrade, a plain HTTP request, or malformed; writing the head forwarded to
//! the backend; and checking the backend's answer. No sockets, no tokio: fuzzable on its own.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::forwarded::Client;
use super::headers::{drop_when_forwarding, has_token};

/// Largest request or response head accepted.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 100;

/// Why a client's request head was refused. Each maps to one HTTP status in [`HandshakeError::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("malformed request head: {0}")]
    Syntax(httparse::Error),
    #[error("unsupported Sec-WebSocket-Version (only 13 is supported)")]
    UnsupportedVersion,
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// The request's body framing is invalid or ambiguous: where it ends (and where the next request starts) is
    /// unknown, so it is never forwarded and the connection is closed after the answer.
    #[error("ambiguous request framing: {0}")]
    Framing(&'static str),
    /// An upgrade request with a body: what follows its head is neither a next request nor WebSocket frames, so
    /// the connection is closed after the answer too.
    #[error("WebSocket upgrade request with a body")]
    UpgradeWithBody,
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_) | Self::Syntax(_) | Self::Framing(_) | Self::UpgradeWithBody => 400,
            Self::UnsupportedVersion => 426,
            Self::HeadTooLarge | Self::TooManyHeaders => 431,
        }
    }
}

/// What a client's bytes so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspected {
    /// The head is not complete yet: read more.
    Partial,
    /// A complete request that asks for no WebSocket upgrade; `head_len` bytes of head.
    Plain { head_len: usize },
    /// A valid WebSocket upgrade request.
    Upgrade(Upgrade),
}

/// A validated upgrade request, ready to forward.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Length of the client's head in the buffer; bytes after it belong to the WebSocket stream.
    pub head_len: usize,
    /// The head to send to the backend.
    pub forward: Vec<u8>,
    /// The `Sec-WebSocket-Accept` value the backend must answer with.
    pub accept: [u8; 28],
}

/// Room for the header fields of one head.
pub type HeaderStorage<'b> = [httparse::Header<'b>; MAX_HEADERS];

/// An empty [`HeaderStorage`].
pub fn header_storage<'b>() -> HeaderStorage<'b> {
    [httparse::EMPTY_HEADER; MAX_HEADERS]
}

/// What a client's bytes so far amount to, as a view into them (see [`parse_request`]).
#[derive(Debug)]
pub enum Parsed<'h, 'b> {
    Partial,
    Plain { head_len: usize },
    Upgrade(UpgradeHead<'h, 'b>),
}

/// A validated upgrade request head, borrowed from the bytes read: routing and the choice of a server look at it
/// before [`UpgradeHead::forward`] writes the head for the backend.
#[derive(Debug)]
pub struct UpgradeHead<'h, 'b> {
    /// Length of the client's head in the buffer; bytes after it belong to the WebSocket stream.
    pub head_len: usize,
    /// The request target in origin form (path and query): as sent, or the path of a target in absolute form.
    pub target: Cow<'b, str>,
    /// The `Host` value, trimmed; for a target in absolute form, its authority (RFC 9112 §3.2.2).
    pub host: &'b [u8],
    pub headers: &'h [httparse::Header<'b>],
    key: &'b [u8],
    /// The target came in absolute form: its authority replaces the `Host` header when forwarding.
    absolute: bool,
}

fn header<'h, 'b: 'h>(headers: &'h [httparse::Header<'b>], name: &'h str) -> impl Iterator<Item = &'b [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Inspects the bytes a client has sent so far, and for an upgrade writes the head to forward (with no cookie
/// removed). `buf` may hold bytes past the head (the start of the WebSocket stream); they are not looked at.
pub fn inspect_request(
    buf: &[u8],
    client_ip: std::net::IpAddr,
    proto: &'static str,
) -> Result<Inspected, HandshakeError> {
    let mut storage = header_storage();
    Ok(match parse_request(buf, &mut storage)? {
        Parsed::Partial => Inspected::Partial,
        Parsed::Plain { head_len } => Inspected::Plain { head_len },
        Parsed::Upgrade(head) => Inspected::Upgrade(Upgrade {
            head_len: head.head_len,
            forward: head.forward(&Client::direct(client_ip), proto, Omit::default()),
            accept: head.accept(),
        }),
    })
}

/// Parses and validates the bytes a client has sent so far (RFC 6455 §4.2.1). `buf` may hold bytes past the head.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut HeaderStorage<'b>,
) -> Result<Parsed<'h, 'b>, HandshakeError>
where
    'b: 'h,
{
    let mut req = httparse::Request::new(storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HandshakeError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Syntax(e)),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(HandshakeError::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HandshakeError::Malformed("incomplete request line"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    if has_bare_cr_or_lf(buf.get(..head_len).unwrap_or_default()) {
        return Err(HandshakeError::Malformed("bare CR or LF in the request head"));
    }
    let body = request_framing(header(headers, "transfer-encoding"), header(headers, "content-length"))?;
    if version != 1 && body == RequestBody::Chunked {
        return Err(HandshakeError::Framing("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if !header(headers, "upgrade").any(|v| has_token(v, "websocket")) {
        return Ok(Parsed::Plain { head_len });
    }
    if !body.is_empty() {
        return Err(HandshakeError::UpgradeWithBody);
    }
    if method != "GET" {
        return Err(HandshakeError::Malformed("WebSocket upgrade must use GET"));
    }
    if version != 1 {
        return Err(HandshakeError::Malformed("WebSocket upgrade must use HTTP/1.1"));
    }
    let mut hosts = header(headers, "host");
    let mut host = match (hosts.next(), hosts.next()) {
        (Some(h), None) if !h.trim_ascii().is_empty() => h.trim_ascii(),
        (None, _) => return Err(HandshakeError::Malformed("missing Host header")),
        (Some(_), None) => return Err(HandshakeError::Malformed("empty Host header")),
        (Some(_), Some(_)) => return Err(HandshakeError::Malformed("more than one Host header")),
    };
    if !header(headers, "connection").any(|v| has_token(v, "upgrade")) {
        return Err(HandshakeError::Malformed("Connection header lacks the upgrade token"));
    }
    let mut versions = header(headers, "sec-websocket-version");
    match (versions.next(), versions.next()) {
        (None, _) => {
            return Err(HandshakeError::Malformed("missing Sec-WebSocket-Version header"));
        }
        (Some(v), None) if v.trim_ascii() == b"13" => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let mut keys = header(headers, "sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.trim_ascii(),
        (None, _) => {
            return Err(HandshakeError::Malformed("missing Sec-WebSocket-Key header"));
        }
        (Some(_), Some(_)) => {
            return Err(HandshakeError::Malformed("more than one Sec-WebSocket-Key header"));
        }
    };
    let (target, absolute) = match absolute_form(target)? {
        Some((authority, origin_form)) => {
            host = authority.as_bytes();
            (origin_form, true)
        }
        None if target.starts_with('/') => (Cow::Borrowed(target), false),
        None => {
            return Err(HandshakeError::Malformed(
                "request target is in neither origin nor absolute form",
            ));
        }
    };
    check_path(target.as_bytes())?;
    let mut raw_key = [0u8; 16];
    if key.len() != 24 || BASE64.decode_slice(key, &mut raw_key) != Ok(16) {
        return Err(HandshakeError::Malformed(
            "Sec-WebSocket-Key is not the base64 encoding of 16 bytes",
        ));
    }
    Ok(Parsed::Upgrade(UpgradeHead {
        head_len,
        target,
        host,
        headers,
        key,
        absolute,
    }))
}

/// How a request's body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

impl RequestBody {
    /// Whether the request has no body bytes.
    pub fn is_empty(self) -> bool {
        matches!(self, Self::None | Self::Length(0))
    }
}

/// A request's body framing from its `Transfer-Encoding` and `Content-Length` values, refusing every framing that
/// two HTTP parsers may read two ways (request smuggling): both headers together, a transfer coding other than
/// `chunked` alone, more than one `Content-Length`, or one that is not plain digits (`+1`, `1, 1`, `0x1`).
pub fn request_framing<'a>(
    transfer_encoding: impl IntoIterator<Item = &'a [u8]>,
    content_length: impl IntoIterator<Item = &'a [u8]>,
) -> Result<RequestBody, HandshakeError> {
    let mut te = transfer_encoding.into_iter();
    let mut cl = content_length.into_iter();
    match (te.next(), cl.next()) {
        (None, None) => Ok(RequestBody::None),
        (Some(_), Some(_)) => Err(HandshakeError::Framing("both Transfer-Encoding and Content-Length")),
        (Some(coding), None) => {
            if te.next().is_none() && coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Ok(RequestBody::Chunked)
            } else {
                Err(HandshakeError::Framing("Transfer-Encoding other than chunked alone"))
            }
        }
        (None, Some(length)) => {
            if cl.next().is_some() {
                return Err(HandshakeError::Framing("more than one Content-Length"));
            }
            let digits = length.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(HandshakeError::Framing("Content-Length is not a number"));
            }
            digits
                .iter()
                .try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
                .map(RequestBody::Length)
                .ok_or(HandshakeError::Framing("Content-Length out of range"))
        }
    }
}

/// Refuses a path with dot segments (`/./`, `/../`, written plainly or percent-encoded): routes match the path as
/// sent, and a backend that resolves `/public/../admin` would serve a path the routes never saw. Browsers resolve
/// dot segments before sending, so no honest client sends one.
pub fn check_path(path: &[u8]) -> Result<(), HandshakeError> {
    let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
    let dot_segment = path[..end].split(|&b| b == b'/').any(|segment| {
        let mut rest = segment;
        let mut dots = 0;
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2].eq_ignore_ascii_case(&b'e') {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    });
    if dot_segment {
        return Err(HandshakeError::Malformed("dot segment (. or ..) in the request path"));
    }
    Ok(())
}

/// Whether a head has a CR not followed by LF or an LF not preceded by CR. RFC 9112 §2.2 lets a recipient read a
/// bare LF as a line end; a server behind wsgate may not, so neither is accepted.
fn has_bare_cr_or_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => head.get(i + 1) != Some(&b'\n'),
        b'\n' => i.checked_sub(1).and_then(|p| head.get(p)) != Some(&b'\r'),
        _ => false,
    })
}

/// A request target in absolute form (`http://host:port/path?query`, RFC 9112 §3.2.2) as its authority and its
/// origin form; `None` for a target in any other form.
fn absolute_form(target: &str) -> Result<Option<(&str, Cow<'_, str>)>, HandshakeError> {
    let Some((scheme, rest)) = target.split_once("://") else {
        return Ok(None);
    };
    let mut scheme_chars = scheme.bytes();
    let scheme_ok = scheme_chars.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_chars.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Ok(None);
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return Err(HandshakeError::Malformed(
            "absolute request target without a host, or with user information",
        ));
    }
    let origin_form = match path.as_bytes().first() {
        Some(b'/') => Cow::Borrowed(path),
        None => Cow::Borrowed("/"),
        Some(_) => Cow::Owned(format!("/{path}")),
    };
    Ok(Some((authority, origin_form)))
}

/// The header in which a client offers WebSocket extensions.
pub const EXTENSIONS: &str = "sec-websocket-extensions";

/// What a forwarded upgrade head leaves out, besides hop-by-hop headers, and the identity it adds.
#[derive(Debug, Default, Clone, Copy)]
pub struct Omit<'a> {
    /// This cookie, taken out of the `Cookie` headers (the sticky cookie).
    pub cookie: Option<&'a str>,
    /// The client's extension offers (`Sec-WebSocket-Extensions`).
    pub extensions: bool,
    /// What authentication takes out and puts in (`None` on a route without authentication).
    pub auth: Option<&'a crate::auth::Admit>,
    /// The trace the request goes on with: the client's `traceparent` is replaced with it (and its `tracestate`
    /// dropped unless the trace is the client's). `None`: trace headers pass as they are.
    pub trace: Option<&'a crate::http::trace::Trace>,
}

impl UpgradeHead<'_, '_> {
    /// The `Sec-WebSocket-Accept` value the backend must answer with.
    pub fn accept(&self) -> [u8; 28] {
        crate::ws::accept_key(self.key)
    }

    /// The head to send to the backend: hop-by-hop headers out, forwarding headers (for `client`) in, and what
    /// `omit` says left out (the route's credentials among them) and its verified identity in.
    pub(crate) fn forward(&self, client: &Client, proto: &'static str, omit: Omit<'_>) -> Vec<u8> {
        let strip = omit.auth.map(|a| &a.strip);
        let target = match strip {
            Some(strip) => crate::auth::extract::without_query(&self.target, &strip.query),
            None => Cow::Borrowed(&*self.target),
        };
        let mut forward = Vec::with_capacity(self.head_len + 256);
        forward.extend_from_slice(b"GET ");
        forward.extend_from_slice(target.as_bytes());
        forward.extend_from_slice(b" HTTP/1.1\r\n");
        for h in self.headers.iter() {
            let connection = header(self.headers, "connection");
            if drop_when_forwarding(h.name.as_bytes(), connection, true)
                || (omit.extensions && h.name.eq_ignore_ascii_case(EXTENSIONS))
                || strip.is_some_and(|s| s.headers.iter().any(|n| crate::auth::same_header(h.name, n)))
                || omit.trace.is_some_and(|t| {
                    h.name.eq_ignore_ascii_case("traceparent")
                        || (!t.continued && h.name.eq_ignore_ascii_case("tracestate"))
                })
            {
                continue;
            }
            if self.absolute && h.name.eq_ignore_ascii_case("host") {
                push_header(&mut forward, h.name, self.host);
                continue;
            }
            let mut value = Cow::Borrowed(h.value);
            if h.name.eq_ignore_ascii_case("cookie") {
                for name in [omit.cookie, strip.and_then(|s| s.cookie.as_deref())]
                    .into_iter()
                    .flatten()
                {
                    value = Cow::Owned(without_cookie(&value, name));
                }
            } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") && strip.is_some_and(|s| s.bearer_protocol)
            {
                value = Cow::Owned(crate::auth::extract::without_bearer_protocols(&value));
            }
            // A header left with nothing in it is left out.
            if value.is_empty() && !h.value.is_empty() {
                continue;
            }
            push_header(&mut forward, h.name, &value);
        }
        push_header(&mut forward, "Connection", b"Upgrade");
        push_header(&mut forward, "Upgrade", b"websocket");
        client
            .forwarding(proto, Some(self.host))
            .each(|name, value| push_header(&mut forward, name, value));
        for (name, value) in omit.auth.map_or(&[][..], |a| &a.identity[..]) {
            push_header(&mut forward, name, value.as_bytes());
        }
        if let Some(trace) = omit.trace {
            push_header(&mut forward, "traceparent", trace.header().as_bytes());
        }
        forward.extend_from_slice(b"\r\n");
        forward
    }
}

/// A `Cookie` value without the cookie called `name` (other cookies kept in order).
pub fn without_cookie(value: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for pair in value.split(|&b| b == b';') {
        let pair = pair.trim_ascii();
        let pair_name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        if pair.is_empty() || pair_name == name.as_bytes() {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(pair);
    }
    out
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Why a backend's answer to the upgrade cannot be passed on. All of these are a 502 to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed response head from backend: {0}")]
    Syntax(httparse::Error),
    #[error("backend response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("backend answered with status {0:03}, outside 100-599")]
    BadStatus(u16),
    #[error("backend answered 101 with a wrong Sec-WebSocket-Accept")]
    BadAccept,
    #[error("backend answered 101 without Upgrade: websocket")]
    NotWebSocket,
    #[error("backend sent conflicting Content-Length / Transfer-Encoding")]
    BadFraming,
    #[error("backend answered 101 accepting an extension that was not offered")]
    ExtensionNotOffered,
}

/// How the body of a backend's non-101 answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// What a backend's bytes so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum BackendAnswer {
    Partial,
    /// `101 Switching Protocols` with the right accept key: pass `head_len` bytes on as they are. `deflate`: the
    /// backend accepted permessage-deflate (frames may carry RSV1); `extensions`: it accepted some extension.
    Switching {
        head_len: usize,
        deflate: bool,
        extensions: bool,
    },
    /// Any other status: pass `head` (rewritten to close the connection after the body) and then the body.
    Other {
        status: u16,
        head_len: usize,
        head: Vec<u8>,
        framing: BodyFraming,
    },
}

/// Inspects a backend's answer to a forwarded upgrade request.
pub fn inspect_response(buf: &[u8], accept: &[u8; 28]) -> Result<BackendAnswer, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(ResponseError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(BackendAnswer::Partial),
        Err(e) => return Err(ResponseError::Syntax(e)),
    };
    let status = resp.code.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return Err(ResponseError::BadStatus(status));
    }
    let headers = resp.headers;
    if status == 101 {
        if !header(headers, "upgrade").any(|v| has_token(v, "websocket")) {
            return Err(ResponseError::NotWebSocket);
        }
        let mut accepts = header(headers, "sec-websocket-accept");
        return match (accepts.next(), accepts.next()) {
            (Some(a), None) if a.trim_ascii() == accept => Ok(BackendAnswer::Switching {
                head_len,
                deflate: negotiates_deflate(header(headers, EXTENSIONS)),
                extensions: accepts_extensions(header(headers, EXTENSIONS)),
            }),
            _ => Err(ResponseError::BadAccept),
        };
    }
    let framing = body_framing(status, headers)?;
    let mut head = Vec::with_capacity(head_len + 32);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.to_string().as_bytes());
    head.push(b' ');
    head.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for h in headers.iter() {
        let connection = header(headers, "connection");
        if !drop_when_forwarding(h.name.as_bytes(), connection, false) {
            push_header(&mut head, h.name, h.value);
        }
    }
    if framing == BodyFraming::Chunked {
        push_header(&mut head, "Transfer-Encoding", b"chunked");
    }
    push_header(&mut head, "Connection", b"close");
    head.extend_from_slice(b"\r\n");
    Ok(BackendAnswer::Other {
        status,
        head_len,
        head,
        framing,
    })
}

/// Whether `Sec-WebSocket-Extensions` values name any extension.
pub fn accepts_extensions<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    values
        .into_iter()
        .any(|v| v.split(|&b| b == b',').any(|ext| !ext.trim_ascii().is_empty()))
}

/// Whether `Sec-WebSocket-Extensions` values name permessage-deflate (RFC 7692).
pub fn negotiates_deflate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    values.into_iter().any(|v| {
        v.split(|&b| b == b',').any(|ext| {
            let name = ext.split(|&b| b == b';').next().unwrap_or_default();
            name.trim_ascii().eq_ignore_ascii_case(b"permessage-deflate")
        })
    })
}

fn body_framing(status: u16, headers: &[httparse::Header<'_>]) -> Result<BodyFraming, ResponseError> {
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(BodyFraming::Empty);
    }
    let mut te = header(headers, "transfer-encoding");
    if let Some(v) = te.next() {
        // RFC 9112 §6.3: chunked must be the final coding; with Content-Length present the message is suspect.
        if te.next().is_some() || header(headers, "content-length").next().is_some() {
            return Err(ResponseError::BadFraming);
        }
        let last = v.rsplit(|&b| b == b',').next().unwrap_or(v).trim_ascii();
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            BodyFraming::Chunked
        } else {
            BodyFraming::UntilClose
        });
    }
    let mut lengths = header(headers, "content-length");
    match lengths.next() {
        None => Ok(BodyFraming::UntilClose),
        Some(v) => {
            let n = std::str::from_utf8(v.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ResponseError::BadFraming)?;
            if lengths.any(|other| other.trim_ascii() != v.trim_ascii()) {
                return Err(ResponseError::BadFraming);
            }
            Ok(if n == 0 {
                BodyFraming::Empty
            } else {
                BodyFraming::Length(n)
            })
        }
    }
}

/// Follows the body of a backend's non-101 answer to find where it ends.
#[derive(Debug)]
pub enum BodyEnd {
    Length(u64),
    Chunked(ChunkedEnd),
    UntilClose,
}

impl BodyEnd {
    /// `None` when the body is empty.
    pub fn new(framing: BodyFraming) -> Option<Self> {
        match framing {
            BodyFraming::Empty => None,
            BodyFraming::Length(n) => Some(Self::Length(n)),
            BodyFraming::Chunked => Some(Self::Chunked(ChunkedEnd::default())),
            BodyFraming::UntilClose => Some(Self::UntilClose),
        }
    }

    /// Feeds body bytes; returns `Some(n)` when the body ends after the first `n` of them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkedError> {
        match self {
            Self::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                Ok((*left == 0).then_some(take as usize))
            }
            Self::Chunked(chunked) => chunked.feed(bytes),
            Self::UntilClose => Ok(None),
        }
    }
}

/// Finds where a chunked body ends, fed the body's bytes as they arrive (RFC 9112 §7.1). It only tracks
/// boundaries; the bytes are passed on unchanged.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    /// Bytes of the current size or trailer line, bounded so a hostile peer cannot make it grow.
    line_len: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeDigits(u64),
    SizeExt(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// A chunked body that cannot be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkedError;

const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedEnd {
    /// Feeds bytes; returns `Some(n)` when the body ends after the first `n` of them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkedError> {
        let mut i = 0;
        while i < bytes.len() {
            if let ChunkState::Data(left) = self.state {
                let take = left.min((bytes.len() - i) as u64);
                i += take as usize;
                self.state = if take == left {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left - take)
                };
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.line_len += 1;
            if self.line_len > MAX_CHUNK_LINE {
                return Err(ChunkedError);
            }
            self.state = match (self.state, b) {
                (ChunkState::Size, _) => ChunkState::SizeDigits(hex_digit(b)?),
                (ChunkState::SizeDigits(n), b';' | b' ' | b'\t') => ChunkState::SizeExt(n),
                (ChunkState::SizeDigits(n), b'\r') => ChunkState::SizeLf(n),
                (ChunkState::SizeDigits(n), _) => ChunkState::SizeDigits(
                    n.checked_mul(16)
                        .and_then(|n| n.checked_add(hex_digit(b).ok()?))
                        .ok_or(ChunkedError)?,
                ),
                (ChunkState::SizeExt(n), b'\r') => ChunkState::SizeLf(n),
                (ChunkState::SizeExt(n), _) => ChunkState::SizeExt(n),
                (ChunkState::SizeLf(0), b'\n') => {
                    self.line_len = 0;
                    ChunkState::TrailerStart
                }
                (ChunkState::SizeLf(n), b'\n') => {
                    self.line_len = 0;
                    ChunkState::Data(n)
                }
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => {
                    self.line_len = 0;
                    ChunkState::Size
                }
                (ChunkState::TrailerStart, b'\r') => ChunkState::FinalLf,
                (ChunkState::TrailerLine, b'\r') => ChunkState::TrailerLf,
                (ChunkState::TrailerStart | ChunkState::TrailerLine, _) => ChunkState::TrailerLine,
                (ChunkState::TrailerLf, b'\n') => {
                    self.line_len = 0;
                    ChunkState::TrailerStart
                }
                (ChunkState::FinalLf, b'\n') => {
                    self.state = ChunkState::Done;
                    return Ok(Some(i));
                }
                _ => return Err(ChunkedError),
            };
        }
        Ok(None)
    }
}

fn hex_digit(b: u8) -> Result<u64, ChunkedError> {
    (b as char).to_digit(16).map(u64::from).ok_or(ChunkedError)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /chat?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn inspect(req: &str) -> Result<Inspected, HandshakeError> {
        inspect_request(req.as_bytes(), "10.1.2.3".parse().unwrap(), "http")
    }

    #[test]
    fn sticky_cookie_is_removed_from_the_forwarded_head() {
        let req = upgrade_request("Cookie: a=1; SERVERID=abc; b=2\r\nCookie: SERVERID=x\r\n");
        let mut storage = header_storage();
        let Ok(Parsed::Upgrade(head)) = parse_request(req.as_bytes(), &mut storage) else {
            panic!("not an upgrade")
        };
        let omit = Omit {
            cookie: Some("SERVERID"),
            ..Omit::default()
        };
        let fwd =
            String::from_utf8(head.forward(&crate::http::Client::direct("10.1.2.3".parse().unwrap()), "http", omit))
                .unwrap();
        assert!(fwd.contains("Cookie: a=1; b=2\r\n"), "{fwd}");
        assert_eq!(fwd.matches("Cookie").count(), 1, "{fwd}");
        assert_eq!(without_cookie(b"SERVERIDX=1;SERVERID=2", "SERVERID"), b"SERVERIDX=1");
    }

    #[test]
    fn valid_upgrade_is_rewritten() {
        let req = upgrade_request("X-Forwarded-For: 6.6.6.6\r\nKeep-Alive: 5\r\nSec-WebSocket-Protocol: chat\r\n");
        let Ok(Inspected::Upgrade(up)) = inspect(&req) else {
            panic!("not an upgrade")
        };
        assert_eq!(up.head_len, req.len());
        let fwd = String::from_utf8(up.forward).unwrap();
        assert!(
            fwd.starts_with("GET /chat?x=1 HTTP/1.1\r\nHost: example.com\r\n"),
            "{fwd}"
        );
        assert!(fwd.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(fwd.contains("X-Forwarded-For: 10.1.2.3\r\n"));
        assert!(!fwd.contains("6.6.6.6"));
        assert!(!fwd.contains("Keep-Alive"));
        assert!(fwd.contains("Forwarded: for=10.1.2.3;proto=http;host=\"example.com\"\r\n"));
        assert!(fwd.ends_with("\r\n\r\n"));
    }

    #[test]
    fn rejections_have_their_status() {
        let cases = [
            (upgrade_request("").replace("GET", "POST"), 400),
            (upgrade_request("").replace("HTTP/1.1", "HTTP/1.0"), 400),
            (upgrade_request("").replace("Host: example.com\r\n", ""), 400),
            (upgrade_request("").replace("keep-alive, Upgrade", "keep-alive"), 400),
            (upgrade_request("").replace(KEY, "c2hvcnQ="), 400),
            (upgrade_request("").replace("Version: 13", "Version: 8"), 426),
            (upgrade_request("").replace("Sec-WebSocket-Version: 13\r\n", ""), 400),
            (upgrade_request("Host: other\r\n"), 400),
        ];
        for (req, status) in cases {
            assert_eq!(inspect(&req).unwrap_err().status(), status, "{req}");
        }
    }

    #[test]
    fn oversized_and_crowded_heads_are_431() {
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(inspect(&big).unwrap_err(), HandshakeError::HeadTooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            inspect(&upgrade_request(&many)).unwrap_err(),
            HandshakeError::TooManyHeaders
        );
    }

    #[test]
    fn plain_and_partial_requests() {
        assert_eq!(
            inspect("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Inspected::Plain { head_len: 27 })
        );
        assert_eq!(inspect("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(Inspected::Partial));
    }

    fn plain(head: &str) -> Result<Inspected, HandshakeError> {
        inspect(&format!("POST /p HTTP/1.1\r\nHost: a\r\n{head}\r\n"))
    }

    #[test]
    fn httparse_refuses_folding_bad_names_and_control_bytes() {
        let cases = [
            "X-A: 1\r\n  folded\r\n",
            "Content-Length : 5\r\n",
            "Content Length: 5\r\n",
            "X-A: a\0b\r\n",
            ": empty-name\r\n",
            "X-A\r\n",
        ];
        for head in cases {
            assert!(
                matches!(plain(head), Err(HandshakeError::Syntax(_))),
                "{head:?}: {:?}",
                plain(head)
            );
        }
    }

    #[test]
    fn dot_segments_are_refused_and_dotted_names_are_not() {
        for path in [
            "/a/../admin",
            "/..",
            "/a/./b",
            "/%2e%2e/x",
            "/a/%2E/b",
            "/.%2e/x",
            "/a/..",
        ] {
            assert!(check_path(path.as_bytes()).is_err(), "{path}");
        }
        for path in [
            "/",
            "/a.b/c",
            "/.well-known/x",
            "/a/...",
            "/a?x=/../",
            "/..a",
            "/%2e%2ea",
        ] {
            assert!(check_path(path.as_bytes()).is_ok(), "{path}");
        }
        let req = "GET /public/../admin HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(inspect(req).unwrap_err().status(), 400);
    }

    #[test]
    fn bare_cr_or_lf_is_refused() {
        for req in [
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r2\r\n\r\n",
        ] {
            assert_eq!(inspect(req).unwrap_err().status(), 400, "{req:?}");
        }
    }

    #[test]
    fn ambiguous_or_invalid_framing_is_refused() {
        let cases = [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: identity, chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: -5\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length: 5 5\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999999\r\n",
        ];
        for head in cases {
            assert!(
                matches!(plain(head), Err(HandshakeError::Framing(_))),
                "{head:?}: {:?}",
                plain(head)
            );
        }
        let http10 = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(inspect(http10), Err(HandshakeError::Framing(_))));
    }

    #[test]
    fn unambiguous_framing_passes() {
        for head in [
            "",
            "Content-Length: 5\r\n",
            "Content-Length:  5 \r\n",
            "Transfer-Encoding: chunked\r\n",
            "Transfer-Encoding:  Chunked\r\n",
        ] {
            assert!(matches!(plain(head), Ok(Inspected::Plain { .. })), "{head:?}");
        }
        assert_eq!(request_framing([b"chunked".as_slice()], []), Ok(RequestBody::Chunked));
        assert_eq!(request_framing([], [b"12".as_slice()]), Ok(RequestBody::Length(12)));
        assert_eq!(request_framing([], []), Ok(RequestBody::None));
    }

    #[test]
    fn upgrade_with_a_body_is_refused() {
        for extra in ["Content-Length: 3\r\n", "Transfer-Encoding: chunked\r\n"] {
            assert_eq!(
                inspect(&upgrade_request(extra)).unwrap_err(),
                HandshakeError::UpgradeWithBody,
                "{extra}"
            );
        }
        assert!(matches!(
            inspect(&upgrade_request("Content-Length: 0\r\n")),
            Ok(Inspected::Upgrade(_))
        ));
    }

    #[test]
    fn absolute_form_is_forwarded_in_origin_form_with_its_authority_as_host() {
        let cases = [
            (
                "http://chat.example.com:8080/chat?x=1",
                "/chat?x=1",
                "chat.example.com:8080",
            ),
            ("HTTP://b.example/", "/", "b.example"),
            ("http://b.example", "/", "b.example"),
            ("ws://b.example?room=2", "/?room=2", "b.example"),
        ];
        for (target, origin, authority) in cases {
            let req = upgrade_request("").replacen("/chat?x=1", target, 1);
            let mut storage = header_storage();
            let Ok(Parsed::Upgrade(head)) = parse_request(req.as_bytes(), &mut storage) else {
                panic!("not an upgrade: {req}")
            };
            assert_eq!((&*head.target, head.host), (origin, authority.as_bytes()));
            let fwd = head.forward(
                &crate::http::Client::direct("10.1.2.3".parse().unwrap()),
                "http",
                Omit::default(),
            );
            let fwd = String::from_utf8(fwd).unwrap();
            assert!(
                fwd.starts_with(&format!("GET {origin} HTTP/1.1\r\nHost: {authority}\r\n")),
                "{fwd}"
            );
            assert_eq!(fwd.matches("example.com\r\n").count(), 0, "{fwd}");
            assert!(fwd.contains(&format!("X-Forwarded-Host: {authority}\r\n")), "{fwd}");
        }
        for target in ["http://user@b.example/", "http:///path", "chat", "*"] {
            let req = upgrade_request("").replacen("/chat?x=1", target, 1);
            assert_eq!(inspect(&req).unwrap_err().status(), 400, "{target}");
        }
    }

    #[test]
    fn backend_answers() {
        let accept = crate::ws::accept_key(KEY.as_bytes());
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(
            inspect_response(ok.as_bytes(), &accept),
            Ok(BackendAnswer::Switching {
                head_len: ok.len(),
                deflate: false,
                extensions: false
            })
        );
        let odd = "HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nno";
        assert_eq!(
            inspect_response(odd.as_bytes(), &accept),
            Err(ResponseError::BadStatus(99))
        );
        let bad = ok.replace("s3pP", "AAAA");
        assert_eq!(inspect_response(bad.as_bytes(), &accept), Err(ResponseError::BadAccept));
        let denied = "HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nnope!\n";
        let Ok(BackendAnswer::Other {
            status, framing, head, ..
        }) = inspect_response(denied.as_bytes(), &accept)
        else {
            panic!()
        };
        assert_eq!((status, framing), (403, BodyFraming::Length(6)));
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.ends_with("Content-Length: 6\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn chunked_end_is_found_across_splits() {
        let body = b"4;ext=1\r\nWiki\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let first = c.feed(&body[..split]).unwrap();
            let end = match first {
                Some(n) => n,
                None => split + c.feed(&body[split..]).unwrap().unwrap(),
            };
            assert_eq!(end, body.len() - 4, "split {split}");
        }
        assert_eq!(ChunkedEnd::default().feed(b"zz\r\n"), Err(ChunkedError));
    }
}
