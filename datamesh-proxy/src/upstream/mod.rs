//! The upstream side of a command: the one request path ([`router`]), what a command may
//! become when its connection dies ([`replay`]), and where commands wait for a usable node
//! ([`hold`]).

pub mod hold;
pub mod replay;
pub mod router;
#[cfg(test)]
mod tests;

pub use hold::{HoldSettings, Holder};
pub use replay::{Order, Outcome, ReplayClass, Request, Unanswered};
pub use router::{proxy_error, Call, Router, SharedLane, Target};
