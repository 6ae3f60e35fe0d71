//! The built-in routing policy: [`mxrelay_policy_core`] exported through the
//! `mxrelay:policy/routing` WIT interface. The host checks every plan, so this crate only
//! translates between WIT types and core types.

use mxrelay_policy_core as core;

wit_bindgen::generate!({
    path: "../../wit",
    world: "policy",
});

use exports::mxrelay::policy::routing::{Guest, GuestRouter, Router};
use mxrelay::policy::types::{Field, Message, Problem, RawNumber, RawServer, Server, Severity};

struct Builtin;

/// A domain's tiers, built once by `create`.
#[derive(Debug)]
struct BuiltinRouter(core::Router);

impl Guest for Builtin {
    type Router = BuiltinRouter;

    fn validate(servers: Vec<RawServer>) -> Vec<Problem> {
        let raw: Vec<core::RawServer> = servers.into_iter().map(raw_from_wit).collect();
        core::validate(&raw)
            .into_iter()
            .map(problem_to_wit)
            .collect()
    }
}

impl GuestRouter for BuiltinRouter {
    fn create(servers: Vec<Server>, _settings: String) -> Result<Router, Vec<Problem>> {
        // The built-in policy has no settings; anything given is ignored, as documented.
        let servers = servers
            .into_iter()
            .map(|s| core::Server {
                host: s.host,
                port: s.port,
                preference: s.preference,
                weight: s.weight.max(1),
            })
            .collect();
        Ok(Router::new(BuiltinRouter(core::Router::new(servers))))
    }

    fn plan(&self, msg: Message) -> Vec<u32> {
        self.0.plan(&core::PlanInput {
            seed: msg.seed,
            attempt: msg.attempt,
            now_ms: msg.now_ms,
            down: &msg.down,
        })
    }
}

fn number_from_wit(n: RawNumber) -> core::RawNumber {
    match n {
        RawNumber::Int(i) => core::RawNumber::Int(i),
        RawNumber::Text(t) => core::RawNumber::Text(t),
    }
}

fn raw_from_wit(s: RawServer) -> core::RawServer {
    core::RawServer {
        host: s.host,
        port: s.port.map(number_from_wit),
        preference: s.preference.map(number_from_wit),
        weight: s.weight.map(number_from_wit),
    }
}

fn problem_to_wit(p: core::Problem) -> Problem {
    Problem {
        index: p.index,
        host: p.host,
        field: match p.field {
            core::Field::Servers => Field::Servers,
            core::Field::Host => Field::Host,
            core::Field::Port => Field::Port,
            core::Field::Preference => Field::Preference,
            core::Field::Weight => Field::Weight,
        },
        severity: match p.severity {
            core::Severity::Error => Severity::Error,
            core::Severity::Warning => Severity::Warning,
        },
        code: p.code.as_str().to_string(),
        message: p.message,
    }
}

export!(Builtin);
