//! The file checks of the compile step: everything `run` and a reload would refuse in the
//! files a config names, found before anything starts, and reported at the file, line and key
//! that named the file. `validate`, `config push`, `run` (file or Consul KV) and every reload
//! call this same function, so `validate` accepts exactly what `run` starts with.
//!
//! Checked: every public-key file (readable, a public key of a supported type: a private key
//! where the public key belongs is refused), the TLS certificate and key when TLS is on
//! (readable, parseable, the key matching the certificate: the same rustls set-up the HTTPS
//! listener uses), and `adminTokenFile`. Network checks (JWKS fetch, Redis, Consul) are not
//! part of it: they happen after start, and a gateway serves while they are away.

use std::path::Path;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, ConfigErrors};

/// All problems in the files `cfg` names, at once (for `validate`, `config push` and start).
pub fn check_files(cfg: &Config) -> Result<(), ConfigErrors> {
    check(cfg, true)
}

/// The same for a reload, which never re-applies TLS (a change of `tls` needs a restart, see
/// `state.rs`): a certificate being rotated on disk must not hold back an unrelated change.
pub fn check_files_for_reload(cfg: &Config) -> Result<(), ConfigErrors> {
    check(cfg, false)
}

fn check(cfg: &Config, tls: bool) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut err = |key: &str, message: String| {
        errors.push(ConfigError {
            file: cfg.file.clone(),
            line: cfg.line_of(key),
            key: key.to_string(),
            message,
        })
    };
    let auth_needed =
        cfg.authentication.enabled || cfg.services.iter().any(|s| s.authentication == Some(true));
    if auth_needed {
        let a = &cfg.authentication;
        let files = a
            .public_key_path
            .iter()
            .map(|f| ("authentication.publicKeyPath".to_string(), f))
            .chain(
                a.public_keys
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (format!("authentication.publicKeys[{i}]"), f)),
            );
        for (key, f) in files {
            if let Err(e) = Authenticator::load_key_file(f, cfg.base_dir.as_deref()) {
                err(&key, e.to_string());
            }
        }
    }
    if tls && cfg.tls.enabled {
        let (cert, key) = (Path::new(&cfg.tls.cert_file), Path::new(&cfg.tls.key_file));
        if let Err(e) = std::fs::metadata(cert) {
            err("tls.certFile", format!("{}: {e}", cert.display()));
        } else if let Err(e) = std::fs::metadata(key) {
            err("tls.keyFile", format!("{}: {e}", key.display()));
        } else if let Err(e) = crate::listen::tls_acceptor(cert, key) {
            // Which file: the one the message names, else the key (a mismatch is the key's).
            let msg = e.to_string();
            let (which, msg) = if msg.contains("KeyMismatch") {
                let m = format!(
                    "{}: the private key does not match the certificate {}",
                    key.display(),
                    cert.display()
                );
                ("tls.keyFile", m)
            } else if msg.contains(&cert.display().to_string()) {
                ("tls.certFile", msg)
            } else {
                ("tls.keyFile", msg)
            };
            err(which, msg);
        }
    }
    if cfg.admin_token_file.is_some() {
        if let Err(e) = cfg.admin_token_value() {
            err("adminTokenFile", e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}
