//! Write an mxrelay routing policy as a plain Rust trait implementation.
//!
//! ```ignore
//! use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server};
//!
//! #[derive(Default, serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings { /* the domain's [domain.policy_config] table */ }
//!
//! struct MyPolicy { router: Router }
//!
//! impl Policy for MyPolicy {
//!     type Settings = Settings;
//!     fn new(servers: Vec<Server>, _settings: Settings) -> Result<Self, Vec<Problem>> {
//!         Ok(MyPolicy { router: Router::new(servers) })
//!     }
//!     fn plan(&self, msg: &Message) -> Vec<u32> {
//!         mxrelay_policy_sdk::builtin_plan(&self.router, msg)
//!     }
//! }
//!
//! mxrelay_policy_sdk::export_policy!(MyPolicy);
//! ```
//!
//! Build with `cargo build --target wasm32-unknown-unknown --profile wasm` and encode the
//! module as a component (the workspace's build scripts do this with `mxrelay-wasm-build`;
//! by hand: `wasm-tools component new`). The host checks every plan: it must name every
//! server exactly once, or the relay plans that message with the built-in policy.
//!
//! Policies have no I/O, clock or randomness of their own: `Message` carries the seed, the
//! time and the servers the relay knows to be down. A policy is therefore deterministic, and
//! its tests can run natively (`cargo test`) against the same trait. A policy that orders
//! the servers its own way ends with [`move_down_last`], as the built-in does, so that known
//! dead servers cost no connection attempts while staying in the plan.

pub use mxrelay_policy_core::{
    Field, PlanInput, Problem, ProblemCode, RawNumber, RawServer, Router, Server, Severity, mix64, move_down_last, validate,
};
pub use serde;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

// The generated bindings name this crate by its path, also from inside it.
extern crate self as mxrelay_policy_sdk;

/// Bindings for `wit/policy.wit`, generated once for every policy built on this SDK.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "policy",
        pub_export_macro: true,
        default_bindings_module: "::mxrelay_policy_sdk::bindings",
        runtime_path: "::mxrelay_policy_sdk::__wit_bindgen::rt",
    });
}

use bindings::mxrelay::policy::types as wit;

/// What the relay knows about one message when it asks for a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Seed for any randomness; each message has its own.
    pub seed: u64,
    /// 1 for the first delivery attempt, then 2, 3, ...
    pub attempt: u32,
    /// The relay's clock, milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Indices of servers the relay knows to be down.
    pub down: Vec<u32>,
    /// Recipient addresses for this domain (empty unless [`Policy::WANTS_ENVELOPE`]).
    pub recipients: Vec<String>,
    /// Envelope sender; empty for the null reverse path (and unless [`Policy::WANTS_ENVELOPE`]).
    pub sender: String,
    /// Message size in bytes (0 unless [`Policy::WANTS_ENVELOPE`]).
    pub size: u64,
}

impl Message {
    /// The core's plan input for this message.
    pub fn plan_input(&self) -> PlanInput<'_> {
        PlanInput { seed: self.seed, attempt: self.attempt, now_ms: self.now_ms, down: &self.down }
    }
}

/// The built-in policy's plan: tiers by preference, weighted shares, down servers last.
pub fn builtin_plan(router: &Router, msg: &Message) -> Vec<u32> {
    router.plan(&msg.plan_input())
}

/// A routing policy. Implement this and call [`export_policy!`].
pub trait Policy: Sized + 'static {
    /// The domain's `[domain.policy_config]` table. Use `#[serde(deny_unknown_fields)]` so a
    /// misspelt setting is an error that names it.
    type Settings: serde::de::DeserializeOwned + Default;

    /// Whether `plan` reads the envelope (recipients, sender, size). The relay sends it only
    /// to policies that say so, which keeps a plan call to a few numbers. Policies that route
    /// by seed, clock and down servers alone should set this to `false`.
    const WANTS_ENVELOPE: bool = true;

    /// Prepares the policy for a domain's (validated) servers and settings. Return problems
    /// naming the setting (in `host`) when the settings cannot work with these servers.
    fn new(servers: Vec<Server>, settings: Self::Settings) -> Result<Self, Vec<Problem>>;

    /// The order in which to try every server for one message, as indices into the servers
    /// given to [`Policy::new`]. Must name every server exactly once.
    fn plan(&self, msg: &Message) -> Vec<u32>;

    /// Problems in a server list as typed. Defaults to the built-in validation.
    fn validate(servers: &[RawServer]) -> Vec<Problem> {
        validate(servers)
    }
}

/// A problem with one setting, for [`Policy::new`]. `setting` is its name in the domain's
/// `[domain.policy_config]` table, such as `percent` or `windows[0].end`; the relay shows it
/// as `policy_config.percent`. An empty name means the table as a whole.
pub fn setting_problem(setting: &str, message: impl Into<String>) -> Problem {
    Problem {
        index: None,
        host: setting.to_string(),
        field: Field::Servers,
        severity: Severity::Error,
        code: ProblemCode::Policy,
        message: message.into(),
    }
}

/// Parses the settings JSON. A setting of the wrong type is named (`percent: invalid type:
/// string "ten", expected f64`); the JSON is the relay's rendering of the TOML table, so its
/// line and column would point at nothing the operator wrote and are left out.
pub fn parse_settings<S: serde::de::DeserializeOwned + Default>(json: &str) -> Result<S, Vec<Problem>> {
    if json.trim().is_empty() || json.trim() == "{}" {
        return serde_json::from_str::<S>("{}").or_else(|_| Ok(S::default()));
    }
    let mut reader = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        if path == "." {
            // Not a table at all: where the JSON went wrong is all there is to say.
            return vec![setting_problem("", text)];
        }
        let position = format!(" at line {} column {}", inner.line(), inner.column());
        vec![setting_problem(&path, text.strip_suffix(&position).unwrap_or(&text))]
    })
}

/// Glue between the WIT types and the trait; used by [`export_policy!`].
#[doc(hidden)]
pub mod glue {
    use super::*;

    fn number(n: wit::RawNumber) -> RawNumber {
        match n {
            wit::RawNumber::Int(i) => RawNumber::Int(i),
            wit::RawNumber::Text(t) => RawNumber::Text(t),
        }
    }

    fn problem(p: Problem) -> wit::Problem {
        wit::Problem {
            index: p.index,
            host: p.host,
            field: match p.field {
                Field::Servers => wit::Field::Servers,
                Field::Host => wit::Field::Host,
                Field::Port => wit::Field::Port,
                Field::Preference => wit::Field::Preference,
                Field::Weight => wit::Field::Weight,
            },
            severity: match p.severity {
                Severity::Error => wit::Severity::Error,
                Severity::Warning => wit::Severity::Warning,
            },
            code: p.code.as_str().to_string(),
            message: p.message,
        }
    }

    /// `validate` for policy `P`.
    pub fn validate<P: Policy>(servers: Vec<wit::RawServer>) -> Vec<wit::Problem> {
        let raw: Vec<RawServer> = servers
            .into_iter()
            .map(|s| RawServer {
                host: s.host,
                port: s.port.map(number),
                preference: s.preference.map(number),
                weight: s.weight.map(number),
            })
            .collect();
        P::validate(&raw).into_iter().map(problem).collect()
    }

    /// `create` for policy `P` (the domain is not passed on: policies are per domain anyway).
    pub fn create<P: Policy>(_domain: &str, servers: Vec<wit::Server>, settings: &str) -> Result<P, Vec<wit::Problem>> {
        let servers = servers
            .into_iter()
            .map(|s| Server { host: s.host, port: s.port, preference: s.preference, weight: s.weight.max(1) })
            .collect();
        let settings = parse_settings::<P::Settings>(settings).map_err(|p| p.into_iter().map(problem).collect::<Vec<_>>())?;
        P::new(servers, settings).map_err(|p| p.into_iter().map(problem).collect())
    }

    /// The SDK's message from the WIT record.
    pub fn message(m: wit::Message) -> Message {
        let (recipients, sender, size) = m.envelope.map_or_else(Default::default, |e| (e.recipients, e.sender, e.size));
        Message { seed: m.seed, attempt: m.attempt, now_ms: m.now_ms, down: m.down, recipients, sender, size }
    }
}

/// Exports a [`Policy`] implementation as the component's `mxrelay:policy/routing` interface.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        // The component exports exist only in the wasm build; natively the policy is a plain
        // Rust type that tests call directly (and a native cdylib could not link these names).
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[doc(hidden)]
            struct __MxrelayPolicyExport;

            #[doc(hidden)]
            struct __MxrelayPolicyRouter($policy);

            impl $crate::bindings::exports::mxrelay::policy::routing::Guest for __MxrelayPolicyExport {
                type Router = __MxrelayPolicyRouter;

                fn validate(
                    servers: ::std::vec::Vec<$crate::bindings::mxrelay::policy::types::RawServer>,
                ) -> ::std::vec::Vec<$crate::bindings::mxrelay::policy::types::Problem> {
                    $crate::glue::validate::<$policy>(servers)
                }
            }

            impl $crate::bindings::exports::mxrelay::policy::routing::GuestRouter for __MxrelayPolicyRouter {
                fn create(
                    domain: ::std::string::String,
                    servers: ::std::vec::Vec<$crate::bindings::mxrelay::policy::types::Server>,
                    settings: ::std::string::String,
                ) -> ::std::result::Result<
                    $crate::bindings::exports::mxrelay::policy::routing::Router,
                    ::std::vec::Vec<$crate::bindings::mxrelay::policy::types::Problem>,
                > {
                    $crate::glue::create::<$policy>(&domain, servers, &settings)
                        .map(|p| $crate::bindings::exports::mxrelay::policy::routing::Router::new(__MxrelayPolicyRouter(p)))
                }

                fn wants_envelope(&self) -> bool {
                    <$policy as $crate::Policy>::WANTS_ENVELOPE
                }

                fn plan(&self, msg: $crate::bindings::mxrelay::policy::types::Message) -> ::std::vec::Vec<u32> {
                    <$policy as $crate::Policy>::plan(&self.0, &$crate::glue::message(msg))
                }
            }

    $crate::bindings::export!(__MxrelayPolicyExport with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[serde(default)]
        percent: f64,
        #[serde(default)]
        windows: Vec<Window>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Window {
        #[allow(dead_code, reason = "only its type matters here")]
        end: String,
    }

    fn refused(json: &str) -> (String, String) {
        let problems = parse_settings::<Settings>(json).expect_err("refused");
        assert_eq!(problems.len(), 1, "{problems:?}");
        (problems[0].host.clone(), problems[0].message.clone())
    }

    #[test]
    fn a_setting_of_the_wrong_type_is_named_without_json_positions() {
        let (setting, message) = refused(r#"{"percent":"ten"}"#);
        assert_eq!(setting, "percent");
        assert_eq!(message, r#"invalid type: string "ten", expected f64"#);
        let (setting, message) = refused(r#"{"windows":[{"end":5}]}"#);
        assert_eq!(setting, "windows[0].end");
        assert!(message.starts_with("invalid type: integer `5`"), "{message}");
    }

    #[test]
    fn an_unknown_setting_is_named() {
        let (setting, message) = refused(r#"{"percnt":10}"#);
        assert_eq!(setting, "percnt");
        assert_eq!(message, "unknown field `percnt`, expected `percent` or `windows`");
    }

    #[test]
    fn settings_that_are_not_a_json_object_say_where_the_json_goes_wrong() {
        let (setting, message) = refused("not json");
        assert_eq!(setting, "");
        assert_eq!(message, "expected ident at line 1 column 2");
    }

    #[test]
    fn no_settings_are_the_defaults() {
        for json in ["", "{}", " {} "] {
            let s = parse_settings::<Settings>(json).expect("defaults");
            assert!(s.percent == 0.0 && s.windows.is_empty(), "{json:?}");
        }
    }
}
