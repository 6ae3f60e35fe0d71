//! The bindings as JavaScript sees them, run under Node by wasm-bindgen-test-runner:
//! `cargo test -p mxrelay-policy-web --target wasm32-unknown-unknown` (scripts/test.sh sets
//! the runner).
#![cfg(target_arch = "wasm32")]

use mxrelay_policy_core::golden::{self, ExpectedProblem};
use wasm_bindgen_test::wasm_bindgen_test;

const VECTORS: &str = include_str!("../../../tests/golden/vectors.json");

#[wasm_bindgen_test]
fn golden_vectors_through_the_bindings() {
    let vectors = golden::parse(VECTORS).expect("vectors");
    for case in &vectors.plans {
        let servers = serde_json::to_string(&case.servers).expect("json");
        for v in &case.plans {
            let got =
                mxrelay_policy_web::plan(&servers, v.seed, v.attempt, v.now_ms, &serde_json::to_string(&v.down).expect("json"));
            let got: Option<Vec<u32>> = serde_json::from_str(&got).expect("plan json");
            assert_eq!(got.as_ref(), v.expect.as_ref(), "{} seed {}", case.name, v.seed);
        }
    }
    for case in &vectors.validation {
        let got: Vec<mxrelay_policy_core::Problem> =
            serde_json::from_str(&mxrelay_policy_web::validate(&serde_json::to_string(&case.servers).expect("json")))
                .expect("problems");
        let got: Vec<ExpectedProblem> = got.iter().map(ExpectedProblem::from).collect();
        assert_eq!(Some(&got), case.expect.as_ref(), "{}", case.name);
    }
}

#[wasm_bindgen_test]
fn preview_reports_the_queue_when_everything_is_down() {
    let list = r#"[{"host":"a.example.com","preference":10},{"host":"b.example.com","preference":20}]"#;
    let v: serde_json::Value = serde_json::from_str(&mxrelay_policy_web::preview(list, "[0,1]")).expect("json");
    assert_eq!(v["queued"], 100.0);
    let v: serde_json::Value = serde_json::from_str(&mxrelay_policy_web::preview(list, "[0]")).expect("json");
    assert_eq!(v["tiers"][1]["servers"][0]["receives"], 100.0);
}
