//! The built-in routing policy: [`mxrelay_policy_core`]'s plan behind the
//! `mxrelay:policy/routing` interface, written with the same SDK as custom policies.

use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server, builtin_plan};

/// The built-in policy has no settings.
#[derive(Debug, Default, mxrelay_policy_sdk::serde::Deserialize)]
#[serde(crate = "mxrelay_policy_sdk::serde", deny_unknown_fields)]
pub struct NoSettings {}

/// Tiers by preference, weighted shares inside a tier, known-down servers last.
#[derive(Debug)]
pub struct Builtin {
    router: Router,
}

impl Policy for Builtin {
    type Settings = NoSettings;
    const WANTS_ENVELOPE: bool = false;

    fn new(servers: Vec<Server>, _settings: NoSettings) -> Result<Self, Vec<Problem>> {
        Ok(Builtin { router: Router::new(servers) })
    }

    fn plan(&self, msg: &Message) -> Vec<u32> {
        builtin_plan(&self.router, msg)
    }
}

mxrelay_policy_sdk::export_policy!(Builtin);
