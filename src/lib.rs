//! HexGate: an API gateway. See docs/architecture.md for the map of modules.

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod body;
pub mod compile;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod error;
/// Fuzz targets' properties, for `cargo test` and the cargo-fuzz crate in `fuzz/` (built with
/// `--cfg fuzzing`); not part of the gateway binary.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz;
pub mod httpc;
pub mod limits;
pub mod lingering;
pub mod listen;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod rules;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod upstream;
