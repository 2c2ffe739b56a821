//! What wsgate asks the kernel beyond what its libraries offer: how many bytes written to a TCP socket its peer
//! has not acknowledged yet (`SIOCOUTQ`). The frames relay's write timeout reads it to tell a reader that is slow
//! but steady from one that stopped: while the kernel's send buffer is full wsgate cannot write, and the count is
//! the only sign that the reader is still taking bytes. The one module that needs `unsafe` (an ioctl). Also what
//! `/proc` says of the process, for the metrics.
#![allow(unsafe_code)]

use std::os::fd::AsFd;

/// Bytes written to `socket` that its peer has not acknowledged yet; `None` where this is not known.
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    )
))]
pub(crate) fn unacked_bytes(socket: impl AsFd) -> Option<u64> {
    // SIOCOUTQ is TIOCOUTQ, 0x5411 on these architectures (asm-generic/ioctls.h).
    const SIOCOUTQ: rustix::ioctl::Opcode = 0x5411;
    // SAFETY: for SIOCOUTQ on a socket the kernel writes exactly one `int` through the pointer it is given.
    let getter = unsafe { rustix::ioctl::Getter::<SIOCOUTQ, std::ffi::c_int>::new() };
    // SAFETY: `socket` is an open descriptor for the length of the call; the output type matches the opcode.
    let count = unsafe { rustix::ioctl::ioctl(socket, getter) }.ok()?;
    u64::try_from(count).ok()
}

#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    )
)))]
pub(crate) fn unacked_bytes(_socket: impl AsFd) -> Option<u64> {
    None
}

/// What the process uses, for the metrics: each `None` where `/proc` does not say.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcessUsage {
    pub open_fds: Option<u64>,
    /// The soft limit on open files (`RLIMIT_NOFILE`).
    pub max_fds: Option<u64>,
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// Reads the process's descriptors (`/proc/self/fd`), resident memory (`VmRSS` of `/proc/self/status`) and CPU time
/// (user + system of `/proc/self/stat`, in the kernel's fixed 100 ticks a second).
pub(crate) fn process_usage() -> ProcessUsage {
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let resident_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    let cpu_seconds = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    });
    ProcessUsage {
        open_fds,
        max_fds,
        resident_bytes,
        cpu_seconds,
    }
}

/// The soft limit on open files, `None` when there is none to speak of (unlimited, or beyond `u32`).
pub(crate) fn open_files_limit() -> Option<u32> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .and_then(|n| u32::try_from(n).ok())
}

/// The sessions `open_files` descriptors leave room for: two each (client and backend), after a reserve for
/// the process's own (about 20: runtimes, listeners, the admin listener, log files), health checks, plain HTTP's
/// pooled backend connections and refused connections lingering over their answer (32, and 1/32 of the limit).
pub(crate) fn sessions_allowed(open_files: u32) -> u32 {
    open_files.saturating_sub(descriptor_reserve(open_files)) / 2
}

/// The descriptors [`sessions_allowed`] keeps out of sessions' reach.
fn descriptor_reserve(open_files: u32) -> u32 {
    32 + open_files / 32
}

/// The pipes splice(2) may hold in all (two descriptors each): an eighth of the reserve, so that they take at most a
/// quarter of it (82 pipes for 20 000 files, 4 100 for 2^20).
pub(crate) fn pipes_allowed(open_files: u32) -> usize {
    (descriptor_reserve(open_files) / 8) as usize
}

/// Turns on TCP keepalive on `socket`: the first probe after `idle` without traffic, then
/// [`TCP_KEEPALIVE_PROBES`](crate::config::TCP_KEEPALIVE_PROBES) probes
/// [`TCP_KEEPALIVE_INTERVAL`](crate::config::TCP_KEEPALIVE_INTERVAL) apart before the connection is given up.
pub(crate) fn set_keepalive(socket: &socket2::Socket, idle: std::time::Duration) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(crate::config::TCP_KEEPALIVE_INTERVAL)
        .with_retries(crate::config::TCP_KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn unacked_bytes_drop_as_the_peer_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut writer = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut reader, _) = listener.accept().expect("accept");
        writer.set_nonblocking(true).expect("nonblocking");
        // Fill the peer's receive buffer and our send buffer: the peer does not read.
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        while written < 64 << 20 {
            match writer.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let before = super::unacked_bytes(&writer).expect("SIOCOUTQ");
        assert!(before > 0, "a full send buffer holds unacknowledged bytes");
        let mut sink = vec![0u8; 1 << 20];
        let mut taken = 0;
        while taken < written / 2 {
            taken += std::io::Read::read(&mut reader, &mut sink).expect("read");
        }
        // Acknowledgements flow as the reader takes bytes: wait for them (bounded).
        let mut after = before;
        for _ in 0..1000 {
            after = super::unacked_bytes(&writer).expect("SIOCOUTQ");
            if after < before {
                break;
            }
            std::thread::yield_now();
        }
        assert!(
            after < before,
            "{before} unacknowledged bytes before the read, {after} after"
        );
    }

    #[test]
    fn the_descriptors_leave_room_for_two_per_session_after_a_reserve() {
        assert_eq!(super::sessions_allowed(20_000), 9_671);
        assert_eq!(super::sessions_allowed(200), 81);
        assert_eq!(super::sessions_allowed(40), 3);
        // Pipes take at most a quarter of the reserve.
        assert_eq!(super::pipes_allowed(20_000), 82);
        assert_eq!(super::pipes_allowed(1 << 20), 4_100);
    }
}
