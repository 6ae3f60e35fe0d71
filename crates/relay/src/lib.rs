//! mxrelay: delivers a filtering service's accepted mail to each customer domain's own
//! inbound servers, in the order the domain's routing policy gives (MX-style preference
//! tiers, equal shares, instant failover).
//!
//! * [`config`]: the TOML configuration and its validation;
//! * [`policies`]: each domain's policy component, loaded once, with its TLS and queue
//!   lifetime;
//! * [`simulate`]: `mxrelay plan`, the policy run on simulated messages;
//! * [`inbound`] → [`queue`] → [`scheduler`] → [`delivery`] → [`outbound`]: the relay's path
//!   for a message, with [`health`] remembering which servers are down; [`relay`] wires them;
//!   [`outbound`] also tests a domain's servers without sending (`mxrelay test-servers`);
//!   [`data_memory`] bounds the memory of the messages arriving at once;
//! * [`admin`]: the admin API (metrics, domains, queue control) and [`queue_cli`], the
//!   `mxrelay queue` commands that call it;
//! * [`tls`]: STARTTLS in and out, and the relay's client certificate;
//! * [`dsn`]: the sender's DSN requests and the notifications the relay sends;
//! * [`service_manager`]: readiness, reloads, shutdown and the watchdog, told to systemd.
#![forbid(unsafe_code)]

pub use mxrelay_config::{config, duration};
pub use mxrelay_dsn as dsn;
pub use mxrelay_message_data as data;

pub mod admin;
pub mod data_memory;
pub mod delivery;
pub mod health;
pub mod inbound;
pub mod outbound;
pub mod policies;
pub mod policy_check;
pub mod queue;
pub mod queue_cli;
pub mod relay;
pub mod scheduler;
pub mod service_manager;
pub mod simulate;
pub mod tls;
