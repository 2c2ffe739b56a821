//! Server-sent events read incrementally: bytes go in as they arrive, whole events come out, and nothing of a
//! stream is kept beyond the event being read.

/// The longest event wsgate reads (a provider that sends more in one event is broken or hostile).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One event: its `event:` name (empty when none) and its `data:` lines joined with `\n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: String,
}

/// An event over [`MAX_EVENT_BYTES`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an event of the stream is larger than {MAX_EVENT_BYTES} bytes")]
pub struct TooLarge;

/// Splits a byte stream into events (the WHATWG event stream format: lines end with LF, CRLF or CR; an empty
/// line ends an event; `:` starts a comment).
#[derive(Default)]
pub struct Reader {
    /// The bytes of the line being read.
    line: Vec<u8>,
    /// The last byte was a CR: an LF right after it ends nothing more.
    after_cr: bool,
    event: Event,
    has_data: bool,
    size: usize,
}

impl Reader {
    /// Reads `bytes`, handing each completed event to `each`.
    pub fn feed(&mut self, bytes: &[u8], mut each: impl FnMut(Event)) -> Result<(), TooLarge> {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    if let Some(event) = self.end_line() {
                        each(event);
                    }
                }
                _ => {
                    self.size += 1;
                    if self.size > MAX_EVENT_BYTES {
                        return Err(TooLarge);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    /// A line ended: an event when the line was empty and the event has data.
    fn end_line(&mut self) -> Option<Event> {
        if self.line.is_empty() {
            self.size = 0;
            let event = std::mem::take(&mut self.event);
            return std::mem::take(&mut self.has_data).then_some(event);
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.event.data.push('\n');
                }
                self.event.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event.name = value.to_string(),
            _ => {}
        }
        None
    }
}

/// One event as written to a client: `data: ...` (with an `event:` line when named), then an empty line.
pub fn encode(name: Option<&str>, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Event> {
        let mut reader = Reader::default();
        let mut out = Vec::new();
        for chunk in chunks {
            reader.feed(chunk, |e| out.push(e)).unwrap();
        }
        out
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\n\nevent: message_start\ndata: x\ndata: y\n\n: comment\n\ndata: [DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(
            whole,
            vec![
                Event {
                    name: String::new(),
                    data: "{\"a\":1}".into()
                },
                Event {
                    name: "message_start".into(),
                    data: "x\ny".into()
                },
                Event {
                    name: String::new(),
                    data: "[DONE]".into()
                },
            ]
        );
        for split in 1..stream.len() {
            assert_eq!(events(&[&stream[..split], &stream[split..]]), whole, "split at {split}");
        }
    }

    #[test]
    fn crlf_and_cr_end_lines() {
        assert_eq!(events(&[b"data: a\r\n\r\ndata: b\r\rdata:c\n\n"]).len(), 3);
        assert_eq!(events(&[b"data: a\r", b"\n\r\n"])[0].data, "a");
    }

    #[test]
    fn an_oversized_event_is_an_error() {
        let mut reader = Reader::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 10];
        assert_eq!(reader.feed(&big, |_| {}), Err(TooLarge));
    }

    #[test]
    fn encoding_reads_back() {
        let bytes = encode(Some("delta"), "one\ntwo");
        assert_eq!(
            events(&[&bytes]),
            vec![Event {
                name: "delta".into(),
                data: "one\ntwo".into()
            }]
        );
    }
}
