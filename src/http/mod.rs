//! HTTP/1.1 as wsgate speaks it: the upgrade handshake ([`handshake`], pure), the header rules shared by every
//! forwarded message ([`headers`]), and the answers wsgate writes itself.

pub mod handshake;
pub mod headers;

pub use headers::Forwarding;

/// The standard reason phrase of the statuses wsgate answers with itself.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A complete answer written by wsgate itself: the status, a one-line plain-text reason as the body, and
/// `Connection: close`. A 426 also names the version wsgate speaks.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    error_response_retry(status, reason, None)
}

/// [`error_response`] with a `Retry-After` (seconds) when given.
pub fn error_response_retry(status: u16, reason: &str, retry_after: Option<u32>) -> Vec<u8> {
    let mut extra = String::new();
    if status == 426 {
        extra.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    if let Some(seconds) = retry_after {
        extra.push_str(&format!("Retry-After: {seconds}\r\n"));
    }
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{reason}\n",
        reason_phrase(status),
        reason.len() + 1,
    )
    .into_bytes()
}
