//! Configuration: the seed-compatible YAML read into validated, typed values (all problems at once,
//! each with file, line and key). `compile` turns a `Config` into the runtime snapshot.

pub mod apikeys;
pub mod duration;
pub mod keys;
mod policy;
pub mod read;
pub mod reference;
pub mod schema;
mod service;
mod top;
mod types;
pub mod yaml;

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

pub use policy::{
    CircuitBreaker, Cors, HeaderRules, Piece, Policies, RetryBudget, RetryOn, Rewrite, Split,
    SplitMatch, Template, Var, RESERVED_REQUEST, RESERVED_RESPONSE,
};
use read::Reader;
pub use types::*;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

/// Every problem found in one config.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    load_file_with(path, |_| Ok(()))
}

/// Like [`load_file`], for a reload: a file with nothing but blanks and comments is refused
/// (most likely caught while being rewritten) instead of replacing every route with none.
pub fn load_file_for_reload(path: &Path) -> Result<Config, ConfigErrors> {
    load_file_with(path, |text| {
        let empty = text.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#')
        });
        if empty {
            Err("the file is empty (perhaps caught while being rewritten)".to_string())
        } else {
            Ok(())
        }
    })
}

fn load_file_with(
    path: &Path,
    precheck: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let whole_file_error = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: name.clone(),
            line: 0,
            key: String::new(),
            message,
        }])
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| whole_file_error(format!("cannot read file: {e}")))?;
    precheck(&text).map_err(whole_file_error)?;
    parse(&text, &name).map(|mut c| {
        c.base_dir = path.parent().map(|p| p.to_path_buf());
        c
    })
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let root = parse_yaml(text, file)?;
    let mut r = Reader::new(file);
    let cfg = top::read_config(&mut r, &root);
    r.finish(cfg)
}

/// The YAML tree of `text`, or its syntax error at its line in `file`.
pub(crate) fn parse_yaml(text: &str, file: &str) -> Result<yaml::Node, ConfigErrors> {
    yaml::parse(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line: e.line,
            key: String::new(),
            message: format!("YAML syntax error at column {}: {}", e.col, e.message),
        }])
    })
}

/// Parses "10.0.0.0/8" or "127.0.0.1" into (network, prefix length).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

#[cfg(test)]
mod tests;
