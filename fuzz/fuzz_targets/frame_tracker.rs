//! Drives `relay::frame::Tracker` the way the frames relay does: bytes arrive in reads of arbitrary sizes, what
//! the tracker does not take yet is carried in front of the next read, and the walk ends at the first violation.
//! Also checks `parse_header` on the raw stream.
//!
//! Input layout (missing bytes read as 0):
//! - byte 0: flags. bit 0 `masked`, bit 1 `rsv1_allowed`, bit 2 `validate_utf8`, bit 3 `max_frame_size` = byte 1,
//!   bit 4 `max_message_size` = byte 2, bit 5 `set_budget(Some(byte 3))`.
//! - bytes 1, 2, 3: the limits above, used only when their flag is set.
//! - byte 4: the number of read boundaries (low 4 bits, so 0 to 15).
//! - then one byte per boundary: the length of each read in turn (0 is an empty read); a last read takes the rest.
//! - the rest: the bytes one side of a WebSocket connection sends.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::relay::frame::{self, Rules, Step, Tracker, Violation, opcode};

const PREFIX: usize = 5;

struct Input<'a> {
    rules: Rules,
    budget: Option<u64>,
    reads: Vec<&'a [u8]>,
    stream: &'a [u8],
}

fn decode(data: &[u8]) -> Input<'_> {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let flags = byte(0);
    let flag = |bit: u8| flags & (1 << bit) != 0;
    let rules = Rules {
        masked: flag(0),
        rsv1_allowed: flag(1),
        validate_utf8: flag(2),
        max_frame_size: flag(3).then(|| u64::from(byte(1))),
        max_message_size: flag(4).then(|| u64::from(byte(2))),
    };
    let budget = flag(5).then(|| u64::from(byte(3)));
    let cuts = usize::from(byte(4) & 0x0F);
    let lens = data.get(PREFIX..).unwrap_or_default();
    let lens = &lens[..cuts.min(lens.len())];
    let stream = data.get(PREFIX + lens.len()..).unwrap_or_default();
    let mut reads = Vec::with_capacity(lens.len() + 1);
    let mut rest = stream;
    for &len in lens {
        let (read, after) = rest.split_at(usize::from(len).min(rest.len()));
        reads.push(read);
        rest = after;
    }
    reads.push(rest);
    Input {
        rules,
        budget,
        reads,
        stream,
    }
}

/// What the relay did with one side's bytes.
#[derive(Debug)]
struct Walk {
    passed: Vec<u8>,
    controls: Vec<(u8, Vec<u8>)>,
    violation: Option<Violation>,
    /// Bytes still carried when the reads ran out.
    carried: usize,
}

/// The relay's loop (as `walk()` in tests/frame_codec.rs), with every step's contract asserted.
fn walk(rules: Rules, budget: Option<u64>, reads: &[&[u8]]) -> Walk {
    let mut tracker = Tracker::new(rules);
    tracker.set_budget(budget);
    let mut out = Walk {
        passed: Vec::new(),
        controls: Vec::new(),
        violation: None,
        carried: 0,
    };
    let mut carry: Vec<u8> = Vec::new();
    for read in reads {
        let mut buf = std::mem::take(&mut carry);
        buf.extend_from_slice(read);
        let mut pos = 0;
        while pos < buf.len() {
            let rest = &buf[pos..];
            match tracker.next(rest) {
                Step::Pass(n) => {
                    assert!(n > 0, "Pass(0) on {} bytes", rest.len());
                    assert!(n <= rest.len(), "Pass({n}) on {} bytes", rest.len());
                    out.passed.extend_from_slice(&rest[..n]);
                    pos += n;
                }
                Step::Control(c) => {
                    assert!(
                        c.wire_len <= rest.len(),
                        "Control of {} bytes on {} bytes",
                        c.wire_len,
                        rest.len()
                    );
                    check_control(rules, &c, &rest[..c.wire_len]);
                    assert!(tracker.at_boundary(), "Control inside a data frame");
                    out.passed.extend_from_slice(&rest[..c.wire_len]);
                    out.controls.push((c.opcode, c.payload().to_vec()));
                    pos += c.wire_len;
                }
                Step::NeedMore => {
                    assert!(
                        rest.len() <= frame::MAX_CONTROL_FRAME,
                        "NeedMore would carry {} bytes",
                        rest.len()
                    );
                    assert!(tracker.at_boundary(), "NeedMore inside a data frame");
                    carry = rest.to_vec();
                    break;
                }
                Step::Violation(v) => {
                    let _ = (v.close_code(), v.to_string());
                    out.violation = Some(v);
                    return out;
                }
            }
        }
        if let Some(budget) = budget {
            assert!(tracker.messages() <= budget, "{} messages on a budget of {budget}", tracker.messages());
        }
    }
    out.carried = carry.len();
    out
}

/// A control frame as reported must be the frame on the wire: a valid header, its payload unmasked.
fn check_control(rules: Rules, c: &frame::Control, wire: &[u8]) {
    assert!(matches!(c.opcode, opcode::CLOSE | opcode::PING | opcode::PONG), "opcode {}", c.opcode);
    let h = frame::parse_header(wire)
        .expect("control frame with a bad length")
        .expect("control frame without a whole header");
    assert!(h.fin && h.rsv == 0 && h.opcode == c.opcode);
    assert_eq!(h.mask.is_some(), rules.masked);
    assert_eq!(h.len as u64 + h.payload_len, c.wire_len as u64);
    let mut payload = wire[h.len..].to_vec();
    if let Some(key) = h.mask {
        frame::apply_mask(&mut payload, key, 0);
    }
    assert_eq!(c.payload(), &payload[..]);
    assert!(payload.len() <= frame::MAX_CONTROL_PAYLOAD);
    if c.opcode == opcode::CLOSE && !payload.is_empty() {
        let (code, reason) = c.close().expect("close frame of 1 byte accepted");
        assert!(frame::valid_close_code(code), "close code {code} accepted");
        assert_eq!(reason.as_bytes(), &payload[2..], "close reason is not valid UTF-8");
    }
}

/// `parse_header` on the raw bytes: lengths in range, and `write_header` writes a header that reads back the same.
fn check_header(bytes: &[u8]) {
    let Ok(Some(h)) = frame::parse_header(bytes) else {
        return;
    };
    assert!(h.len <= frame::MAX_HEADER && h.len <= bytes.len());
    assert!(h.payload_len >> 63 == 0);
    let mut out = [0u8; frame::MAX_HEADER];
    let n = frame::write_header(&mut out, h.fin, h.opcode, h.mask, h.payload_len);
    out[0] |= h.rsv << 4;
    let back = frame::parse_header(&out[..n]);
    assert_eq!(back, Ok(Some(frame::Header { len: n, ..h })));
}

fuzz_target!(|data: &[u8]| {
    let input = decode(data);
    check_header(input.stream);

    let pieces = walk(input.rules, input.budget, &input.reads);
    assert!(
        input.stream.starts_with(&pieces.passed),
        "passed bytes are not a prefix of the input"
    );
    if pieces.violation.is_none() {
        // Everything was either passed or is still carried for the next read.
        assert_eq!(pieces.passed.len() + pieces.carried, input.stream.len());
    }

    // The read boundaries change nothing but when an invalid UTF-8 payload is noticed (as the proptest
    // `any_bytes_give_the_same_walk_whatever_the_read_boundaries` in tests/frame_codec.rs states).
    let whole = walk(input.rules, input.budget, &[input.stream]);
    assert_eq!(whole.violation, pieces.violation, "verdict depends on the read boundaries");
    assert_eq!(whole.controls, pieces.controls, "control frames depend on the read boundaries");
    if whole.violation != Some(Violation::InvalidUtf8) {
        assert_eq!(whole.passed, pieces.passed, "passed bytes depend on the read boundaries");
    }
});
