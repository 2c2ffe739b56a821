//! systemd's readiness protocol (sd_notify(3)), for a unit of `Type=notify` (or `notify-reload`): when systemd
//! starts wsgate it names a datagram socket in `NOTIFY_SOCKET`, and wsgate says there when it is ready (its
//! listeners bound), when a reload starts and ends, and when it is stopping (draining). Without `NOTIFY_SOCKET`
//! nothing is sent. A message that cannot be sent is logged once and costs nothing else.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where systemd listens, if it does.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    failed: AtomicBool,
}

impl Notifier {
    /// The socket `NOTIFY_SOCKET` names: a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|name| {
            let name = name.to_string_lossy().into_owned();
            let address = match name.strip_prefix('@') {
                Some(abstract_name) => {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(abstract_name.as_bytes())
                }
                None => SocketAddr::from_pathname(&name),
            };
            let made = address.and_then(|address| Ok((UnixDatagram::unbound()?, address)));
            match made {
                Ok(target) => Some(target),
                Err(e) => {
                    tracing::warn!(socket = %name, error = %e, "NOTIFY_SOCKET is set but cannot be used");
                    None
                }
            }
        });
        Notifier {
            target,
            failed: AtomicBool::new(false),
        }
    }

    /// The listeners are bound and the config is in force.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload starts (`READY=1` follows when it ends, whether it was taken or refused).
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let micros =
            u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={micros}\nSTATUS=reloading"));
    }

    /// The drain has started.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    fn send(&self, message: &str) {
        let Some((socket, address)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), address)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "cannot tell systemd (NOTIFY_SOCKET)");
        }
    }
}
