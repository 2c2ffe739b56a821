//! The frame codec on its own: split invariance, agreement with tungstenite's header parser, and the rules it
//! enforces.

use std::io::Cursor;

use proptest::prelude::*;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use wsgate::ws::frame::{self, Rules, Step, Tracker, Violation, opcode};

/// What a relay does with a tracker's steps: the bytes it passes on, the control frames it sees, and the
/// violation that ends the walk, for bytes arriving in `chunks`.
#[derive(Debug, PartialEq)]
struct Walk {
    passed: Vec<u8>,
    controls: Vec<(u8, Vec<u8>)>,
    violation: Option<Violation>,
}

fn walk(rules: Rules, chunks: &[&[u8]]) -> Walk {
    let mut tracker = Tracker::new(rules);
    let mut out = Walk {
        passed: Vec::new(),
        controls: Vec::new(),
        violation: None,
    };
    let mut carry: Vec<u8> = Vec::new();
    for chunk in chunks {
        let mut buf = std::mem::take(&mut carry);
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        while pos < buf.len() {
            match tracker.next(&buf[pos..]) {
                Step::Pass(n) => {
                    assert!(n > 0, "Pass(0) on a non-empty buffer");
                    out.passed.extend_from_slice(&buf[pos..pos + n]);
                    pos += n;
                }
                Step::Control(c) => {
                    out.passed.extend_from_slice(&buf[pos..pos + c.wire_len]);
                    out.controls.push((c.opcode, c.payload().to_vec()));
                    pos += c.wire_len;
                }
                Step::NeedMore => {
                    assert!(
                        buf.len() - pos <= frame::MAX_CONTROL_FRAME,
                        "carry would exceed a control frame"
                    );
                    carry = buf[pos..].to_vec();
                    break;
                }
                Step::Violation(v) => {
                    out.violation = Some(v);
                    return out;
                }
            }
        }
    }
    out
}

fn encode(fin: bool, rsv: u8, op: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; frame::MAX_HEADER];
    let n = frame::write_header(&mut header, fin, op, mask, payload.len() as u64);
    header[0] |= (rsv & 0x7) << 4;
    let mut out = header[..n].to_vec();
    let mut body = payload.to_vec();
    if let Some(key) = mask {
        frame::apply_mask(&mut body, key, 0);
    }
    out.extend_from_slice(&body);
    out
}

const CLIENT: Rules = Rules {
    masked: true,
    rsv1_allowed: false,
    validate_utf8: true,
    max_frame_size: None,
    max_message_size: None,
};

/// A valid client stream: messages (some fragmented, text or binary) with pings and pongs between frames.
fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    let message = (
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..4),
        any::<[u8; 4]>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..125)),
    );
    prop::collection::vec(message, 0..12).prop_map(|messages| {
        let mut out = Vec::new();
        for (text, fragments, key, ping) in messages {
            let last = fragments.len() - 1;
            for (i, data) in fragments.iter().enumerate() {
                let op = match (i, text) {
                    (0, true) => opcode::TEXT,
                    (0, false) => opcode::BINARY,
                    _ => opcode::CONTINUATION,
                };
                // Text payloads are made valid UTF-8 (ASCII) so the stream is valid.
                let data: Vec<u8> = if text {
                    data.iter().map(|b| b & 0x7F).collect()
                } else {
                    data.clone()
                };
                out.extend(encode(i == last, 0, op, Some(key), &data));
                if let Some(p) = &ping {
                    out.extend(encode(true, 0, opcode::PING, Some(key), p));
                }
            }
        }
        out
    })
}

fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        out.push(bytes[last..p].to_vec());
        last = p;
    }
    out
}

proptest! {
    #[test]
    fn a_valid_stream_passes_whole_whatever_the_read_boundaries(
        stream in valid_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let chunks = split(&stream, &cuts);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let walked = walk(CLIENT, &refs);
        prop_assert_eq!(walked.violation, None);
        prop_assert_eq!(walked.passed, stream);
    }

    #[test]
    fn any_bytes_give_the_same_walk_whatever_the_read_boundaries(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
        masked in any::<bool>(),
    ) {
        let rules = Rules { masked, ..CLIENT };
        let whole = walk(rules, &[&bytes]);
        let chunks = split(&bytes, &cuts);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let pieces = walk(rules, &refs);
        // A violation inside a payload may be found after fewer passed bytes when the payload comes in pieces,
        // but what is passed is always a prefix of the input, and the verdict is the same.
        prop_assert_eq!(&whole.violation, &pieces.violation);
        prop_assert!(bytes.starts_with(&pieces.passed));
        prop_assert_eq!(whole.controls, pieces.controls);
        if whole.violation.is_none() || !matches!(whole.violation, Some(Violation::InvalidUtf8)) {
            prop_assert_eq!(whole.passed, pieces.passed);
        }
    }

    #[test]
    fn headers_agree_with_tungstenite(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
        let mut cursor = Cursor::new(&bytes[..]);
        let theirs = FrameHeader::parse(&mut cursor);
        let ours = frame::parse_header(&bytes);
        match (theirs, ours) {
            (Ok(None), Ok(None)) => {}
            (Ok(Some((h, len))), Ok(Some(mine))) => {
                prop_assert_eq!(mine.len as u64, cursor.position());
                prop_assert_eq!(mine.payload_len, len);
                prop_assert_eq!(mine.fin, h.is_final);
                prop_assert_eq!(mine.rsv, (u8::from(h.rsv1) << 2) | (u8::from(h.rsv2) << 1) | u8::from(h.rsv3));
                prop_assert_eq!(mine.mask, h.mask);
                prop_assert_eq!(mine.opcode, u8::from(h.opcode));
            }
            (Ok(Some((_, len))), Err(frame::BadLength)) => prop_assert!(len >> 63 != 0),
            // An impossible length is refused as soon as it is read, before the mask key has arrived.
            (Ok(None), Err(frame::BadLength)) => {
                prop_assert!(bytes.len() >= 10 && bytes[1] & 0x7F == 127 && bytes[2] & 0x80 != 0)
            }
            // A reserved opcode with an impossible length: tungstenite names the opcode, the parser the length.
            (Err(_), Err(frame::BadLength)) => {
                prop_assert!(matches!(bytes[0] & 0x0F, 3..=7 | 11..=15) && bytes[1] & 0x7F == 127 && bytes[2] & 0x80 != 0)
            }
            (Err(_), Ok(Some(mine))) => {
                // tungstenite refuses reserved opcodes in the parser; the tracker refuses them as a protocol error.
                prop_assert!(matches!(mine.opcode, 3..=7 | 11..=15));
                let step = Tracker::new(Rules { masked: mine.mask.is_some(), rsv1_allowed: true, ..Rules::default() })
                    .next(&bytes);
                prop_assert!(matches!(step, Step::Violation(Violation::Protocol(_))), "{:?}", step);
            }
            (theirs, ours) => prop_assert!(false, "tungstenite {:?}, wsgate {:?}", theirs.map(|o| o.map(|(_, l)| l)), ours),
        }
    }
}

fn first_violation(rules: Rules, bytes: &[u8]) -> Option<Violation> {
    walk(rules, &[bytes]).violation
}

#[test]
fn protocol_rules_are_enforced_with_their_close_codes() {
    let key = Some([1, 2, 3, 4]);
    let cases: Vec<(&str, Rules, Vec<u8>, u16)> = vec![
        (
            "unmasked client frame",
            CLIENT,
            encode(true, 0, opcode::TEXT, None, b"hi"),
            1002,
        ),
        (
            "masked backend frame",
            Rules {
                masked: false,
                ..CLIENT
            },
            encode(true, 0, opcode::TEXT, key, b"hi"),
            1002,
        ),
        ("reserved opcode", CLIENT, encode(true, 0, 3, key, b""), 1002),
        (
            "RSV1 without deflate",
            CLIENT,
            encode(true, 4, opcode::TEXT, key, b"x"),
            1002,
        ),
        (
            "RSV2",
            Rules {
                rsv1_allowed: true,
                ..CLIENT
            },
            encode(true, 2, opcode::BINARY, key, b"x"),
            1002,
        ),
        (
            "fragmented ping",
            CLIENT,
            encode(false, 0, opcode::PING, key, b""),
            1002,
        ),
        (
            "ping over 125",
            CLIENT,
            encode(true, 0, opcode::PING, key, &[0; 126]),
            1002,
        ),
        (
            "continuation first",
            CLIENT,
            encode(true, 0, opcode::CONTINUATION, key, b"x"),
            1002,
        ),
        (
            "message inside a message",
            CLIENT,
            [
                encode(false, 0, opcode::TEXT, key, b"a"),
                encode(true, 0, opcode::TEXT, key, b"b"),
            ]
            .concat(),
            1002,
        ),
        ("1-byte close", CLIENT, encode(true, 0, opcode::CLOSE, key, &[3]), 1002),
        (
            "close code 1005",
            CLIENT,
            encode(true, 0, opcode::CLOSE, key, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 999",
            CLIENT,
            encode(true, 0, opcode::CLOSE, key, &999u16.to_be_bytes()),
            1002,
        ),
        (
            "invalid UTF-8 text",
            CLIENT,
            encode(true, 0, opcode::TEXT, key, &[0xC3, 0x28]),
            1007,
        ),
        (
            "UTF-8 cut at the end of a message",
            CLIENT,
            encode(true, 0, opcode::TEXT, key, "é".as_bytes().get(..1).unwrap_or_default()),
            1007,
        ),
        (
            "message over the size limit",
            Rules {
                max_message_size: Some(10),
                ..CLIENT
            },
            [
                encode(false, 0, opcode::BINARY, key, &[0; 6]),
                encode(true, 0, opcode::CONTINUATION, key, &[0; 6]),
            ]
            .concat(),
            1009,
        ),
        (
            "frame over the size limit",
            Rules {
                max_frame_size: Some(4),
                ..CLIENT
            },
            encode(true, 0, 2, key, &[0; 5]),
            1009,
        ),
        (
            "frame after close",
            CLIENT,
            [
                encode(true, 0, opcode::CLOSE, key, &1000u16.to_be_bytes()),
                encode(true, 0, 1, key, b"late"),
            ]
            .concat(),
            1002,
        ),
    ];
    for (name, rules, bytes, code) in cases {
        let v = first_violation(rules, &bytes).unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(v.close_code(), code, "{name}: {v}");
    }
}

#[test]
fn valid_edge_cases_pass() {
    let key = Some([9, 8, 7, 6]);
    let cases: Vec<(&str, Rules, Vec<u8>)> = vec![
        (
            "compressed text with deflate",
            Rules {
                rsv1_allowed: true,
                ..CLIENT
            },
            encode(true, 4, 1, key, &[0xFF, 0x00]),
        ),
        ("UTF-8 split across fragments", CLIENT, {
            let e = "é".as_bytes();
            [
                encode(false, 0, opcode::TEXT, key, &e[..1]),
                encode(true, 0, opcode::CONTINUATION, key, &e[1..]),
            ]
            .concat()
        }),
        ("ping inside a fragmented message", CLIENT, {
            [
                encode(false, 0, opcode::BINARY, key, b"ab"),
                encode(true, 0, opcode::PING, key, b"p"),
                encode(true, 0, opcode::CONTINUATION, key, b"cd"),
            ]
            .concat()
        }),
        ("empty close", CLIENT, encode(true, 0, opcode::CLOSE, key, b"")),
        (
            "close 4001 with a reason",
            CLIENT,
            encode(
                true,
                0,
                opcode::CLOSE,
                key,
                &[&4001u16.to_be_bytes()[..], b"bye"].concat(),
            ),
        ),
        (
            "64 KiB frame",
            Rules {
                masked: false,
                ..CLIENT
            },
            encode(true, 0, opcode::BINARY, None, &vec![7; 65536]),
        ),
        (
            "limits at their bound",
            Rules {
                max_message_size: Some(6),
                max_frame_size: Some(6),
                ..CLIENT
            },
            encode(true, 0, 2, key, &[0; 6]),
        ),
    ];
    for (name, rules, bytes) in cases {
        let walked = walk(rules, &[&bytes]);
        assert_eq!(walked.violation, None, "{name}");
        assert_eq!(walked.passed, bytes, "{name}");
    }
}

#[test]
fn messages_are_counted_once_and_the_rate_budget_refuses_the_next() {
    let key = Some([1, 1, 1, 1]);
    let bytes = [
        encode(false, 0, opcode::TEXT, key, b"a"),
        encode(true, 0, opcode::CONTINUATION, key, b"b"),
        encode(true, 0, opcode::BINARY, key, b"c"),
        encode(true, 0, opcode::BINARY, key, b"d"),
    ]
    .concat();
    let mut tracker = Tracker::new(CLIENT);
    tracker.set_budget(Some(2));
    let Step::Pass(n) = tracker.next(&bytes) else {
        panic!("expected a pass")
    };
    assert_eq!(tracker.messages(), 2);
    assert_eq!(tracker.next(&bytes[n..]), Step::Violation(Violation::RateLimited));
}

#[test]
fn a_close_frame_is_reported_with_code_and_reason() {
    let bytes = encode(
        true,
        0,
        opcode::CLOSE,
        Some([5, 6, 7, 8]),
        &[&4002u16.to_be_bytes()[..], b"going"].concat(),
    );
    let Step::Control(c) = Tracker::new(CLIENT).next(&bytes) else {
        panic!("expected a control frame")
    };
    assert_eq!(c.close(), Some((4002, "going")));
    assert_eq!(c.wire_len, bytes.len());
}
