//! HTTP/1.1 as wsgate speaks it: the upgrade handshake ([`handshake`], pure), the header rules shared by every
//! forwarded message ([`headers`]), the answers wsgate writes itself ([`Answer`]), and the view of a request that
//! routing and server choice read ([`RequestView`]).

mod answer;
pub(crate) mod forwarded;
pub mod handshake;
pub(crate) mod headers;
pub(crate) mod trace;
mod view;

pub(crate) use answer::Answer;
pub(crate) use forwarded::Client;
pub(crate) use view::RequestView;
