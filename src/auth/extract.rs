//! Where credentials travel in a request, as pure functions over header values and the request target: a bearer
//! token in `Authorization`, a query parameter, or an entry `bearer.<token>` of `Sec-WebSocket-Protocol` (cookies
//! are read by [`RequestView::cookie`](crate::http::RequestView::cookie)). Finding them and writing the request without them live side by side here so that
//! what is read and what is removed can never differ.

use std::borrow::Cow;

/// The prefix of a `Sec-WebSocket-Protocol` entry that carries a token.
pub const BEARER_PROTOCOL: &str = "bearer.";

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive, RFC 9110 §11.1).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value.get(7..)?.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The first value of the query parameter `name` in a request target, percent-decoded.
pub fn query<'a>(target: &'a [u8], name: &str) -> Option<Cow<'a, [u8]>> {
    let start = target.iter().position(|&b| b == b'?')? + 1;
    let query = target.get(start..)?;
    let query = query.split(|&b| b == b'#').next().unwrap_or_default();
    query.split(|&b| b == b'&').find_map(|pair| {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (percent_decode(key).as_ref() == name.as_bytes()).then(|| percent_decode(value))
    })
}

/// A request target without the query parameters named in `names` (the `?` dropped when none is left).
pub fn without_query<'a>(target: &'a str, names: &[String]) -> Cow<'a, str> {
    let Some(q) = target.find('?') else {
        return Cow::Borrowed(target);
    };
    let (path, query) = target.split_at(q);
    let query = &query[1..];
    let drop = |pair: &str| {
        let key = pair.split('=').next().unwrap_or_default();
        let key = percent_decode(key.as_bytes());
        names.iter().any(|n| n.as_bytes() == key.as_ref())
    };
    if !query.split('&').any(drop) {
        return Cow::Borrowed(target);
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !drop(p)).collect();
    if kept.is_empty() {
        Cow::Owned(path.to_string())
    } else {
        Cow::Owned(format!("{path}?{}", kept.join("&")))
    }
}

/// The token of the first `bearer.<token>` entry in a `Sec-WebSocket-Protocol` value.
pub fn bearer_protocol(value: &[u8]) -> Option<&[u8]> {
    value.split(|&b| b == b',').find_map(|entry| {
        let entry = entry.trim_ascii();
        let prefix = entry.get(..BEARER_PROTOCOL.len())?;
        prefix
            .eq_ignore_ascii_case(BEARER_PROTOCOL.as_bytes())
            .then(|| &entry[BEARER_PROTOCOL.len()..])
            .filter(|t| !t.is_empty())
    })
}

/// A `Sec-WebSocket-Protocol` value without its `bearer.` entries (empty when nothing else was offered).
pub fn without_bearer_protocols(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for entry in value.split(|&b| b == b',') {
        let entry = entry.trim_ascii();
        let is_bearer = entry
            .get(..BEARER_PROTOCOL.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(BEARER_PROTOCOL.as_bytes()));
        if entry.is_empty() || is_bearer {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(entry);
    }
    out
}

/// `%XX` sequences decoded and `+` read as a space (form encoding, as query strings use it); malformed escapes are
/// kept as they are.
fn percent_decode(bytes: &[u8]) -> Cow<'_, [u8]> {
    if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(bytes);
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_whatever_the_scheme_case() {
        assert_eq!(bearer(b"Bearer abc.def.ghi"), Some(&b"abc.def.ghi"[..]));
        assert_eq!(bearer(b"bearer  t"), Some(&b"t"[..]));
        assert_eq!(bearer(b"Basic dXNlcjpw"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn query_parameters_are_found_and_removed() {
        assert_eq!(query(b"/ws?x=1&token=a%2Eb&y", "token").as_deref(), Some(&b"a.b"[..]));
        assert_eq!(query(b"/ws?tokenx=1", "token"), None);
        assert_eq!(query(b"/ws", "token"), None);
        let names = ["token".to_string()];
        assert_eq!(without_query("/ws?x=1&token=abc&y=2", &names), "/ws?x=1&y=2");
        assert_eq!(without_query("/ws?token=abc", &names), "/ws");
        assert_eq!(
            without_query("/ws?to%6Ben=abc", &names),
            "/ws",
            "an encoded name is the same name"
        );
        assert!(matches!(without_query("/ws?x=1", &names), Cow::Borrowed(_)));
    }

    #[test]
    fn bearer_protocol_entries_are_found_and_removed() {
        assert_eq!(bearer_protocol(b"chat, bearer.abc.def"), Some(&b"abc.def"[..]));
        assert_eq!(bearer_protocol(b"chat"), None);
        assert_eq!(without_bearer_protocols(b"chat, bearer.abc, v2"), b"chat, v2");
        assert_eq!(without_bearer_protocols(b"bearer.abc"), b"");
    }
}
