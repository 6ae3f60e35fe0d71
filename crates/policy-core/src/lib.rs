//! Pure routing policy for mxrelay.
//!
//! A customer domain lists its inbound servers like MX records (RFC 5321 §5.1): each has
//! a preference, lower is tried first, equal preferences share the traffic, and when a
//! whole tier is down delivery moves on to the next tier at once.
//!
//! This crate holds the two pure functions behind that promise:
//! * [`validate`] turns what a user typed into either a [`Server`] list or a list of
//!   [`Problem`]s that name the entry and the field;
//! * [`Router::plan_into`] orders the servers for one message. Randomness (the seed) and
//!   the clock are inputs, so the same inputs always give the same plan.
//!
//! It performs no I/O and is compiled natively, to the built-in WebAssembly component and
//! to the browser module; `tests/golden/vectors.json` keeps the three in agreement.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod entry;
#[cfg(feature = "golden")]
pub mod golden;
mod host;
mod plan;
mod validate;

pub use entry::{
    DEFAULT_PORT, DEFAULT_PREFERENCE, DEFAULT_WEIGHT, MAX_WEIGHT, RawNumber, RawServer, SEED_PAGE_EXAMPLE, Server,
    seed_page_example,
};
pub use host::{HostKind, parse_host};
pub use plan::{PlanInput, Router, Tier, mix64, move_down_last};
pub use validate::{Field, Problem, ProblemCode, Severity, validate, validate_servers};
