//! Drives `ws::frame::Tracker` the way the frames relay does: bytes arrive in reads of arbitrary sizes, what
//! the tracker does not take yet is carried in front of the next read, and the walk ends at the first violation.
//! Also checks `parse_header` on the raw stream.
//!
//! Input layout (missing bytes read as 0):
//! - byte 0: flags. bit 0 `masked`, bit 1 `rsv1_allowed`, bit 2 `validate_utf8`, bit 3 `max_frame_size` = byte 1,
//!   bit 4 `max_message_size` = byte 2, bit 5 `set_budget(Some(byte 3))`, bit 6 `set_stop_at_boundary(true)`
//!   before the first read, bit 7 flip `stop_at_boundary` after every read (as the relay does when it has a frame
//!   of its own to send, and once it has sent it).
//! - bytes 1, 2, 3: the limits above, used only when their flag is set.
//! - byte 4: the number of read boundaries (low 4 bits, so 0 to 15).
//! - then one byte per boundary: the length of each read in turn (0 is an empty read); a last read takes the rest.
//! - the rest: the bytes one side of a WebSocket connection sends.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::ws::frame::{self, Rules, Step, Tracker, Violation, opcode};

const PREFIX: usize = 5;

#[derive(Debug, Clone, Copy)]
struct Drive {
    rules: Rules,
    budget: Option<u64>,
    stop_at_boundary: bool,
    flip_after_each_read: bool,
}

struct Input<'a> {
    drive: Drive,
    reads: Vec<&'a [u8]>,
    stream: &'a [u8],
}

fn decode(data: &[u8]) -> Input<'_> {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let flags = byte(0);
    let flag = |bit: u8| flags & (1 << bit) != 0;
    let drive = Drive {
        rules: Rules {
            masked: flag(0),
            rsv1_allowed: flag(1),
            validate_utf8: flag(2),
            max_frame_size: flag(3).then(|| u64::from(byte(1))),
            max_message_size: flag(4).then(|| u64::from(byte(2))),
        },
        budget: flag(5).then(|| u64::from(byte(3))),
        stop_at_boundary: flag(6),
        flip_after_each_read: flag(7),
    };
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
    Input { drive, reads, stream }
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

/// Offsets in `stream` where a frame ends, by reading headers one after the other (valid or not).
fn frame_ends(stream: &[u8]) -> Vec<u64> {
    let mut ends = Vec::new();
    let mut pos = 0u64;
    while let Some(rest) = usize::try_from(pos).ok().and_then(|p| stream.get(p..)) {
        let Ok(Some(h)) = frame::parse_header(rest) else {
            break;
        };
        pos += h.len as u64 + h.payload_len;
        ends.push(pos);
    }
    ends
}

/// The relay's loop (as `walk()` in tests/frame_codec.rs), with every step's contract asserted.
fn walk(drive: Drive, reads: &[&[u8]], ends: &[u64]) -> Walk {
    let mut tracker = Tracker::new(drive.rules);
    tracker.set_budget(drive.budget);
    let mut stop_at_boundary = drive.stop_at_boundary;
    tracker.set_stop_at_boundary(stop_at_boundary);
    let mut out = Walk {
        passed: Vec::new(),
        controls: Vec::new(),
        violation: None,
        carried: 0,
    };
    // A pass that ended inside a frame with bytes left: only a violation may come next.
    let mut violation_due = false;
    let mut carry: Vec<u8> = Vec::new();
    for read in reads {
        let mut buf = std::mem::take(&mut carry);
        buf.extend_from_slice(read);
        let mut pos = 0;
        while pos < buf.len() {
            let rest = &buf[pos..];
            let step = tracker.next(rest);
            assert!(
                !violation_due || matches!(step, Step::Violation(_)),
                "a pass stopped inside a frame, then {step:?}"
            );
            match step {
                Step::Pass(n) => {
                    assert!(n > 0, "Pass(0) on {} bytes", rest.len());
                    assert!(n <= rest.len(), "Pass({n}) on {} bytes", rest.len());
                    let from = out.passed.len() as u64;
                    let to = from + n as u64;
                    if stop_at_boundary {
                        // The relay puts its own frame at the first boundary: a pass may not run past one.
                        assert!(
                            !ends.iter().any(|&e| from < e && e < to),
                            "Pass({n}) from offset {from} runs past a frame boundary (frames end at {ends:?})"
                        );
                    }
                    violation_due = n < rest.len() && !tracker.at_boundary();
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
                    check_control(drive.rules, &c, &rest[..c.wire_len]);
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
        if let Some(budget) = drive.budget {
            assert!(
                tracker.messages() <= budget,
                "{} messages on a budget of {budget}",
                tracker.messages()
            );
        }
        if drive.flip_after_each_read {
            stop_at_boundary = !stop_at_boundary;
            tracker.set_stop_at_boundary(stop_at_boundary);
        }
    }
    out.carried = carry.len();
    out
}

/// A control frame as reported must be the frame on the wire: a valid header, its payload unmasked.
fn check_control(rules: Rules, c: &frame::Control, wire: &[u8]) {
    assert!(
        matches!(c.opcode, opcode::CLOSE | opcode::PING | opcode::PONG),
        "opcode {}",
        c.opcode
    );
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
    let ends = frame_ends(input.stream);

    let pieces = walk(input.drive, &input.reads, &ends);
    assert!(
        input.stream.starts_with(&pieces.passed),
        "passed bytes are not a prefix of the input"
    );
    if pieces.violation.is_none() {
        // Everything was either passed or is still carried for the next read.
        assert_eq!(pieces.passed.len() + pieces.carried, input.stream.len());
    }

    // Read boundaries and stop_at_boundary change nothing but when an invalid UTF-8 payload is noticed (as the
    // proptest `any_bytes_give_the_same_walk_whatever_the_read_boundaries` in tests/frame_codec.rs states).
    let one_read = Drive {
        stop_at_boundary: false,
        flip_after_each_read: false,
        ..input.drive
    };
    let whole = walk(one_read, &[input.stream], &ends);
    assert_eq!(
        whole.violation, pieces.violation,
        "verdict depends on the read boundaries"
    );
    assert_eq!(
        whole.controls, pieces.controls,
        "control frames depend on the read boundaries"
    );
    if whole.violation != Some(Violation::InvalidUtf8) {
        assert_eq!(
            whole.passed, pieces.passed,
            "passed bytes depend on the read boundaries"
        );
    }
});
