//! Conversions between the core's types and the generated WIT types.

use mxrelay_policy_core as core;

use crate::bindings::mxrelay::policy::types as wit;

fn number_to_wit(n: &core::RawNumber) -> wit::RawNumber {
    match n {
        core::RawNumber::Int(i) => wit::RawNumber::Int(*i),
        core::RawNumber::Text(t) => wit::RawNumber::Text(t.clone()),
    }
}

pub(crate) fn raw_to_wit(s: &core::RawServer) -> wit::RawServer {
    wit::RawServer {
        host: s.host.clone(),
        port: s.port.as_ref().map(number_to_wit),
        preference: s.preference.as_ref().map(number_to_wit),
        weight: s.weight.as_ref().map(number_to_wit),
    }
}

pub(crate) fn server_to_wit(s: &core::Server) -> wit::Server {
    wit::Server { host: s.host.clone(), port: s.port, preference: s.preference, weight: s.weight }
}

pub(crate) fn problem_from_wit(p: wit::Problem) -> core::Problem {
    core::Problem {
        index: p.index,
        host: p.host,
        field: match p.field {
            wit::Field::Servers => core::Field::Servers,
            wit::Field::Host => core::Field::Host,
            wit::Field::Port => core::Field::Port,
            wit::Field::Preference => core::Field::Preference,
            wit::Field::Weight => core::Field::Weight,
        },
        severity: match p.severity {
            wit::Severity::Error => core::Severity::Error,
            wit::Severity::Warning => core::Severity::Warning,
        },
        code: core::ProblemCode::from_name(&p.code).unwrap_or(core::ProblemCode::Policy),
        message: p.message,
    }
}
