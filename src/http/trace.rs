//! W3C trace context (`traceparent`, `tracestate`): a request that carries a valid `traceparent` continues its
//! trace, with a new span id for wsgate's hop; any other starts a new trace. The backend gets wsgate's
//! `traceparent` (and the client's `tracestate`, only with a trace it continues); the access log gets the trace id.

/// A request's trace as wsgate forwards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: [u8; 16],
    /// wsgate's span: the parent the backend sees.
    pub span_id: [u8; 8],
    pub flags: u8,
    /// The client's trace was continued (its `tracestate` goes on with it).
    pub continued: bool,
    /// The client's span (the parent id of its `traceparent`), when its trace was continued: the parent of
    /// wsgate's span in an exported span.
    pub parent: Option<[u8; 8]>,
}

impl Trace {
    /// Continues the trace of `traceparent` (the header's value, when the request has exactly one that is valid),
    /// or starts one.
    pub fn of(traceparent: Option<&[u8]>) -> Trace {
        let span_id = random_nonzero::<8>();
        match traceparent.and_then(parse) {
            Some((trace_id, parent, flags)) => Trace {
                trace_id,
                span_id,
                flags,
                continued: true,
                parent: Some(parent),
            },
            // Sampled: wsgate has no sampler of its own, so a trace it starts is recorded downstream.
            None => Trace {
                trace_id: random_nonzero::<16>(),
                span_id,
                flags: 0x01,
                continued: false,
                parent: None,
            },
        }
    }

    /// The `traceparent` value for the backend.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }

    /// Its sampled flag: set on a trace wsgate starts, the client's choice on one it continues.
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }
}

/// The trace id, parent id and flags of a `traceparent` value: `VERSION-TRACEID-PARENTID-FLAGS` in lowercase hex, version `00`
/// exactly so, a later version (not `ff`) by its first four fields; an all-zero trace or parent id is invalid.
fn parse(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim_ascii();
    let version = unhex::<1>(value.get(0..2)?)?[0];
    if version == 0xff || (version == 0 && value.len() != 55) || value.len() < 55 {
        return None;
    }
    if value.get(2) != Some(&b'-') || value.get(35) != Some(&b'-') || value.get(52) != Some(&b'-') {
        return None;
    }
    if version != 0 && value.len() > 55 && value.get(55) != Some(&b'-') {
        return None;
    }
    let trace_id = unhex::<16>(value.get(3..35)?)?;
    let parent = unhex::<8>(value.get(36..52)?)?;
    let flags = unhex::<1>(value.get(53..55)?)?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

/// `N` bytes from `2N` lowercase hex digits.
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Random bytes, not all zero (the crypto provider's generator; a failure of it falls back to the hasher's keys).
fn random_nonzero<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if crate::tls::provider().secure_random.fill(&mut out).is_err() || out == [0; N] {
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let value = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), i) | 1;
            chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let t = Trace::of(Some(VALID));
        assert!(t.continued);
        assert_eq!(hex(&t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        let header = t.header();
        assert!(header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{header}");
        assert!(!header.contains("00f067aa0ba902b7"), "a new span id: {header}");
        assert_eq!(t.parent.map(|p| hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(parse(header.as_bytes()).map(|(id, _, _)| id), Some(t.trace_id));
    }

    #[test]
    fn invalid_traceparents_start_a_new_trace() {
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"garbage",
            b"",
        ] {
            let t = Trace::of(Some(bad));
            assert!(!t.continued, "{}", String::from_utf8_lossy(bad));
            assert_eq!(t.parent, None);
            assert_ne!(t.trace_id, [0; 16]);
            assert_eq!(parse(t.header().as_bytes()).map(|(id, _, _)| id), Some(t.trace_id));
        }
        // A later version is read by its first fields.
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(Trace::of(Some(later)).continued);
    }
}
