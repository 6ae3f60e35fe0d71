//! Builds the built-in policy (`crates/policy-guest`) for `wasm32-unknown-unknown` and encodes
//! the core module into a component with `wit-component`, so `cargo build` always embeds a
//! component made from the sources in this checkout; no `.wasm` is ever committed.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root");
    let out_dir = PathBuf::from(env("OUT_DIR"));
    for watched in [
        "crates/policy-guest",
        "crates/policy-core/src",
        "crates/policy-core/Cargo.toml",
        "wit",
        "Cargo.lock",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }

    // A target dir of its own: the outer cargo holds the lock on the main one.
    let target_dir = workspace.join("target").join("wasm-guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--locked",
            "--package",
            "mxrelay-policy-guest",
            "--profile",
            "wasm",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Flags meant for the host build (coverage, sanitizers, -D warnings) must not leak into the guest.
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
    let status = cmd.status().expect("run cargo for the policy guest");
    if !status.success() {
        panic!(
            "building the built-in policy component failed; if the target is missing run \
             `rustup target add {TARGET}` (the README's set-up command does this)"
        );
    }

    let module_path = target_dir
        .join(TARGET)
        .join("wasm")
        .join("mxrelay_policy_guest.wasm");
    let component = encode(&module_path);
    std::fs::write(out_dir.join("builtin-policy.wasm"), component).expect("write component");
}

fn encode(module_path: &Path) -> Vec<u8> {
    let module = std::fs::read(module_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", module_path.display()));
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("encode {} as a component: {e:#}", module_path.display()))
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name}"))
}
