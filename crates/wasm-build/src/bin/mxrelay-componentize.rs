//! Encodes a policy's core module (`wasm32-unknown-unknown` build of a crate using
//! `mxrelay-policy-sdk`) into a component: `mxrelay-componentize IN.wasm OUT.wasm`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(input), Some(output)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: mxrelay-componentize MODULE.wasm COMPONENT.wasm");
        return ExitCode::from(2);
    };
    let module = match std::fs::read(input) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot read {input}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match mxrelay_wasm_build::encode_module(&module) {
        Ok(component) => match std::fs::write(output, component) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write {output}: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {input} is not a policy module built with mxrelay-policy-sdk: {e}");
            ExitCode::FAILURE
        }
    }
}
