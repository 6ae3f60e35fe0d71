//! mxrelay: delivers a filtering service's accepted mail to each customer domain's own
//! inbound servers, in the order the domain's routing policy gives (MX-style preference
//! tiers, equal shares, instant failover).
//!
//! * [`config`]: the TOML configuration and its validation;
//! * [`policies`]: each domain's policy component, loaded once;
//! * [`simulate`]: `mxrelay plan`, the policy run on simulated messages.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
pub mod policies;
pub mod simulate;
