//! The one integration-test binary: real backends, the real `hexgate` binary, real sockets.
// A test binary: its modules share helpers, and nothing here is a library API.
#![allow(unreachable_pub, clippy::unwrap_used)]

mod access_log;
mod admin_security;
mod apikeys;
mod apikeys_consul;
mod auth;
mod cli;
mod compile_diff;
mod consul;
mod consumer_metrics;
mod daemons;
mod demo;
mod edge;
mod grpc;
mod hardening;
mod ledger;
mod lifecycle;
mod limits;
mod limits_diff;
mod openmetrics;
mod otel;
mod plans;
mod policies_admission;
mod policies_http;
mod policies_upstream;
mod proxy;
mod raw;
mod redis_transports;
mod stack;
mod support;
mod tls;
mod upstream_faults;
mod upstream_h2;
mod upstream_tls;
mod validate_connect;
