//! HTTP primitives every other HexGate crate builds on: the host, path and header-field rules
//! (one place for each, used by HTTP/1 and HTTP/2 alike), the body type, the small outbound
//! HTTP client (Consul, JWKS), the worker slot of the current thread and the injected clock.

pub mod body;
pub mod clock;
pub mod httpc;
pub mod rules;
pub mod worker;
