//! The admin listener as an attacker on the network sees it: slow and half-sent requests are
//! cut off by `timeouts.headerRead`, connections beyond the cap wait in the backlog, one address
//! holds at most 32 connections, the header limits hold, and with an admin token every path but
//! /healthz and /readyz answers 401 without it, and only a client that sent the token keeps its
//! connection. Secrets in URLs (userinfo, query values) never show in /admin/config, logs or
//! `validate`.
//!
//! Several peer addresses are simulated with source addresses from 127.0.0.0/8 (all loopback).

mod connections;
mod redaction;
mod token;

use crate::raw::{raw_request, Raw};
use crate::support::*;

const TOKEN: &str = "adm-4f1c2e9b7d";

/// A loopback gateway config: `extra` top-level lines, then one service on `backend`.
fn config(extra: &str, backend: &str) -> String {
    loopback_config(extra, &service("s", "/", &[backend], ""))
}

/// A GET with an optional `Authorization` value.
async fn admin_get(port: u16, path: &str, authorization: Option<&str>) -> Raw {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    raw_request(port, req.as_bytes()).await
}
