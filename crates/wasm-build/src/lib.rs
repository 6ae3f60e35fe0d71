//! Compiles guest crates of this workspace to WebAssembly components, from build scripts.
//!
//! Each guest is built for `wasm32-unknown-unknown` (a core module with no imports) in a
//! target directory of its own, then encoded into a component with `wit-component`. The
//! build script that calls this gets the component's bytes; nothing is committed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target guests are built for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// The workspace root, from a build script's `CARGO_MANIFEST_DIR` (two levels below it).
pub fn workspace_root(manifest_dir: &Path, depth: usize) -> PathBuf {
    let mut root = manifest_dir.to_path_buf();
    for _ in 0..depth {
        root.pop();
    }
    root
}

/// Builds `packages` (workspace package names) with the `wasm` profile and returns each
/// component's bytes, in order. Tells cargo to rerun when their sources or the WIT change.
pub fn build_components(workspace: &Path, packages: &[(&str, &str)]) -> Vec<Vec<u8>> {
    for watched in [
        "wit",
        "Cargo.lock",
        "crates/policy-core/src",
        "crates/policy-sdk/src",
        "crates/policy-guest/src",
        "policies",
        "tests/fixtures",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    // A target dir of its own: the outer cargo holds the lock on the main one.
    let target_dir = workspace.join("target").join("wasm-guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--locked", "--profile", "wasm", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    for (package, _) in packages {
        cmd.args(["--package", package]);
    }
    // Flags meant for the host build (coverage, sanitizers, -D warnings) must not leak into guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the wasm guests");
    assert!(
        status.success(),
        "building the wasm policy components failed; if the target is missing run `rustup target add {TARGET}` (scripts/setup.sh does this)"
    );
    packages.iter().map(|(_, lib)| encode(&target_dir.join(TARGET).join("wasm").join(format!("{lib}.wasm")))).collect()
}

fn encode(module_path: &Path) -> Vec<u8> {
    let module = std::fs::read(module_path).unwrap_or_else(|e| panic!("read {}: {e}", module_path.display()));
    encode_module(&module).unwrap_or_else(|e| panic!("encode {} as a component: {e}", module_path.display()))
}

/// Encodes a core module carrying wit-bindgen's component-type section into a component.
pub fn encode_module(module: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| format!("{e:#}"))
}
