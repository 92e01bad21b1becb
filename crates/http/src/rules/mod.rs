//! The request rules every listener applies, HTTP/1 and HTTP/2 alike, each in one place:
//! host canonicalisation ([`host`]), path normalisation and the escaped-separator policy
//! ([`path`]), and the header-field policy: names, count, size ([`headers`]).
//!
//! These modules name nothing above them (no config, snapshot or proxy): callers pass the
//! settings in, and the config names the policy choices defined here.

pub mod headers;
pub mod host;
pub mod path;
