//! The upstream side of a command: the one request path ([`router`]) and what a command may
//! become when its connection dies ([`replay`]).

pub mod replay;
pub mod router;
#[cfg(test)]
mod tests;

pub use replay::{Order, Outcome, ReplayClass, Request, Unanswered};
pub use router::{proxy_error, Call, Router, SharedLane, Target};
