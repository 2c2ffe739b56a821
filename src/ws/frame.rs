//! The RFC 6455 frame codec, used by the `frames` relay and the WebSocket health probe: a pure, incremental
//! tracker of frame boundaries (bytes in, steps out; no sockets, no allocation per frame).
//!
//! The relay hands [`Tracker::next`] the bytes it has read from one side. Data frames are never reassembled or
//! unmasked on the wire: the tracker walks their headers and counts their payload bytes, and answers with
//! [`Step::Pass`] for as many bytes as may go on unchanged. A control frame (close, ping, pong) is answered with
//! [`Step::Control`] once it is complete, so the relay may forward it, drop it (a pong to wsgate's own ping) or act
//! on it (a close). An incomplete header or control frame at the end of the bytes is [`Step::NeedMore`]: the relay
//! keeps those few bytes (at most [`MAX_CONTROL_FRAME`]) and puts them in front of its next read, so the tracker
//! always sees a header whole.
//!
//! Rules broken by the sender end the walk with [`Step::Violation`] before any byte of the offending frame has been
//! passed, except for invalid UTF-8, which may only show in the middle of a payload.

use crate::live::SizeCounts;

/// Largest header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER: usize = 14;
/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest whole control frame.
pub const MAX_CONTROL_FRAME: usize = MAX_HEADER + MAX_CONTROL_PAYLOAD;

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits.
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header takes on the wire.
    pub len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// A header that no length can make valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("64-bit payload length with the most significant bit set")]
pub struct BadLength;

/// Parses a frame header from the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, BadLength> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let masked = b1 & 0x80 != 0;
    let (payload_len, ext) = match b1 & 0x7F {
        126 => match rest {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 2),
            _ => return Ok(None),
        },
        127 => match rest.first_chunk::<8>() {
            Some(bytes) => {
                let len = u64::from_be_bytes(*bytes);
                if len >> 63 != 0 {
                    return Err(BadLength);
                }
                (len, 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    let mask = if masked {
        match rest.get(ext..ext + 4) {
            Some(&[a, b, c, d]) => Some([a, b, c, d]),
            _ => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        payload_len,
        len: 2 + ext + if masked { 4 } else { 0 },
    }))
}

/// Writes a frame header for a payload of `len` bytes into `out`; returns the header's length.
pub fn write_header(out: &mut [u8; MAX_HEADER], fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: u64) -> usize {
    out[0] = (u8::from(fin) << 7) | (opcode & 0x0F);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = match len {
        0..=125 => {
            out[1] = mask_bit | len as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&len.to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        out[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    n
}

/// A whole control frame of wsgate's own: masked with `mask` when it goes to a backend.
pub fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut header = [0u8; MAX_HEADER];
    let n = write_header(&mut header, true, opcode, mask, payload.len() as u64);
    let mut frame = Vec::with_capacity(n + payload.len());
    frame.extend_from_slice(&header[..n]);
    let start = frame.len();
    frame.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut frame[start..], key, 0);
    }
    frame
}

/// A close frame with `code` and as much of `reason` as fits (cut at a character boundary).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = Vec::with_capacity(MAX_CONTROL_PAYLOAD);
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control_frame(opcode::CLOSE, &payload, mask)
}

/// XORs `payload` with `key`, starting `offset` bytes into the payload (masking and unmasking are the same).
pub fn apply_mask(payload: &mut [u8], key: [u8; 4], offset: u64) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[((offset + i as u64) % 4) as usize];
    }
}

/// Why a side's frames cannot be relayed, and the close code it gets (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    #[error("message larger than {0} bytes")]
    MessageTooBig(u64),
    #[error("frame larger than {0} bytes")]
    FrameTooBig(u64),
    #[error("more messages than the rate limit allows")]
    RateLimited,
}

impl Violation {
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Protocol(_) => 1002,
            Self::InvalidUtf8 => 1007,
            Self::MessageTooBig(_) | Self::FrameTooBig(_) => 1009,
            Self::RateLimited => 1008,
        }
    }
}

/// What one side's frames must obey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rules {
    /// Client frames are masked; backend frames are not (RFC 6455 §5.1).
    pub masked: bool,
    /// RSV1 marks a compressed message when permessage-deflate was negotiated.
    pub rsv1_allowed: bool,
    pub validate_utf8: bool,
    pub max_frame_size: Option<u64>,
    pub max_message_size: Option<u64>,
}

/// A complete control frame found at the start of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub opcode: u8,
    /// Bytes the frame takes on the wire, header included.
    pub wire_len: usize,
    payload: [u8; MAX_CONTROL_PAYLOAD],
    payload_len: u8,
}

impl Control {
    /// The payload, unmasked.
    pub fn payload(&self) -> &[u8] {
        &self.payload[..usize::from(self.payload_len)]
    }

    /// A close frame's code and reason (`None` for a close without a code).
    pub fn close(&self) -> Option<(u16, &str)> {
        let payload = self.payload();
        let code = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
        Some((code, std::str::from_utf8(&payload[2..]).unwrap_or("")))
    }
}

/// What to do with the bytes at the start of the buffer given to [`Tracker::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// That many bytes (data frame headers and payload) go on unchanged.
    Pass(usize),
    /// A complete control frame.
    Control(Control),
    /// The buffer starts with an incomplete header or control frame: keep these bytes for the next read.
    NeedMore,
    /// The sender broke a rule; nothing from the offending frame has been passed (but see the module docs).
    Violation(Violation),
}

/// One direction's frame state.
#[derive(Debug, Default)]
pub struct Tracker {
    rules: Rules,
    /// Payload bytes of the current data frame still to come.
    remaining: u64,
    /// Mask key and payload offset of the current data frame, for UTF-8 checks.
    mask: Option<[u8; 4]>,
    offset: u64,
    /// The current data frame belongs to a text message that is checked for UTF-8.
    checking_utf8: bool,
    /// Inside a fragmented message (its first frame had FIN clear).
    in_message: bool,
    message_len: u64,
    utf8: Utf8,
    close_seen: bool,
    /// Messages started so far.
    messages: u64,
    /// Frames read so far, data and control.
    frames: u64,
    /// Sizes of the messages completed since the relay last took them.
    sizes: SizeCounts,
    /// Message starts allowed before the rate limit answers; `None` = no limit.
    budget: Option<u64>,
    /// A violation found after bytes that were passed first; answered on the next call.
    poisoned: Option<Violation>,
    /// End a [`Step::Pass`] at the first frame boundary, so the relay can put a frame of its own there.
    stop_at_boundary: bool,
    /// Text messages kept whole for the relay's owner (boxed: only a tapped direction has one).
    capture: Option<Box<Capture>>,
}

/// How far into a text message a [`Capture`] looks for its marker.
pub const CAPTURE_LOOK: usize = 64 * 1024;

/// Text messages with a marker in their first [`CAPTURE_LOOK`] bytes (wherever a JSON encoder put the key that
/// names it), kept whole (up to `max` bytes) as they pass and handed to `sink` once whole: the LLM gateway meters a
/// Realtime provider's `response.done` events this way, at relay speed, while a longer message without the marker
/// is dropped from view once past the window. Unmasked, uncompressed frames only (a server's, without
/// permessage-deflate).
pub struct Capture {
    marker: &'static [u8],
    max: usize,
    state: Capturing,
    buf: Vec<u8>,
    sink: Box<dyn FnMut(Vec<u8>) + Send>,
    /// Messages with the marker that were larger than `max`, and so not kept.
    pub too_large: u64,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("marker", &String::from_utf8_lossy(self.marker))
            .field("max", &self.max)
            .field("too_large", &self.too_large)
            .finish_non_exhaustive()
    }
}

/// A tracker's copy has no capture: what a capture kept goes to one place.
impl Clone for Tracker {
    fn clone(&self) -> Tracker {
        Tracker {
            rules: self.rules,
            remaining: self.remaining,
            mask: self.mask,
            offset: self.offset,
            checking_utf8: self.checking_utf8,
            in_message: self.in_message,
            message_len: self.message_len,
            utf8: self.utf8,
            close_seen: self.close_seen,
            messages: self.messages,
            frames: self.frames,
            sizes: self.sizes,
            budget: self.budget,
            poisoned: self.poisoned,
            stop_at_boundary: self.stop_at_boundary,
            capture: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capturing {
    /// Not in a message that may be kept.
    Off,
    /// In a text message, looking for the marker.
    Looking,
    /// In a message with the marker: every byte kept.
    Keeping,
}

impl Capture {
    pub fn new(marker: &'static [u8], max: usize, sink: impl FnMut(Vec<u8>) + Send + 'static) -> Capture {
        Capture {
            marker,
            max,
            state: Capturing::Off,
            buf: Vec::new(),
            sink: Box::new(sink),
            too_large: 0,
        }
    }

    fn start(&mut self, keepable: bool) {
        self.reset();
        self.state = if keepable { Capturing::Looking } else { Capturing::Off };
    }

    /// Empties the buffer, keeping up to the window's worth of room for the next message.
    fn reset(&mut self) {
        self.buf.clear();
        self.buf.shrink_to(CAPTURE_LOOK);
    }

    /// Whether the marker is in the buffer, looking only where bytes from `from` on can make it.
    fn has_marker_from(&self, from: usize) -> bool {
        let start = from.saturating_sub(self.marker.len().saturating_sub(1));
        memchr::memmem::find(&self.buf[start..], self.marker).is_some()
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        if self.state == Capturing::Looking {
            let look = bytes.len().min(CAPTURE_LOOK.saturating_sub(self.buf.len()));
            let from = self.buf.len();
            self.buf.extend_from_slice(&bytes[..look]);
            bytes = &bytes[look..];
            if self.has_marker_from(from) {
                self.state = Capturing::Keeping;
            } else if self.buf.len() >= CAPTURE_LOOK {
                self.state = Capturing::Off;
                self.reset();
            }
        }
        if self.state == Capturing::Keeping {
            if self.buf.len() + bytes.len() > self.max {
                self.too_large += 1;
                self.state = Capturing::Off;
                self.reset();
            } else {
                self.buf.extend_from_slice(bytes);
            }
        }
    }

    fn end(&mut self) {
        if self.state == Capturing::Keeping {
            (self.sink)(self.buf.clone());
        }
        self.state = Capturing::Off;
        self.reset();
    }
}

impl Tracker {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }

    /// Messages started so far (a fragmented message counts once).
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Frames read so far (data and control; a control frame once it is whole).
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Sizes of the messages completed since the last call of this, which drains them.
    pub fn sizes_mut(&mut self) -> &mut SizeCounts {
        &mut self.sizes
    }

    /// Whether the walk is between frames: something of wsgate's own may be sent to this direction's receiver.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Makes [`Tracker::next`] end each [`Step::Pass`] at the first frame boundary it reaches.
    pub fn set_stop_at_boundary(&mut self, stop: bool) {
        self.stop_at_boundary = stop;
    }

    /// Keeps the text messages `capture` looks for (see [`Capture`]).
    pub fn set_capture(&mut self, capture: Capture) {
        self.capture = Some(Box::new(capture));
    }

    /// The capture, when there is one: the messages it kept.
    pub fn capture_mut(&mut self) -> Option<&mut Capture> {
        self.capture.as_deref_mut()
    }

    /// Allows `n` more message starts; the one after is a [`Violation::RateLimited`].
    pub fn set_budget(&mut self, n: Option<u64>) {
        self.budget = n;
    }

    /// Looks at the bytes read from this side, from where the last call stopped.
    pub fn next(&mut self, buf: &[u8]) -> Step {
        if let Some(v) = self.poisoned {
            return Step::Violation(v);
        }
        let mut pos = 0;
        // Where the current data frame's header starts in `buf`, when it does.
        let mut frame_start = None;
        while pos < buf.len() {
            if self.remaining > 0 {
                let take = self.remaining.min((buf.len() - pos) as u64) as usize;
                if self.checking_utf8 {
                    let ends_message = take as u64 == self.remaining && !self.in_message;
                    let checked = self.check_utf8(&buf[pos..pos + take]);
                    // Checked before any of these bytes pass: a message may not end inside a code point either.
                    if let Err(v) = checked.and(if ends_message && !self.utf8.is_complete() {
                        Err(Violation::InvalidUtf8)
                    } else {
                        Ok(())
                    }) {
                        // When the frame's header is in these bytes too, nothing of the frame passes and the
                        // receiver stays at a frame boundary; otherwise it is left inside the frame.
                        if let Some(start) = frame_start {
                            self.remaining = 0;
                            return self.stop(start, v);
                        }
                        return self.stop(pos, v);
                    }
                }
                if let Some(capture) = self.capture.as_deref_mut() {
                    capture.feed(&buf[pos..pos + take]);
                    if take as u64 == self.remaining && !self.in_message {
                        capture.end();
                    }
                }
                self.remaining -= take as u64;
                self.offset += take as u64;
                pos += take;
                if self.remaining == 0 {
                    frame_start = None;
                    if self.stop_at_boundary {
                        return Step::Pass(pos);
                    }
                }
                continue;
            }
            let header = match parse_header(&buf[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => return if pos > 0 { Step::Pass(pos) } else { Step::NeedMore },
                Err(BadLength) => return self.stop(pos, Violation::Protocol("invalid payload length")),
            };
            if let Err(v) = self.check_header(&header) {
                return self.stop(pos, v);
            }
            if header.is_control() {
                if pos > 0 {
                    return Step::Pass(pos);
                }
                let wire_len = header.len + header.payload_len as usize;
                let Some(wire) = buf.get(..wire_len) else {
                    return Step::NeedMore;
                };
                return match self.control(&header, wire) {
                    Ok(control) => Step::Control(control),
                    Err(v) => Step::Violation(v),
                };
            }
            if let Err(v) = self.start_data_frame(&header) {
                return self.stop(pos, v);
            }
            if header.payload_len == 0 && header.fin && self.checking_utf8 && !self.utf8.is_complete() {
                return self.stop(pos, Violation::InvalidUtf8);
            }
            if header.payload_len > 0 {
                frame_start = Some(pos);
            }
            pos += header.len;
            if header.payload_len == 0 && self.stop_at_boundary {
                return Step::Pass(pos);
            }
        }
        Step::Pass(pos)
    }

    /// Ends the walk with a violation, passing what came before it first.
    fn stop(&mut self, pos: usize, v: Violation) -> Step {
        if pos > 0 {
            // The bytes before the violation are fine; the violation is the answer to the next call.
            self.poisoned = Some(v);
            return Step::Pass(pos);
        }
        self.poisoned = Some(v);
        Step::Violation(v)
    }

    fn check_header(&self, h: &Header) -> Result<(), Violation> {
        if self.close_seen {
            return Err(Violation::Protocol("frame after a close frame"));
        }
        if h.mask.is_some() != self.rules.masked {
            return Err(Violation::Protocol(if self.rules.masked {
                "client frame not masked"
            } else {
                "backend frame masked"
            }));
        }
        let rsv_allowed = if self.rules.rsv1_allowed { 0b100 } else { 0 };
        if h.rsv & !rsv_allowed != 0 {
            return Err(Violation::Protocol("reserved bits set without a negotiated extension"));
        }
        match h.opcode {
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if !h.fin {
                    return Err(Violation::Protocol("fragmented control frame"));
                }
                if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol("control frame payload over 125 bytes"));
                }
                if h.rsv != 0 {
                    return Err(Violation::Protocol("reserved bits set on a control frame"));
                }
                return Ok(());
            }
            _ => return Err(Violation::Protocol("reserved opcode")),
        }
        if let Some(max) = self.rules.max_frame_size
            && h.payload_len > max
        {
            return Err(Violation::FrameTooBig(max));
        }
        Ok(())
    }

    fn start_data_frame(&mut self, h: &Header) -> Result<(), Violation> {
        let continuation = h.opcode == opcode::CONTINUATION;
        if continuation && !self.in_message {
            return Err(Violation::Protocol("continuation frame without a message to continue"));
        }
        if !continuation && self.in_message {
            return Err(Violation::Protocol("new message inside a fragmented message"));
        }
        if continuation && h.rsv != 0 {
            return Err(Violation::Protocol("reserved bits set on a continuation frame"));
        }
        let message_len = if continuation { self.message_len } else { 0 };
        let message_len = message_len.saturating_add(h.payload_len);
        if let Some(max) = self.rules.max_message_size
            && message_len > max
        {
            return Err(Violation::MessageTooBig(max));
        }
        if !continuation {
            if let Some(budget) = &mut self.budget {
                if *budget == 0 {
                    return Err(Violation::RateLimited);
                }
                *budget -= 1;
            }
            self.messages += 1;
            // Compressed text is checked after inflation by the endpoint, not here.
            self.checking_utf8 = self.rules.validate_utf8 && h.opcode == opcode::TEXT && h.rsv & 0b100 == 0;
            self.utf8 = Utf8::default();
            if let Some(capture) = self.capture.as_deref_mut() {
                capture.start(h.opcode == opcode::TEXT && h.rsv & 0b100 == 0 && h.mask.is_none());
            }
        }
        if h.fin
            && h.payload_len == 0
            && let Some(capture) = self.capture.as_deref_mut()
        {
            capture.end();
        }
        self.frames += 1;
        if h.fin {
            self.sizes.observe(message_len);
        }
        self.message_len = message_len;
        self.in_message = !h.fin;
        self.remaining = h.payload_len;
        self.mask = h.mask;
        self.offset = 0;
        Ok(())
    }

    fn control(&mut self, h: &Header, wire: &[u8]) -> Result<Control, Violation> {
        self.frames += 1;
        let mut control = Control {
            opcode: h.opcode,
            wire_len: wire.len(),
            payload: [0; MAX_CONTROL_PAYLOAD],
            payload_len: h.payload_len as u8,
        };
        let payload = &mut control.payload[..h.payload_len as usize];
        payload.copy_from_slice(&wire[h.len..]);
        if let Some(key) = h.mask {
            apply_mask(payload, key, 0);
        }
        if h.opcode == opcode::CLOSE {
            match payload.len() {
                0 => {}
                1 => return Err(Violation::Protocol("close frame with a 1-byte payload")),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !valid_close_code(code) {
                        return Err(Violation::Protocol("invalid close code"));
                    }
                    if std::str::from_utf8(&payload[2..]).is_err() {
                        return Err(Violation::InvalidUtf8);
                    }
                }
            }
            self.close_seen = true;
        }
        Ok(control)
    }

    fn check_utf8(&mut self, wire: &[u8]) -> Result<(), Violation> {
        let mut block = [0u8; 256];
        let mut offset = self.offset;
        for piece in wire.chunks(block.len()) {
            let bytes = &mut block[..piece.len()];
            bytes.copy_from_slice(piece);
            if let Some(key) = self.mask {
                apply_mask(bytes, key, offset);
            }
            offset += piece.len() as u64;
            self.utf8.feed(bytes)?;
        }
        Ok(())
    }
}

/// Close codes a peer may send (RFC 6455 §7.4.1 and §7.4.2; 1004–1006 and 1015 are never sent on the wire).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Incremental UTF-8 validation across fragment and read boundaries: holds the bytes of an incomplete code point.
#[derive(Debug, Clone, Copy, Default)]
struct Utf8 {
    partial: [u8; 4],
    partial_len: u8,
}

impl Utf8 {
    fn is_complete(&self) -> bool {
        self.partial_len == 0
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Violation> {
        // Finish a code point left incomplete by the previous piece.
        while self.partial_len > 0 {
            let Some((&b, rest)) = bytes.split_first() else {
                return Ok(());
            };
            self.partial[usize::from(self.partial_len)] = b;
            self.partial_len += 1;
            bytes = rest;
            match std::str::from_utf8(&self.partial[..usize::from(self.partial_len)]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_some() => return Err(Violation::InvalidUtf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(Violation::InvalidUtf8),
            Err(e) => {
                let tail = &bytes[e.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.partial_len = tail.len() as u8;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;

    fn data(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut header = [0u8; MAX_HEADER];
        let n = write_header(&mut header, fin, op, mask, payload.len() as u64);
        let mut frame = header[..n].to_vec();
        let start = frame.len();
        frame.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut frame[start..], key, 0);
        }
        frame
    }

    /// Walks `wire` in reads of `chunk` bytes (an incomplete header carried to the next read, as the relay does).
    fn walk(tracker: &mut Tracker, wire: &[u8], chunk: usize) {
        let mut carry = Vec::new();
        for piece in wire.chunks(chunk) {
            carry.extend_from_slice(piece);
            let mut pos = 0;
            while pos < carry.len() {
                match tracker.next(&carry[pos..]) {
                    Step::Pass(n) => pos += n,
                    Step::Control(c) => pos += c.wire_len,
                    Step::NeedMore => break,
                    Step::Violation(v) => panic!("{v}"),
                }
            }
            carry.drain(..pos);
        }
        assert!(carry.is_empty());
    }

    #[test]
    fn only_text_messages_with_the_marker_are_kept_whole_across_fragments_and_reads() {
        let done = br#"{"type":"response.done","response":{"usage":{"input_tokens":7,"output_tokens":3}}}"#;
        let mut wire = Vec::new();
        wire.extend(data(
            true,
            opcode::TEXT,
            br#"{"type":"response.audio.delta","delta":"AAAA"}"#,
            None,
        ));
        // Fragmented, with a ping between the fragments.
        wire.extend(data(false, opcode::TEXT, &done[..10], None));
        wire.extend(control_frame(opcode::PING, b"x", None));
        wire.extend(data(false, opcode::CONTINUATION, &done[10..40], None));
        wire.extend(data(true, opcode::CONTINUATION, &done[40..], None));
        // Binary messages are never kept; a too-large one is counted.
        wire.extend(data(true, opcode::BINARY, done, None));
        let big = format!(r#"{{"type":"response.done","pad":"{}"}}"#, "x".repeat(5000));
        wire.extend(data(true, opcode::TEXT, big.as_bytes(), None));
        wire.extend(data(true, opcode::TEXT, done, None));
        // Keys in another order: the marker far from the start is found too.
        let late = format!(
            r#"{{"response":{{"pad":"{}"}},"type":"response.done"}}"#,
            "y".repeat(1500)
        );
        wire.extend(data(true, opcode::TEXT, late.as_bytes(), None));
        for chunk in [1, 3, 7, 64, wire.len()] {
            let mut tracker = Tracker::new(Rules {
                masked: false,
                rsv1_allowed: false,
                validate_utf8: true,
                max_frame_size: None,
                max_message_size: None,
            });
            let (sink, kept) = std::sync::mpsc::channel();
            tracker.set_capture(Capture::new(b"\"response.done\"", 2000, move |m| {
                sink.send(m).unwrap();
            }));
            walk(&mut tracker, &wire, chunk);
            let kept: Vec<Vec<u8>> = kept.try_iter().collect();
            assert_eq!(
                kept,
                vec![done.to_vec(), done.to_vec(), late.as_bytes().to_vec()],
                "reads of {chunk}"
            );
            assert_eq!(tracker.capture_mut().unwrap().too_large, 1);
        }
    }
}
