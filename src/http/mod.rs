//! HTTP/1.1 as wsgate speaks it: the upgrade handshake ([`handshake`], pure), the header rules shared by every
//! forwarded message ([`headers`]), the answers wsgate writes itself ([`Answer`]), and the view of a request that
//! routing and server choice read ([`RequestView`]).

mod answer;
pub mod handshake;
pub mod headers;
mod view;

pub use answer::{Answer, reason_phrase};
pub use headers::Forwarding;
pub use view::RequestView;
