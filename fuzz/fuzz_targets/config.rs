//! The configuration parser: any text gives a config or errors, never a panic, and every
//! error names a location.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_config::config::{Config, ConfigError};

fuzz_target!(|text: &str| {
    match Config::parse(std::path::Path::new("/fuzz/relay.toml"), text) {
        Ok(_) | Err(ConfigError::Syntax { .. }) | Err(ConfigError::Read { .. }) => {}
        Err(ConfigError::Invalid { problems }) => {
            assert!(problems.iter().all(|p| !p.location.is_empty() && !p.message.is_empty()));
        }
    }
});
