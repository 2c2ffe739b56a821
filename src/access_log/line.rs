//! One access log line, as pure functions: the fields of a session, request or connection that ended, written as
//! one JSON object and a newline; the time in RFC 3339; the request target with the values of secret query
//! parameters replaced. No I/O: the sink in [`super`] writes what these return.
//!
//! Absent values are left out of the object (never `null`), so that every key present has a value of one type.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::REDACTED_QUERY_PARAMS;

/// What a line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// A WebSocket upgrade request: relayed, refused, or answered otherwise by the backend.
    #[serde(rename = "websocket")]
    WebSocket,
    /// A plain HTTP request.
    #[serde(rename = "http")]
    Http,
    /// A connection that got no request through: refused at admission, a failed TLS handshake, a PROXY protocol
    /// header or request head that was malformed or too slow, a client error before a whole head.
    #[serde(rename = "connection")]
    Connection,
}

/// The value that replaces a secret query parameter's.
pub const REDACTED: &str = "REDACTED";

/// The longest `User-Agent` a line repeats, in characters.
const MAX_USER_AGENT: usize = 512;

/// Every field of a line. The names are stable: docs/observability.md lists them.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    /// When the session, request or connection ended.
    pub time: String,
    pub kind: Kind,
    pub id: u64,
    pub client: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub listener: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subprotocol: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extensions: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a str>,
    pub duration_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_side: Option<&'a str>,
    pub end: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
}

impl Line<'_> {
    /// The line as bytes: one JSON object and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        // Serializing strings and numbers into a Vec does not fail.
        let _ = serde_json::to_writer(&mut out, self);
        out.push(b'\n');
        out
    }
}

/// `time` as RFC 3339 in UTC with milliseconds: `2024-05-01T12:00:00.123Z`. A time before 1970 reads as 1970.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted to start on 0000-03-01, so that the leap day ends a year; eras of 400 years.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A request target as the log shows it: lossy UTF-8, and the value of each query parameter named in
/// [`REDACTED_QUERY_PARAMS`] or `extra` (lowercase) replaced with [`REDACTED`]. Names are compared without case
/// and after percent-decoding; parameters are separated by `&` or `;`.
pub fn redact_target(target: &[u8], extra: &[String]) -> String {
    let text = String::from_utf8_lossy(target);
    let Some((path, query)) = text.split_once('?') else {
        return text.into_owned();
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(path);
    out.push('?');
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let (pair, after) = rest.split_at(end);
        match pair.split_once('=') {
            Some((name, _)) if is_secret(name, extra) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
        let mut chars = after.chars();
        match chars.next() {
            Some(separator) => {
                out.push(separator);
                rest = chars.as_str();
            }
            None => return out,
        }
    }
}

fn is_secret(name: &str, extra: &[String]) -> bool {
    let name = percent_decoded(name).to_ascii_lowercase();
    let name = name.strip_suffix("[]").unwrap_or(&name);
    let last = name.rsplit(['_', '-', '.']).next().unwrap_or(name);
    let listed = |n: &str| REDACTED_QUERY_PARAMS.contains(&n) || extra.iter().any(|e| e == n);
    listed(name) || listed(last)
}

/// `%XX` escapes decoded (a malformed one is kept as it is), `+` as a space.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|h| (*h as char).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `User-Agent` as the log shows it: lossy UTF-8, at most [`MAX_USER_AGENT`] characters.
pub fn user_agent(value: &[u8]) -> String {
    String::from_utf8_lossy(value).chars().take(MAX_USER_AGENT).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        let at = |secs: u64, ms: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(1_735_689_600, 120), "2025-01-01T00:00:00.120Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn every_day_follows_the_one_before() {
        let mut last = civil_from_days(0);
        for days in 1..200_000 {
            let (y, m, d) = civil_from_days(days);
            let next = if d == 1 {
                (m == 1 && y == last.0 + 1 && last.1 == 12) || (m == last.1 + 1 && y == last.0)
            } else {
                y == last.0 && m == last.1 && d == last.2 + 1
            };
            assert!(next, "{last:?} then {:?}", (y, m, d));
            last = (y, m, d);
        }
    }

    #[test]
    fn secret_query_values_are_redacted_and_nothing_else() {
        let r = |t: &str| redact_target(t.as_bytes(), &["session".to_string()]);
        assert_eq!(r("/ws?token=abc&x=1"), "/ws?token=REDACTED&x=1");
        assert_eq!(r("/ws?x=1&TOKEN=abc"), "/ws?x=1&TOKEN=REDACTED");
        assert_eq!(
            r("/a?Access_Token=1;sig=2&jwt=3"),
            "/a?Access_Token=REDACTED;sig=REDACTED&jwt=REDACTED"
        );
        assert_eq!(r("/a?%74oken=abc"), "/a?%74oken=REDACTED");
        assert_eq!(r("/a?session=s&sessions=t"), "/a?session=REDACTED&sessions=t");
        assert_eq!(r("/a?token&x=&key="), "/a?token&x=&key=REDACTED");
        assert_eq!(r("/a?tokens=1&monkey=2"), "/a?tokens=1&monkey=2");
        assert_eq!(
            r("/a?refresh_token=1&client_secret=2&X-Amz-Signature=3&X-Amz-Credential=4&token%5B%5D=5&id.jwt=6"),
            "/a?refresh_token=REDACTED&client_secret=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED\
             &token%5B%5D=REDACTED&id.jwt=REDACTED"
        );
        assert_eq!(r("/a?token_type=bearer&keyword=x"), "/a?token_type=bearer&keyword=x");
        assert_eq!(r("/plain/path"), "/plain/path");
        assert_eq!(r("/a?"), "/a?");
        assert_eq!(r("/a?&&token=x=y"), "/a?&&token=REDACTED");
        for name in REDACTED_QUERY_PARAMS {
            assert_eq!(r(&format!("/?{name}=v")), format!("/?{name}=REDACTED"));
        }
        assert_eq!(redact_target(b"/\xff?key=\xfe", &[]), "/\u{fffd}?key=REDACTED");
    }

    #[test]
    fn a_line_leaves_out_what_is_absent() {
        let line = Line {
            time: "t".into(),
            kind: Kind::Connection,
            id: 7,
            client: "127.0.0.1:1".into(),
            via: None,
            proxy: None,
            listener: "",
            route: None,
            upstream: None,
            server: None,
            method: None,
            path: None,
            host: None,
            status: None,
            subprotocol: None,
            extensions: None,
            identity: None,
            duration_ms: 3,
            bytes_in: 0,
            bytes_out: 0,
            messages_in: None,
            messages_out: None,
            close_code: None,
            close_side: None,
            end: "error: TLS handshake: \"x\"",
            error: Some("TLS handshake: \"x\""),
            trace_id: None,
            user_agent: None,
        };
        let bytes = line.to_bytes();
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(bytes.ends_with(b"}\n"));
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        let mut keys: Vec<&str> = value.as_object().expect("object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes_in",
                "bytes_out",
                "client",
                "duration_ms",
                "end",
                "error",
                "id",
                "kind",
                "time"
            ]
        );
        assert_eq!(value["kind"], "connection");
        assert_eq!(value["error"], "TLS handshake: \"x\"");
    }
}
