//! The native core against the shared golden vectors. `BLESS=1` rewrites the expected values
//! from the native core (review the diff before committing); otherwise every case must match.

use mxrelay_policy_core::golden::{self, ExpectedProblem};
use mxrelay_policy_core::{PlanInput, Router, validate};

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(golden::PATH)
}

#[test]
fn native_core_matches_golden_vectors() {
    let text = std::fs::read_to_string(path()).expect("read golden vectors");
    let mut vectors = golden::parse(&text).expect("parse golden vectors");
    let bless = std::env::var_os("BLESS").is_some();
    let mut checked = 0;
    for case in &mut vectors.plans {
        let (router, _) = Router::from_raw(&case.servers).unwrap_or_else(|p| panic!("{}: invalid servers: {p:?}", case.name));
        for v in &mut case.plans {
            let got = router.plan(&PlanInput { seed: v.seed, attempt: v.attempt, now_ms: v.now_ms, down: &v.down });
            if bless {
                v.expect = Some(got);
            } else {
                assert_eq!(Some(&got), v.expect.as_ref(), "{}: seed {} down {:?}", case.name, v.seed, v.down);
                checked += 1;
            }
        }
    }
    for case in &mut vectors.validation {
        let got: Vec<ExpectedProblem> = validate(&case.servers).iter().map(ExpectedProblem::from).collect();
        if bless {
            case.expect = Some(got);
        } else {
            assert_eq!(Some(&got), case.expect.as_ref(), "{}", case.name);
            checked += 1;
        }
    }
    if bless {
        let out = serde_json::to_string_pretty(&vectors).expect("serialise") + "\n";
        std::fs::write(path(), out).expect("write golden vectors");
    } else {
        assert!(checked > 100, "only {checked} vectors checked");
    }
}
