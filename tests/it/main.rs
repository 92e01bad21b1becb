//! The one integration-test binary: real backends, the real `hexgate` binary, real sockets.

mod auth;
mod cli;
mod consul;
mod demo;
mod hardening;
mod lifecycle;
mod limits;
mod proxy;
mod stack;
mod support;
mod tls;
