//! The shared golden vectors in `tests/golden/vectors.json`, as typed data.
//!
//! Every build of the core (native, component, browser) must reproduce these answers; the
//! test suites of each target read them through this module (or the same JSON in the browser).

use serde::{Deserialize, Serialize};

use crate::{Field, RawServer, Severity};

/// Path of the vectors relative to the workspace root.
pub const PATH: &str = "tests/golden/vectors.json";

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vectors {
    /// Why the file exists and how it is maintained.
    pub comment: String,
    /// Plan cases.
    pub plans: Vec<PlanCase>,
    /// Validation cases.
    pub validation: Vec<ValidationCase>,
}

/// A server list and the plans expected for several messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanCase {
    /// What the case shows.
    pub name: String,
    /// The servers as configured (all valid).
    pub servers: Vec<RawServer>,
    /// Messages and their expected plans.
    pub plans: Vec<PlanVector>,
}

/// One message's inputs and expected plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanVector {
    /// The message's seed.
    pub seed: u64,
    /// The attempt number.
    pub attempt: u32,
    /// The clock.
    pub now_ms: u64,
    /// Servers known to be down.
    pub down: Vec<u32>,
    /// The plan every implementation must return.
    pub expect: Option<Vec<u32>>,
}

/// A server list as typed and the problems expected for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidationCase {
    /// What the case shows.
    pub name: String,
    /// The entries as typed.
    pub servers: Vec<RawServer>,
    /// Expected problems, in order.
    pub expect: Option<Vec<ExpectedProblem>>,
}

/// The parts of a problem every implementation must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedProblem {
    /// Entry index.
    pub index: Option<u32>,
    /// Field.
    pub field: Field,
    /// Stable code name.
    pub code: String,
    /// Severity.
    pub severity: Severity,
}

impl From<&crate::Problem> for ExpectedProblem {
    fn from(p: &crate::Problem) -> Self {
        ExpectedProblem { index: p.index, field: p.field, code: p.code.as_str().to_string(), severity: p.severity }
    }
}

/// Parses the vectors file.
pub fn parse(json: &str) -> Result<Vectors, serde_json::Error> {
    serde_json::from_str(json)
}
