//! HexGate: an API gateway. This crate is the gateway itself (listeners, the request pipeline,
//! the admin API, the compile step, process state); the layers below it are crates of their own
//! (see docs/architecture.md), re-exported here under their short names.

pub use hexgate_auth as auth;
pub use hexgate_config as config;
pub use hexgate_discovery as discovery;
pub use hexgate_http::{body, httpc, rules};
pub use hexgate_limits as limits;
pub use hexgate_metrics as metrics;
pub use hexgate_upstream as upstream;

pub mod access_log;
pub mod admin;
pub mod alloc;
pub mod compile;
pub mod connect;
pub mod demo;
pub mod error;
/// Fuzz targets' properties, for `cargo test` and the cargo-fuzz crate in `fuzz/` (built with
/// `--cfg fuzzing`); not part of the gateway binary.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod ledger;
pub mod lingering;
pub mod listen;
pub mod otel;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod text;
