//! Builds the example policies and the hostile fixture into components for the tests, and
//! tells the tests where they are (`MXRELAY_TEST_POLICY_<NAME>`).

use std::path::PathBuf;

const POLICIES: [(&str, &str, &str); 4] = [
    ("mxrelay-policy-canary", "mxrelay_policy_canary", "CANARY"),
    ("mxrelay-policy-sticky", "mxrelay_policy_sticky", "STICKY"),
    ("mxrelay-policy-maintenance", "mxrelay_policy_maintenance", "MAINTENANCE"),
    ("mxrelay-policy-hostile", "mxrelay_policy_hostile", "HOSTILE"),
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = mxrelay_wasm_build::workspace_root(&manifest_dir, 1);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let packages: Vec<(&str, &str)> = POLICIES.iter().map(|(p, l, _)| (*p, *l)).collect();
    let components = mxrelay_wasm_build::build_components(&workspace, &packages);
    for ((_, lib, name), bytes) in POLICIES.iter().zip(components) {
        let path = out_dir.join(format!("{lib}.wasm"));
        std::fs::write(&path, bytes).expect("write component");
        println!("cargo:rustc-env=MXRELAY_TEST_POLICY_{name}={}", path.display());
    }
}
