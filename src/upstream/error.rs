//! Why a request got no backend connection, with who caused it and whether another try could help (as Pingora's
//! errors say it): the attempt loop reads [`UpstreamError::retry`] and [`UpstreamError::cause`], outlier detection
//! counts only what the server caused, and the session maps each kind to one answer. Messages name the server for
//! the log; what a client is told ([`UpstreamError::public_reason`]) never does.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rustix::io::Errno;

/// Why no server of an upstream can take a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no backend servers configured")]
    NoServers,
    #[error("every backend server is down, ejected or draining")]
    AllDown,
    #[error("every available backend server is at its max_connections")]
    Full,
    #[error("the upstream is at its max_pending_handshakes")]
    TooManyPending,
    /// Every server that could take the connection has been tried.
    #[error("every backend server has been tried")]
    Exhausted,
}

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The backend server: it refused, reset, timed out or answered badly. Counts toward its ejection.
    Server,
    /// The upstream as configured and as it stands: no server up, or every one full.
    Upstream,
    /// wsgate itself: it lacks the resources (file descriptors, ports, memory) to open a connection.
    Proxy,
}

/// Whether another try could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Another server may well succeed.
    OtherServer,
    /// No: the request is answered now.
    No,
}

/// Why a request got no usable backend connection. Each kind maps to one status in the session's answers.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Unavailable(Unavailable),
    #[error("connection to {server} refused")]
    ConnectRefused { server: SocketAddr },
    #[error("connecting to {server} failed: {source}")]
    ConnectFailed {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {server} timed out after {after:?}")]
    ConnectTimeout { server: SocketAddr, after: Duration },
    #[error("{server} did not answer within {after:?}")]
    AnswerTimeout { server: SocketAddr, after: Duration },
    #[error("connection to {server} lost: {source}")]
    Lost {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{server} sent a bad answer: {reason}")]
    BadAnswer { server: SocketAddr, reason: String },
    #[error("TLS with {server} failed: {reason}")]
    Tls { server: SocketAddr, reason: String },
    #[error("wsgate cannot open a connection to {server} now: {source}")]
    ProxyResources {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Seconds a client is told to wait (`Retry-After`) when the upstream is full or busy, or wsgate short of resources.
pub const RETRY_AFTER_BUSY: u32 = 1;
/// Seconds a client is told to wait when no server is up.
pub const RETRY_AFTER_DOWN: u32 = 5;

impl UpstreamError {
    /// A failure to connect to `server`, sorted by who caused it: a refusal, wsgate's own lack of resources, or
    /// any other failure of the connection.
    pub fn connect(server: SocketAddr, source: io::Error) -> UpstreamError {
        if source.kind() == io::ErrorKind::ConnectionRefused {
            UpstreamError::ConnectRefused { server }
        } else if is_proxy_resource(&source) {
            UpstreamError::ProxyResources { server, source }
        } else {
            UpstreamError::ConnectFailed { server, source }
        }
    }

    /// The server it happened on, if any.
    pub fn server(&self) -> Option<SocketAddr> {
        match self {
            Self::Unavailable(_) => None,
            Self::ConnectRefused { server }
            | Self::ConnectFailed { server, .. }
            | Self::ConnectTimeout { server, .. }
            | Self::AnswerTimeout { server, .. }
            | Self::Lost { server, .. }
            | Self::BadAnswer { server, .. }
            | Self::Tls { server, .. }
            | Self::ProxyResources { server, .. } => Some(*server),
        }
    }

    /// Who caused it.
    pub fn cause(&self) -> Cause {
        match self {
            Self::Unavailable(_) => Cause::Upstream,
            Self::ProxyResources { .. } => Cause::Proxy,
            _ => Cause::Server,
        }
    }

    /// Whether another server may be tried. A bad answer is not retried: the server did answer, and the request
    /// may have had effects there. wsgate's own shortage of descriptors or memory would hit every server alike; a
    /// shortage of local ports is counted per destination, so another server may still have some.
    pub fn retry(&self) -> Retry {
        match self {
            Self::ConnectRefused { .. }
            | Self::ConnectFailed { .. }
            | Self::ConnectTimeout { .. }
            | Self::AnswerTimeout { .. }
            | Self::Lost { .. }
            | Self::Tls { .. } => Retry::OtherServer,
            Self::ProxyResources { source, .. } if is_errno(source, Errno::ADDRNOTAVAIL) => Retry::OtherServer,
            Self::Unavailable(_) | Self::BadAnswer { .. } | Self::ProxyResources { .. } => Retry::No,
        }
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> u16 {
        match self {
            Self::Unavailable(_) | Self::ProxyResources { .. } => 503,
            Self::ConnectTimeout { .. } | Self::AnswerTimeout { .. } => 504,
            Self::ConnectRefused { .. }
            | Self::ConnectFailed { .. }
            | Self::Lost { .. }
            | Self::BadAnswer { .. }
            | Self::Tls { .. } => 502,
        }
    }

    /// What the client is told: one generic line, never a server's address or an error's details.
    pub fn public_reason(&self) -> &'static str {
        match self {
            Self::Unavailable(Unavailable::Full) => "upstream at its connection limit",
            Self::Unavailable(Unavailable::TooManyPending) => "upstream busy",
            Self::Unavailable(_) => "no upstream available",
            Self::ConnectRefused { .. } | Self::ConnectFailed { .. } => "upstream connect failed",
            Self::ConnectTimeout { .. } => "upstream connect timeout",
            Self::AnswerTimeout { .. } => "upstream answer timeout",
            Self::Lost { .. } => "upstream connection lost",
            Self::BadAnswer { .. } => "bad answer from upstream",
            Self::Tls { .. } => "upstream TLS handshake failed",
            Self::ProxyResources { .. } => "proxy out of resources, try again",
        }
    }

    /// Seconds the client is told to wait before trying again (`Retry-After`), for an answer that says the upstream
    /// is overloaded or out of servers for now, or that wsgate is short of resources.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Unavailable(Unavailable::Full | Unavailable::TooManyPending) | Self::ProxyResources { .. } => {
                Some(RETRY_AFTER_BUSY)
            }
            Self::Unavailable(_) => Some(RETRY_AFTER_DOWN),
            _ => None,
        }
    }
}

/// Whether an error opening a connection is wsgate's own lack of resources rather than anything the server did:
/// out of file descriptors (process or system), of socket buffers, of memory, or of local ports.
pub fn is_proxy_resource(e: &io::Error) -> bool {
    [
        Errno::MFILE,
        Errno::NFILE,
        Errno::NOBUFS,
        Errno::NOMEM,
        Errno::ADDRNOTAVAIL,
    ]
    .into_iter()
    .any(|errno| is_errno(e, errno))
}

fn is_errno(e: &io::Error, errno: Errno) -> bool {
    e.raw_os_error() == Some(errno.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9000))
    }

    #[test]
    fn connect_errors_are_sorted_by_who_caused_them() {
        let refused = UpstreamError::connect(server(), io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(refused, UpstreamError::ConnectRefused { .. }));
        assert_eq!(
            (refused.cause(), refused.retry(), refused.status()),
            (Cause::Server, Retry::OtherServer, 502)
        );
        let emfile = UpstreamError::connect(server(), io::Error::from_raw_os_error(24));
        assert_eq!(
            (emfile.cause(), emfile.retry(), emfile.status()),
            (Cause::Proxy, Retry::No, 503)
        );
        assert_eq!(emfile.retry_after(), Some(RETRY_AFTER_BUSY));
        let no_port = io::Error::from_raw_os_error(Errno::ADDRNOTAVAIL.raw_os_error());
        let ports = UpstreamError::connect(server(), no_port);
        assert_eq!(
            (ports.cause(), ports.retry(), ports.status()),
            (Cause::Proxy, Retry::OtherServer, 503)
        );
        let reset = UpstreamError::connect(server(), io::ErrorKind::ConnectionReset.into());
        assert_eq!((reset.cause(), reset.retry()), (Cause::Server, Retry::OtherServer));
    }

    #[test]
    fn no_public_reason_names_a_server() {
        let errors = [
            UpstreamError::ConnectRefused { server: server() },
            UpstreamError::ConnectTimeout {
                server: server(),
                after: Duration::from_secs(1),
            },
            UpstreamError::AnswerTimeout {
                server: server(),
                after: Duration::from_secs(1),
            },
            UpstreamError::BadAnswer {
                server: server(),
                reason: "x".into(),
            },
            UpstreamError::connect(server(), io::Error::from_raw_os_error(24)),
        ];
        for e in errors {
            assert!(e.to_string().contains("127.0.0.1:9000"), "the log names it: {e}");
            assert!(!e.public_reason().contains("127.0.0.1"), "{}", e.public_reason());
        }
    }
}
