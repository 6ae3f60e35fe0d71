//! Builds the built-in policy (`crates/policy-guest`) into a component and embeds it, so
//! `cargo build` always ships a component made from the sources in this checkout.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = mxrelay_wasm_build::workspace_root(&manifest_dir, 2);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let components = mxrelay_wasm_build::build_components(&workspace, &[("mxrelay-policy-guest", "mxrelay_policy_guest")]);
    std::fs::write(out_dir.join("builtin-policy.wasm"), &components[0]).expect("write component");
}
