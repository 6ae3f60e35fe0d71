//! Runs mxrelay routing policies as WebAssembly components inside wasmtime.
//!
//! This is the one place that knows wasmtime: the engine and its limits ([`PolicyEngine`]),
//! a compiled and pre-instantiated policy ([`PolicyComponent`]), a live instance with its
//! store ([`PolicyInstance`]), and the per-domain wrapper the relay calls per message
//! ([`DomainPolicy`]), which checks every plan and falls back to the native core when a
//! component fails, so a policy can never stop delivery. Domains of the built-in policy
//! share instances, each domain with its own router resource in one (`shared`).
//!
//! The built-in policy (`crates/policy-guest`) is built and encoded by this crate's build
//! script and embedded as [`BUILTIN_COMPONENT`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod convert;
mod domain;
mod engine;
mod error;
mod shared;
mod ticker;

pub use domain::{DomainPolicy, Plan, PlanRequest, PlanSource};
pub use engine::{BUILTIN_DOMAINS_PER_INSTANCE, Limits, PolicyComponent, PolicyEngine, PolicyInstance, RouterHandle};
pub use error::{InvalidPlan, PolicyError, check_plan, setting_path, setting_problem_text};

/// Host bindings for `wit/policy.wit`, generated once here (documented in the WIT file).
#[allow(missing_docs)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "policy",
    });
}

/// The message description a policy plans for (the WIT `message` record) and its envelope.
pub use bindings::mxrelay::policy::types::{Envelope, Message};

/// The built-in policy component, built from `crates/policy-guest` by this crate's build script.
pub const BUILTIN_COMPONENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builtin-policy.wasm"));
