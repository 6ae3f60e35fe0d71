//! What can go wrong when running a policy component.

use mxrelay_policy_core::Problem;

/// Where a problem a policy reported about its settings is in the config file:
/// `policy_config.percent` for the setting `percent`, `policy_config` for the table as a whole.
/// A name given with the prefix already (as earlier SDKs did) keeps it once.
pub fn setting_path(problem: &Problem) -> String {
    let name = problem.host.trim();
    let name = if name == "policy_config" { "" } else { name.strip_prefix("policy_config.").unwrap_or(name) };
    if name.is_empty() { "policy_config".into() } else { format!("policy_config.{name}") }
}

/// A problem a policy reported about its settings, as `policy_config.percent: what is wrong`.
pub fn setting_problem_text(problem: &Problem) -> String {
    format!("{}: {}", setting_path(problem), problem.message)
}

/// Why a policy call produced no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The bytes are not a component implementing `mxrelay:policy/policy`.
    #[error("policy {name}: cannot load: {reason}")]
    Load {
        /// The policy's name (file path or `builtin`).
        name: String,
        /// What wasmtime said.
        reason: String,
    },
    /// The call used up its CPU-time budget and was interrupted.
    #[error("policy {name}: call used more than its {deadline_ms} ms of CPU time")]
    Timeout {
        /// The policy's name.
        name: String,
        /// The budget that was used up.
        deadline_ms: u64,
    },
    /// The call tried to grow memory beyond the cap.
    #[error("policy {name}: memory limit of {limit_bytes} bytes exceeded")]
    MemoryLimit {
        /// The policy's name.
        name: String,
        /// The cap.
        limit_bytes: usize,
    },
    /// The guest trapped (panic, unreachable, out-of-bounds access, ...).
    #[error("policy {name}: trapped: {reason}")]
    Trap {
        /// The policy's name.
        name: String,
        /// The trap and its backtrace, as wasmtime reports it.
        reason: String,
    },
    /// The policy refused the domain's settings.
    #[error("policy {name}: settings refused: {}", problems.iter().map(setting_problem_text).collect::<Vec<_>>().join("; "))]
    Settings {
        /// The policy's name.
        name: String,
        /// Every problem it reported.
        problems: Vec<Problem>,
    },
    /// The policy returned a plan that does not name every server exactly once.
    #[error("policy {name}: invalid plan: {reason}")]
    InvalidPlan {
        /// The policy's name.
        name: String,
        /// What was wrong with it.
        reason: InvalidPlan,
    },
    /// The instance trapped earlier and cannot be used again.
    #[error("policy {name}: instance is poisoned by an earlier failure")]
    Poisoned {
        /// The policy's name.
        name: String,
    },
}

/// Why a returned plan is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPlan {
    /// An index names no server.
    #[error("index {index} names no server (there are {servers})")]
    UnknownIndex {
        /// The bad index.
        index: u32,
        /// How many servers there are.
        servers: usize,
    },
    /// An index appears twice.
    #[error("server {0} appears twice")]
    Duplicate(u32),
    /// A server is missing from the plan.
    #[error("{missing} of {servers} servers are missing")]
    Missing {
        /// How many are missing.
        missing: usize,
        /// How many there are.
        servers: usize,
    },
}

/// Checks that `plan` names each of `servers` servers exactly once.
pub fn check_plan(plan: &[u32], servers: usize) -> Result<(), InvalidPlan> {
    // Plans are short (one entry per server); a bitset on the stack covers the usual case.
    let mut small = [0u64; 4];
    let mut large = Vec::new();
    let seen: &mut [u64] = if servers <= 256 {
        &mut small
    } else {
        large.resize(servers.div_ceil(64), 0);
        &mut large
    };
    for &index in plan {
        if index as usize >= servers {
            return Err(InvalidPlan::UnknownIndex { index, servers });
        }
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if seen[word] & bit != 0 {
            return Err(InvalidPlan::Duplicate(index));
        }
        seen[word] |= bit;
    }
    if plan.len() != servers {
        return Err(InvalidPlan::Missing { missing: servers - plan.len(), servers });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_checks() {
        assert_eq!(check_plan(&[2, 0, 1], 3), Ok(()));
        assert_eq!(check_plan(&[0, 3, 1], 3), Err(InvalidPlan::UnknownIndex { index: 3, servers: 3 }));
        assert_eq!(check_plan(&[0, 1, 1], 3), Err(InvalidPlan::Duplicate(1)));
        assert_eq!(check_plan(&[0, 1], 3), Err(InvalidPlan::Missing { missing: 1, servers: 3 }));
        assert_eq!(check_plan(&[], 0), Ok(()));
        let big: Vec<u32> = (0..300).rev().collect();
        assert_eq!(check_plan(&big, 300), Ok(()));
        assert_eq!(check_plan(&big[1..], 300), Err(InvalidPlan::Missing { missing: 1, servers: 300 }));
    }

    #[test]
    fn a_setting_problem_names_its_place_in_policy_config_once() {
        use mxrelay_policy_core::{Field, ProblemCode, Severity};
        let problem = |host: &str| Problem {
            index: None,
            host: host.into(),
            field: Field::Servers,
            severity: Severity::Error,
            code: ProblemCode::Policy,
            message: "out of range".into(),
        };
        for (host, path) in [
            ("percent", "policy_config.percent"),
            ("windows[0].end", "policy_config.windows[0].end"),
            ("", "policy_config"),
            ("policy_config.percent", "policy_config.percent"),
            ("policy_config.", "policy_config"),
            ("policy_config", "policy_config"),
            ("policy_configs", "policy_config.policy_configs"),
        ] {
            assert_eq!(setting_path(&problem(host)), path, "{host:?}");
        }
        assert_eq!(setting_problem_text(&problem("percent")), "policy_config.percent: out of range");
    }
}
