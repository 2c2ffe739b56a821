//! The write timeout both relay modes share: a receiver that leaves the bytes wsgate holds for it unread for the
//! write timeout is stuck. wsgate's own writes show most progress, but while the kernel's send buffer is full
//! (megabytes on a fast link) a slow reader drains it for a long time before the socket is writable again: the
//! kernel's count of unacknowledged bytes, read at half the timeout and again at its end, shows that progress, and
//! a reader that took some restarts the timeout.
//!
//! Receivers are numbered as the relay's directions: 0 is the backend (bytes read from the client), 1 the client.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Default)]
pub(super) struct WriteWatch {
    /// Bytes written to each receiver so far, as last seen.
    written: [u64; 2],
    /// Since when bytes have waited for each receiver without any being written.
    pending_since: [Option<Instant>; 2],
    /// The receiver's unacknowledged bytes, read once half the timeout has passed without a write (`None` until
    /// then; `Some(None)` where the kernel cannot tell).
    unacked_mark: [Option<Option<u64>>; 2],
}

impl WriteWatch {
    /// Which receivers are stuck at `now`. `pending[i]`: bytes wait for receiver i; `written[i]`: bytes written to
    /// it so far; `unacked(i)`: what the kernel has sent it without an acknowledgement yet; `gone[i]`: receiver i
    /// is no longer written to, so not watched.
    pub(super) fn stuck(
        &mut self,
        now: Instant,
        timeout: Duration,
        pending: [bool; 2],
        written: [u64; 2],
        unacked: impl Fn(usize) -> Option<u64>,
        gone: [bool; 2],
    ) -> [bool; 2] {
        let mut stuck = [false; 2];
        for i in 0..2 {
            if !pending[i] || written[i] != self.written[i] {
                self.written[i] = written[i];
                self.pending_since[i] = None;
                self.unacked_mark[i] = None;
                if !pending[i] {
                    continue;
                }
            }
            let since = *self.pending_since[i].get_or_insert(now);
            if gone[i] {
                continue;
            }
            if self.unacked_mark[i].is_none() && now >= since + timeout / 2 {
                self.unacked_mark[i] = Some(unacked(i));
            }
            if now >= since + timeout {
                let now_unacked = unacked(i);
                if let (Some(Some(mark)), Some(left)) = (self.unacked_mark[i], now_unacked)
                    && left < mark
                {
                    self.pending_since[i] = Some(now);
                    self.unacked_mark[i] = Some(now_unacked);
                    continue;
                }
                stuck[i] = true;
            }
        }
        stuck
    }

    /// Nothing waits for either receiver any more: forget the waits (no clock needed, unlike [`WriteWatch::stuck`]).
    pub(super) fn clear(&mut self) {
        self.pending_since = [None; 2];
        self.unacked_mark = [None; 2];
    }

    /// When the watch must look again: at half the timeout (to read the kernel's count), then at its end.
    pub(super) fn deadline(&self, timeout: Duration, pending: [bool; 2]) -> Option<Instant> {
        (0..2)
            .filter_map(|i| {
                let since = self.pending_since[i].filter(|_| pending[i])?;
                Some(
                    since
                        + if self.unacked_mark[i].is_none() {
                            timeout / 2
                        } else {
                            timeout
                        },
                )
            })
            .min()
    }
}
