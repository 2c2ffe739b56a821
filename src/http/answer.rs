//! The answers wsgate writes itself (refusals and errors): one type, [`Answer`], and one list of its header lines
//! ([`Answer::headers`]) that both request paths write from: the upgrade fast path as raw bytes
//! ([`Answer::to_bytes`]), plain HTTP through hyper ([`Answer::to_response`]). Either way a client sees the same
//! status, the same headers and a one-line plain-text reason that names nothing internal.

use std::borrow::Cow;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// An answer of wsgate's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// One line, sent as the body (with a newline).
    pub reason: Cow<'static, str>,
    /// Seconds for `Retry-After`, when waiting may help.
    pub retry_after: Option<u32>,
    /// More header lines (`Sec-WebSocket-Version`, `WWW-Authenticate`, ...).
    pub extra: Vec<(&'static str, Cow<'static, str>)>,
    /// The connection is closed after the answer (`Connection: close`).
    pub close: bool,
}

impl Answer {
    pub fn new(status: u16, reason: impl Into<Cow<'static, str>>) -> Answer {
        Answer {
            status,
            reason: reason.into(),
            retry_after: None,
            extra: Vec::new(),
            close: false,
        }
    }

    pub fn with_retry_after(mut self, seconds: Option<u32>) -> Answer {
        self.retry_after = seconds;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Answer {
        self.extra.push((name, value.into()));
        self
    }

    /// The same answer, closing the connection after it.
    pub fn closing(mut self) -> Answer {
        self.close = true;
        self
    }

    /// The body: the reason on one line.
    fn body(&self) -> String {
        let line = self.reason.lines().next().unwrap_or_default();
        format!("{line}\n")
    }

    /// Every header line of the answer, in order: the one place that says what an answer of wsgate's carries.
    fn headers(&self, body_len: usize) -> Vec<(&'static str, Cow<'static, str>)> {
        let mut headers: Vec<(&'static str, Cow<'static, str>)> = vec![
            ("Content-Type", "text/plain; charset=utf-8".into()),
            ("Content-Length", body_len.to_string().into()),
        ];
        if self.close {
            headers.push(("Connection", "close".into()));
        }
        if let Some(seconds) = self.retry_after {
            headers.push(("Retry-After", seconds.to_string().into()));
        }
        headers.extend(self.extra.iter().cloned());
        // Last, where hyper puts its own on the plain path.
        headers.push(("Date", httpdate::fmt_http_date(SystemTime::now()).into()));
        headers
    }

    /// The whole answer as HTTP/1.1 bytes, for a connection wsgate writes to itself.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.body();
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason_phrase(self.status)).into_bytes();
        for (name, value) in self.headers(body.len()) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        out
    }

    /// The answer for hyper to write, on a plain HTTP connection. `Date` is left to hyper, which adds its own.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = self.body();
        let mut resp = Response::new(Full::new(Bytes::from(body.clone())));
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let map = resp.headers_mut();
        for (name, value) in self.headers(body.len()) {
            if name == "Date" {
                continue;
            }
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                map.append(name, value);
            }
        }
        resp
    }
}

/// The standard reason phrase of the statuses wsgate answers with itself.
fn reason_phrase(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(answer: &Answer) -> String {
        String::from_utf8(answer.to_bytes()).unwrap()
    }

    #[test]
    fn raw_answer_has_status_headers_and_a_one_line_body() {
        let a = Answer::new(503, "no upstream available")
            .with_retry_after(Some(5))
            .closing();
        let t = text(&a);
        let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
                    Content-Length: 22\r\nConnection: close\r\nRetry-After: 5\r\nDate: ";
        assert!(t.starts_with(head), "{t}");
        assert!(t.ends_with("\r\n\r\nno upstream available\n"), "{t}");
    }

    #[test]
    fn a_reason_of_several_lines_keeps_the_first() {
        let t = text(&Answer::new(400, "first\nsecond"));
        assert!(t.ends_with("\r\n\r\nfirst\n"), "{t}");
    }

    #[test]
    fn hyper_answer_carries_the_same_headers() {
        let a = Answer::new(426, "upgrade required").with_header("Sec-WebSocket-Version", "13");
        let resp = a.to_response();
        assert_eq!(resp.status(), 426);
        let h = resp.headers();
        assert_eq!(h["content-type"], "text/plain; charset=utf-8");
        assert_eq!(h["content-length"], "17");
        assert_eq!(h["sec-websocket-version"], "13");
        assert!(h.get("connection").is_none());
        assert!(text(&a).contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }
}
