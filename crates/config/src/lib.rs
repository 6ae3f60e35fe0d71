//! The mxrelay configuration: one TOML file, every key documented in the README.
//!
//! Parsing and validation only (no I/O beyond reading the file), so it can be fuzzed and
//! used by every tool that reads the config.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
