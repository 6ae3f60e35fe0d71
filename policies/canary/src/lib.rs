//! Canary split for server migrations: `percent` of messages go to the canary servers first;
//! the rest follow the normal plan over the other servers, with the canaries last.
//!
//! ```toml
//! [domain.policy_config]
//! servers = ["new-mx.example.com"]   # host, or host:port
//! percent = 10
//! ```

use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server, mix64, move_down_last, setting_problem};
use serde::Deserialize;

/// `[domain.policy_config]` of the canary policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The canary servers, as `host` or `host:port`.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Share of messages for the canaries, 0 to 100 (fractions allowed).
    #[serde(default)]
    pub percent: f64,
}

/// Decides per message (from its seed) whether it is a canary message.
#[derive(Debug)]
pub struct Canary {
    /// Threshold out of 1 000 000.
    per_million: u64,
    /// The canary servers and the others, each with its global indices.
    canary: Part,
    normal: Part,
}

#[derive(Debug)]
struct Part {
    router: Router,
    global: Vec<u32>,
}

impl Part {
    fn new(servers: &[Server], global: Vec<u32>) -> Part {
        Part { router: Router::new(global.iter().map(|&i| servers[i as usize].clone()).collect()), global }
    }

    /// This part's plan, in global indices.
    fn plan(&self, msg: &Message, out: &mut Vec<u32>) {
        let down: Vec<u32> = (0..self.global.len() as u32).filter(|l| msg.down.contains(&self.global[*l as usize])).collect();
        let mut input = msg.plan_input();
        input.down = &down;
        out.extend(self.router.plan(&input).into_iter().map(|l| self.global[l as usize]));
    }
}

/// Whether a `host` or `host:port` setting names `server`.
fn names(setting: &str, server: &Server) -> bool {
    let s = setting.trim().trim_end_matches('.').to_ascii_lowercase();
    s == server.host || s == server.address()
}

impl Policy for Canary {
    type Settings = Settings;
    const WANTS_ENVELOPE: bool = false;

    fn new(servers: Vec<Server>, settings: Settings) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        if !(0.0..=100.0).contains(&settings.percent) {
            problems.push(setting_problem("percent", format!("{} is outside 0 to 100", settings.percent)));
        }
        if settings.servers.is_empty() {
            problems
                .push(setting_problem("servers", "name at least one canary server (host or host:port of a configured server)"));
        }
        let mut canary = Vec::new();
        for name in &settings.servers {
            match servers.iter().position(|s| names(name, s)) {
                Some(i) => canary.push(i as u32),
                None => problems.push(setting_problem("servers", format!("{name:?} is not one of the domain's servers"))),
            }
        }
        let normal: Vec<u32> = (0..servers.len() as u32).filter(|i| !canary.contains(i)).collect();
        if normal.is_empty() && problems.is_empty() {
            problems.push(setting_problem("servers", "every server is a canary: keep at least one server on the normal plan"));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Canary {
            per_million: (settings.percent * 10_000.0).round() as u64,
            canary: Part::new(&servers, canary),
            normal: Part::new(&servers, normal),
        })
    }

    fn plan(&self, msg: &Message) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.canary.global.len() + self.normal.global.len());
        // A salt keeps this decision independent of the core's order inside a tier.
        let is_canary = mix64(msg.seed ^ 0xC0FF_EE00_CA4A_4121) % 1_000_000 < self.per_million;
        let (first, second) = if is_canary { (&self.canary, &self.normal) } else { (&self.normal, &self.canary) };
        first.plan(msg, &mut out);
        second.plan(msg, &mut out);
        // Servers known to be down go behind every live one, canary or not.
        move_down_last(&msg.down, &mut out);
        out
    }
}

mxrelay_policy_sdk::export_policy!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<Server> {
        vec![Server::new("old1.example.com", 10), Server::new("old2.example.com", 10), Server::new("new.example.com", 10)]
    }

    #[test]
    fn ten_percent_go_to_the_canary_first() {
        let p = Canary::new(servers(), Settings { servers: vec!["new.example.com".into()], percent: 10.0 }).expect("valid");
        let first_canary = (0..10_000u64).filter(|&seed| p.plan(&Message { seed, ..Message::default() })[0] == 2).count();
        assert!((900..=1100).contains(&first_canary), "{first_canary}");
        // The rest is shared by the old servers as the built-in policy would.
        let old1 = (0..10_000u64).filter(|&seed| p.plan(&Message { seed, ..Message::default() })[0] == 0).count();
        assert!((4_300..=4_700).contains(&old1), "{old1}");
    }

    #[test]
    fn a_down_canary_goes_last() {
        let p = Canary::new(servers(), Settings { servers: vec!["new.example.com:25".into()], percent: 100.0 }).expect("valid");
        let plan = p.plan(&Message { seed: 1, down: vec![2], ..Message::default() });
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[2], 2, "{plan:?}");
    }

    #[test]
    fn settings_errors_name_the_setting() {
        let err =
            Canary::new(servers(), Settings { servers: vec!["nope.example.com".into()], percent: 150.0 }).expect_err("invalid");
        assert!(err.iter().any(|p| p.host == "percent" && p.message.contains("150")), "{err:?}");
        assert!(err.iter().any(|p| p.host == "servers" && p.message.contains("nope.example.com")), "{err:?}");
        let all = Settings {
            servers: vec!["old1.example.com".into(), "old2.example.com".into(), "new.example.com".into()],
            percent: 5.0,
        };
        assert!(Canary::new(servers(), all).is_err());
    }
}
