//! mxrelay routing policy NAME: start from the built-in plan and change what you need.

use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server, builtin_plan};
use serde::Deserialize;

/// The domain's `[domain.policy_config]` table. Misspelt keys are errors that name them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

/// One domain's prepared state; `plan` runs once per message.
#[derive(Debug)]
pub struct MyPolicy {
    router: Router,
}

impl Policy for MyPolicy {
    type Settings = Settings;
    // `plan` below never reads recipients, sender or size: the relay then sends none (faster).
    const WANTS_ENVELOPE: bool = false;

    fn new(servers: Vec<Server>, _settings: Settings) -> Result<Self, Vec<Problem>> {
        Ok(MyPolicy { router: Router::new(servers) })
    }

    fn plan(&self, msg: &Message) -> Vec<u32> {
        builtin_plan(&self.router, msg)
    }
}

mxrelay_policy_sdk::export_policy!(MyPolicy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_name_every_server_once() {
        let servers = vec![Server::new("a.example.com", 10), Server::new("b.example.com", 20)];
        let policy = MyPolicy::new(servers, Settings::default()).expect("valid");
        let mut plan = policy.plan(&Message { seed: 7, ..Message::default() });
        plan.sort_unstable();
        assert_eq!(plan, vec![0, 1]);
    }
}
