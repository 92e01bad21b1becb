//! The compile step: a config as read (`hexgate_config`, every problem at file:line:key) →
//! everything `run` or a reload would refuse, found before anything starts → a [`Compiled`]
//! config that a snapshot is built from without further checks (`Snapshot::build` cannot fail).
//!
//! `validate`, `config push`, `run` (file or Consul KV) and every reload (file watch, SIGHUP,
//! Consul KV) call [`compile`], so `validate` accepts exactly what `run` starts with. It is pure:
//! every file it reads goes through the [`Files`] it is given ([`Disk`] in the gateway, a map
//! in tests), and it does no network work. The JWKS fetch, Redis and Consul come after it, in
//! the runtime (and in `validate --connect`).
//!
//! Checked, each problem reported at the file, line and key that named the file: every
//! public-key file (readable, a public key of a supported type: a private key where the public
//! key belongs is refused), the TLS certificate and key when TLS is on (parseable, the key
//! matching the certificate: the rustls set-up the HTTPS listener then uses as compiled), and
//! `adminTokenFile` (readable, not empty), and each service's `upstreamTls` files (the CA file
//! holding certificates, the client certificate and key parseable and belonging together: the
//! rustls client configs the upstream connections then use as compiled). A reload re-reads them,
//! so a rotated client certificate or CA takes effect without a restart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hexgate_auth::keys::{self, Alg, Key};
use hexgate_auth::Fingerprint;
use hexgate_config::{Config, ConfigError, ConfigErrors, ADMIN_TOKEN_ENV};
use tokio_rustls::TlsAcceptor;

/// Where the compile step reads the files a config names.
pub trait Files {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a directory (false when it does not exist).
    fn is_dir(&self, path: &Path) -> bool {
        let _ = path;
        false
    }
}

/// The local file system.
pub struct Disk;

impl Files for Disk {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

/// What is being compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A start (`run`), and what `validate` and `config push` check: everything.
    Start,
    /// A reload, which never re-applies TLS (a change of `tls` needs a restart, see
    /// `state.rs`): a certificate being rotated on disk must not hold back an unrelated change.
    Reload,
}

/// The key material of `authentication`, read and parsed.
pub struct AuthMaterial {
    /// The settings and key-file contents it was built from: equal fingerprints let a reload keep
    /// the running authenticator (its JWKS and verified-token caches).
    pub fingerprint: Fingerprint,
    pub keys: Vec<Key>,
}

/// A config that passed every check, with the contents of the files it names.
pub struct Compiled {
    /// The config as read (with command-line overrides applied); the snapshot takes what it
    /// needs from it and keeps none of it.
    pub config: Config,
    /// Present when a route requires a token.
    pub auth: Option<AuthMaterial>,
    /// The HTTPS acceptor (Scope::Start with TLS on).
    pub tls: Option<TlsAcceptor>,
    pub admin_token: Option<Arc<str>>,
    /// Per service (same order as `config.services`), its `upstreamTls` built.
    pub upstream_tls: Vec<Option<Arc<hexgate_upstream::ClientTls>>>,
    /// Where the API keys come from and, for `apiKeys.file`, the keys read from it (always
    /// empty for `apiKeys.consulKey`: see [`ApiKeySource::Consul`]).
    pub api_keys: Option<(ApiKeySource, Vec<hexgate_config::apikeys::ApiKeyEntry>)>,
    /// Per service (same order as `config.services`), its `rewrite` compiled.
    pub rewrites: Vec<Option<crate::proxy::rewrite::RewriteRt>>,
}

/// Where a config's API keys come from. The same source across a reload keeps its key store
/// (`snapshot::ApiKeysRt`); the watcher (`reload::watch_api_keys`) follows the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeySource {
    /// `apiKeys.file`, resolved: read here at every start, `validate` and reload (a broken file
    /// is refused like any other config problem), then watched.
    File(PathBuf),
    /// `apiKeys.consulKey`. The compile step does no network work, so it does not read the
    /// value: `validate` says nothing about it (`validate --connect` fetches and parses it),
    /// `run` fetches it before serving (a few seconds at most; without an answer it starts with
    /// no keys, every key refused, until Consul answers), and a reload to a new key starts
    /// with no keys until the watcher's first answer, a fraction of a second later. Then it is
    /// followed with blocking queries.
    Consul(String),
}

/// Compiles `config`: all of its problems at once, or the compiled config.
pub fn compile(config: Config, files: &dyn Files, scope: Scope) -> Result<Compiled, ConfigErrors> {
    let mut errors = Vec::new();
    let mut err = |key: &str, message: String| {
        errors.push(ConfigError {
            file: config.file.clone(),
            line: config.line_of(key),
            key: key.to_string(),
            message,
        })
    };
    let auth_needed = config.authentication.enabled
        || config
            .services
            .iter()
            .any(|s| s.authentication == Some(true));
    let auth = if auth_needed {
        let a = &config.authentication;
        for (i, name) in a.algorithms.iter().enumerate() {
            if Alg::parse(name).is_none() {
                err(
                    &format!("authentication.algorithms[{i}]"),
                    format!("unsupported algorithm {name:?}"),
                );
            }
        }
        let mut fingerprint = Fingerprint {
            settings: a.clone(),
            key_files: Vec::new(),
        };
        let mut keys = Vec::new();
        let named = a
            .public_key_path
            .iter()
            .map(|f| ("authentication.publicKeyPath".to_string(), f))
            .chain(
                a.public_keys
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (format!("authentication.publicKeys[{i}]"), f)),
            );
        for (key, f) in named {
            match key_file(files, f, config.base_dir.as_deref()) {
                Ok((text, parsed)) => {
                    fingerprint.key_files.push(text);
                    keys.extend(parsed);
                }
                Err(message) => err(&key, message),
            }
        }
        Some(AuthMaterial { fingerprint, keys })
    } else {
        None
    };
    let tls = if scope == Scope::Start && config.tls.enabled {
        match tls_files(files, &config) {
            Ok(acceptor) => Some(acceptor),
            Err((key, message)) => {
                err(key, message);
                None
            }
        }
    } else {
        None
    };
    let consul_used = config.consul.register
        || config
            .services
            .iter()
            .any(|s| s.consul_service_name.is_some())
        || config
            .api_keys
            .as_ref()
            .is_some_and(|k| k.consul_key.is_some());
    if consul_used {
        if let Some(ca) = crate::discovery::consul::ca_file(&config.consul) {
            let checked = files
                .read(Path::new(&ca))
                .map_err(|e| format!("{ca}: {e}"))
                .and_then(|pem| crate::httpc::roots_from_pem(&pem, &ca).map_err(|e| e.to_string()));
            if let Err(message) = checked {
                err("consul.caCert", message);
            }
        }
    }
    let mut rewrites = Vec::with_capacity(config.services.len());
    for (i, s) in config.services.iter().enumerate() {
        rewrites.push(s.rewrite.as_ref().and_then(|r| {
            match crate::proxy::rewrite::RewriteRt::compile(&r.regex, &r.replacement) {
                Ok(rt) => Some(rt),
                Err(message) => {
                    err(&format!("services[{i}].rewrite.regex"), message);
                    None
                }
            }
        }));
    }
    let mut upstream_tls = Vec::with_capacity(config.services.len());
    for (i, s) in config.services.iter().enumerate() {
        let built = match &s.upstream_tls {
            Some(t) => match upstream_tls_files(files, t, config.base_dir.as_deref()) {
                Ok(c) => {
                    if c.insecure {
                        tracing::warn!(service = %s.name, "upstreamTls.insecureSkipVerify is on: backend certificates are not verified");
                    }
                    Some(Arc::new(c))
                }
                Err((key, message)) => {
                    err(&format!("services[{i}].upstreamTls.{key}"), message);
                    None
                }
            },
            None => None,
        };
        upstream_tls.push(built);
    }
    let mut key_file_errors = Vec::new();
    let api_keys = match &config.api_keys {
        Some(k) if k.consul_key.is_some() => k
            .consul_key
            .clone()
            .map(|key| (ApiKeySource::Consul(key), Vec::new())),
        Some(k) => {
            let path = resolve(files, &k.file, config.base_dir.as_deref());
            match files.read(&path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let shown = path.display().to_string();
                    let known = |p: &str| config.plans.contains_key(p);
                    match hexgate_config::apikeys::parse_api_keys(&text, &shown).and_then(|e| {
                        if !config.plans.is_empty() {
                            hexgate_config::apikeys::check_plans(&e, &shown, &known)?;
                        }
                        Ok(e)
                    }) {
                        Ok(entries) => Some((ApiKeySource::File(path), entries)),
                        Err(e) => {
                            key_file_errors.extend(e.0);
                            None
                        }
                    }
                }
                Err(e) => {
                    err("apiKeys.file", format!("{}: {e}", path.display()));
                    None
                }
            }
        }
        None => None,
    };
    for (service, message) in breaker_warnings(&config) {
        tracing::warn!(service = %service, "{message}");
    }
    for (key, message) in port_clashes(&config, scope) {
        err(key, message);
    }
    if let Some((key, message)) = access_log_path(&config, files) {
        err(key, message);
    }
    let admin_token = match admin_token(files, &config) {
        Ok(t) => t.map(Arc::from),
        Err(message) => {
            err("adminTokenFile", message);
            None
        }
    };
    errors.extend(key_file_errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Compiled {
        config,
        auth,
        tls,
        admin_token,
        upstream_tls,
        api_keys,
        rewrites,
    })
}

/// Circuit-breaker settings that load but likely do not do what was meant, as (service,
/// message), logged once per load: `consecutive5xx: 1` (one 5xx ejects), `maxEjectedPercent:
/// 100` (a whole pool may go), and a breaker route's backend that another route (or split)
/// lists in a pool whose floor lets nothing be ejected (say alone, at the default 50 %): a
/// backend is shared by every pool naming its address and is ejected only where every pool
/// allows it, so that breaker can never eject it. Static backends only (discovered ones change).
fn breaker_warnings(config: &Config) -> Vec<(String, String)> {
    use std::collections::HashMap;
    type PoolRef<'a> = (Option<&'a str>, &'a [hexgate_config::BackendAddr]);
    fn pools(s: &hexgate_config::Service) -> Vec<PoolRef<'_>> {
        if s.split.is_empty() {
            vec![(None, &s.backends[..])]
        } else {
            s.split
                .iter()
                .map(|p| (Some(p.name.as_str()), &p.backends[..]))
                .collect()
        }
    }
    // Every backend in a pool where no ejection fits: (service index, split) by address.
    let mut pinned: HashMap<&hexgate_config::BackendAddr, Vec<(usize, Option<&str>)>> =
        HashMap::new();
    for (i, s) in config.services.iter().enumerate() {
        let percent = s
            .policies
            .circuit_breaker
            .map_or(crate::upstream::DEFAULT_MAX_EJECTED_PERCENT, |b| {
                b.max_ejected_percent
            });
        for (split, backends) in pools(s) {
            if crate::upstream::max_ejected(backends.len(), percent) == 0 {
                for b in backends {
                    pinned.entry(b).or_default().push((i, split));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (i, s) in config.services.iter().enumerate() {
        let Some(cb) = s.policies.circuit_breaker else {
            continue;
        };
        if cb.consecutive_5xx == 1 {
            out.push((
                s.name.clone(),
                "circuitBreaker.consecutive5xx is 1: one 5xx ejects a backend".to_string(),
            ));
        }
        if cb.max_ejected_percent >= 100 {
            out.push((
                s.name.clone(),
                "circuitBreaker.maxEjectedPercent is 100: a whole pool may be ejected".to_string(),
            ));
        }
        if cb.max_ejected_percent == 0 {
            continue;
        }
        let mut seen = Vec::new();
        for (split, backends) in pools(s) {
            for b in backends {
                let Some(other) = pinned
                    .get(b)
                    .and_then(|v| v.iter().find(|(j, sp)| (*j, *sp) != (i, split)))
                else {
                    continue;
                };
                if seen.contains(&b) {
                    continue;
                }
                seen.push(b);
                let named = &config.services[other.0].name;
                let place = match other.1 {
                    Some(sp) => format!("split {sp:?} of service {named:?}"),
                    None => format!("service {named:?}"),
                };
                out.push((
                    s.name.clone(),
                    format!(
                        "circuitBreaker: backend {} is also in the pool of {place}, where no backend may be ejected (a pool of one, or maxEjectedPercent too low for its size): the breaker can never eject it",
                        b.authority()
                    ),
                ));
            }
        }
    }
    out
}

/// One service's `upstreamTls`: its files read and the client configs built; on error, the key
/// to blame (under `services[i].upstreamTls`).
fn upstream_tls_files(
    files: &dyn Files,
    t: &hexgate_config::UpstreamTls,
    base: Option<&Path>,
) -> Result<hexgate_upstream::ClientTls, (&'static str, String)> {
    use hexgate_upstream::{ClientTls, TlsConfigError, TlsMaterial};
    let read = |key: &'static str, f: &Option<String>| -> Result<_, (&'static str, String)> {
        let Some(f) = f else { return Ok(None) };
        let path = resolve(files, f, base);
        let bytes = files
            .read(&path)
            .map_err(|e| (key, format!("{}: {e}", path.display())))?;
        Ok(Some((path.display().to_string(), bytes)))
    };
    let material = TlsMaterial {
        ca: read("caFile", &t.ca_file)?,
        cert: read("certFile", &t.cert_file)?,
        key: read("keyFile", &t.key_file)?,
        server_name: t.server_name.clone(),
        insecure_skip_verify: t.insecure_skip_verify,
    };
    ClientTls::build(&material).map_err(|e| match e {
        TlsConfigError::Ca(..) => ("caFile", e.to_string()),
        TlsConfigError::Cert(..) => ("certFile", e.to_string()),
        TlsConfigError::Key(..) => ("keyFile", e.to_string()),
        TlsConfigError::Other(_) => ("serverName", e.to_string()),
    })
}

/// Listeners that would bind the same port on overlapping addresses (checked after the
/// command-line overrides, which the reader never sees): the second of each pair is blamed.
/// Port 0 (any free port, as tests use) never clashes.
fn port_clashes(cfg: &Config, scope: Scope) -> Vec<(&'static str, String)> {
    let mut listeners = vec![
        ("gatewayPort", cfg.gateway_bind, cfg.gateway_port),
        ("adminPort", cfg.admin_bind, cfg.admin_port),
    ];
    if cfg.tls.enabled && scope == Scope::Start {
        listeners.push(("tls.httpsPort", cfg.gateway_bind, cfg.tls.https_port));
    }
    let overlap = |a: std::net::IpAddr, b: std::net::IpAddr| {
        a == b || a.is_unspecified() || b.is_unspecified()
    };
    let mut clashes = Vec::new();
    for (i, (key, bind, port)) in listeners.iter().enumerate() {
        if let Some((other, _, _)) = listeners[..i]
            .iter()
            .find(|(_, b, p)| *port != 0 && p == port && overlap(*b, *bind))
        {
            clashes.push((
                *key,
                format!("port {port} is also {other}'s: each listener needs its own port"),
            ));
        }
    }
    clashes
}

/// Finds a key file: as given (relative to the working directory, as the original gateway did),
/// else relative to the config file's directory.
fn resolve(files: &dyn Files, path: &str, base: Option<&Path>) -> PathBuf {
    let p = PathBuf::from(path);
    if p.is_absolute() || files.exists(&p) {
        return p;
    }
    match base {
        Some(b) if files.exists(&b.join(&p)) => b.join(p),
        _ => p,
    }
}

/// One public-key file: its text and the keys in it.
fn key_file(files: &dyn Files, f: &str, base: Option<&Path>) -> Result<(String, Vec<Key>), String> {
    let path = resolve(files, f, base);
    let bytes = files
        .read(&path)
        .map_err(|e| format!("{}: cannot read public key: {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{}: not a PEM file (not UTF-8 text)", path.display()))?;
    let parsed = keys::from_pem(&text, f).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((text, parsed))
}

/// The HTTPS acceptor from `tls.certFile` and `tls.keyFile`; on error, the key to blame.
fn tls_files(files: &dyn Files, cfg: &Config) -> Result<TlsAcceptor, (&'static str, String)> {
    let (cert, key) = (Path::new(&cfg.tls.cert_file), Path::new(&cfg.tls.key_file));
    let cert_pem = files
        .read(cert)
        .map_err(|e| ("tls.certFile", format!("{}: {e}", cert.display())))?;
    let key_pem = files
        .read(key)
        .map_err(|e| ("tls.keyFile", format!("{}: {e}", key.display())))?;
    crate::listen::tls_acceptor(&cert_pem, cert, &key_pem, key).map_err(|e| match e {
        crate::listen::TlsError::Cert(m) => ("tls.certFile", m),
        crate::listen::TlsError::Key(m) => ("tls.keyFile", m),
    })
}

/// The admin token: `adminToken`, else the first line of `adminTokenFile` (relative to the
/// config's directory), else the `HEXGATE_ADMIN_TOKEN` environment variable.
fn admin_token(files: &dyn Files, cfg: &Config) -> Result<Option<String>, String> {
    if let Some(t) = &cfg.admin_token {
        return Ok(Some(t.clone()));
    }
    if let Some(file) = &cfg.admin_token_file {
        let path = match &cfg.base_dir {
            Some(dir) if Path::new(file).is_relative() => dir.join(file),
            _ => PathBuf::from(file),
        };
        let bytes = files
            .read(&path)
            .map_err(|e| format!("adminTokenFile {}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(format!(
                "adminTokenFile {}: the file is empty",
                path.display()
            ));
        }
        return Ok(Some(token));
    }
    Ok(std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty()))
}

/// `accessLog.path`: a file (not a directory) in a directory that exists.
fn access_log_path(cfg: &Config, files: &dyn Files) -> Option<(&'static str, String)> {
    if !cfg.access_log.enabled {
        return None;
    }
    let path = cfg.access_log.file(cfg.base_dir.as_deref())?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if files.is_dir(&path) {
        Some((
            "accessLog.path",
            format!("{} is a directory: name a file in it", path.display()),
        ))
    } else if files.exists(dir) {
        None
    } else {
        Some((
            "accessLog.path",
            format!(
                "{}: the directory {} does not exist",
                path.display(),
                dir.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Files in memory.
    #[derive(Default)]
    struct Mem(HashMap<PathBuf, Vec<u8>>);

    impl Files for Mem {
        fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
        }

        fn exists(&self, path: &Path) -> bool {
            self.0.contains_key(path)
        }
    }

    fn cfg(yaml: &str) -> Config {
        hexgate_config::parse(yaml, "gw.yaml").expect("valid config")
    }

    #[test]
    fn every_file_problem_is_reported_at_its_key_at_once() {
        let c = cfg("authentication:\n  enabled: true\n  publicKeyPath: /k/missing.pem\n  publicKeys:\n    - /k/garbage.pem\nadminTokenFile: /k/empty\nservices: []\n");
        let mut files = Mem::default();
        files
            .0
            .insert("/k/garbage.pem".into(), b"not a key".to_vec());
        files.0.insert("/k/empty".into(), b"\n".to_vec());
        let Err(errors) = compile(c, &files, Scope::Start) else {
            panic!("accepted");
        };
        let keys: Vec<_> = errors.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("authentication.publicKeyPath", 3),
                ("authentication.publicKeys[0]", 5),
                ("adminTokenFile", 6)
            ],
            "{errors}"
        );
    }

    #[test]
    fn tls_is_checked_at_start_and_left_to_the_restart_on_reload() {
        let c = || {
            cfg("tls:\n  enabled: true\n  certFile: /t/cert.pem\n  keyFile: /t/key.pem\nservices: []\n")
        };
        let files = Mem::default();
        let Err(errors) = compile(c(), &files, Scope::Start) else {
            panic!("missing certificate accepted");
        };
        assert_eq!(errors.0[0].key, "tls.certFile");
        assert_eq!(errors.0[0].line, 3);
        assert!(compile(c(), &files, Scope::Reload).is_ok());
    }

    #[test]
    fn listeners_on_one_port_are_refused_after_overrides() {
        let mut c = cfg("adminPort: \"9443\"\ntls:\n  enabled: true\n  httpsPort: \"9443\"\n  certFile: /t/c.pem\n  keyFile: /t/k.pem\nservices: []\n");
        let Err(errors) = compile(c.clone(), &Mem::default(), Scope::Start) else {
            panic!("accepted");
        };
        assert!(
            errors.0.iter().any(|e| e.key == "tls.httpsPort"
                && e.line == 4
                && e.message.contains("adminPort")),
            "{errors}"
        );
        // A reload never rebinds the HTTPS listener: nothing to refuse there.
        assert!(compile(c.clone(), &Mem::default(), Scope::Reload).is_ok());
        c.gateway_port = c.admin_port; // as `run --gateway-port 9443` would
        let Err(errors) = compile(c, &Mem::default(), Scope::Reload) else {
            panic!("accepted");
        };
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.key == "adminPort" && e.line == 1 && e.message.contains("gatewayPort")),
            "{errors}"
        );
    }

    #[test]
    fn a_consul_ca_that_cannot_be_read_is_refused_at_its_key() {
        let c = cfg("consul:\n  address: https://127.0.0.1:8501\n  caCert: /c/ca.pem\nservices:\n  - name: s\n    path: /s/\n    consulServiceName: s\n");
        let Err(errors) = compile(c, &Mem::default(), Scope::Reload) else {
            panic!("accepted");
        };
        assert_eq!(errors.0[0].key, "consul.caCert", "{errors}");
        assert_eq!(errors.0[0].line, 3, "{errors}");
    }

    #[test]
    fn upstream_tls_files_are_refused_at_their_keys() {
        let c = cfg("services:\n  - name: a\n    path: /a/\n    backends: [\"https://10.0.0.1\"]\n    upstreamTls:\n      caFile: /u/missing.pem\n  - name: b\n    path: /b/\n    backends: [\"https://10.0.0.2\"]\n    upstreamTls:\n      caFile: /u/garbage.pem\n  - name: c\n    path: /c/\n    backends: [\"https://10.0.0.3\"]\n    upstreamTls:\n      certFile: /u/garbage.pem\n      keyFile: /u/garbage.pem\n");
        let mut files = Mem::default();
        files
            .0
            .insert("/u/garbage.pem".into(), b"not a certificate".to_vec());
        let Err(errors) = compile(c, &files, Scope::Reload) else {
            panic!("accepted");
        };
        let keys: Vec<_> = errors.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("services[0].upstreamTls.caFile", 6),
                ("services[1].upstreamTls.caFile", 11),
                ("services[2].upstreamTls.certFile", 16),
            ],
            "{errors}"
        );
        assert!(errors.0[0].message.contains("/u/missing.pem"), "{errors}");
        assert!(
            errors.0[1].message.contains("no PEM certificate"),
            "{errors}"
        );
    }

    #[test]
    fn api_keys_in_consul_are_not_read_by_the_compile_step() {
        let c = cfg("apiKeys:\n  consulKey: hexgate/apikeys\nservices: []\n");
        let compiled = compile(c, &Mem::default(), Scope::Start).expect("compiles");
        let (source, entries) = compiled.api_keys.expect("api keys");
        assert_eq!(source, ApiKeySource::Consul("hexgate/apikeys".into()));
        assert!(entries.is_empty());
        let c = cfg("apiKeys:\n  file: /k/keys.yaml\nservices: []\n");
        let Err(errors) = compile(c, &Mem::default(), Scope::Reload) else {
            panic!("a missing key file accepted");
        };
        assert_eq!(errors.0[0].key, "apiKeys.file", "{errors}");
    }

    #[test]
    fn breaker_settings_that_surprise_are_warned_about_at_load() {
        let c = cfg("services:\n  - name: a\n    path: /a/\n    backends: [\"http://10.0.0.1\", \"http://10.0.0.2\"]\n    circuitBreaker: {consecutive5xx: 1, ejectFor: 10s, maxEjectedPercent: 100}\n  - name: b\n    path: /b/\n    backends: [\"http://10.0.0.1\", \"http://10.0.0.3\"]\n    circuitBreaker: {consecutive5xx: 5, ejectFor: 10s, maxEjectedPercent: 50}\n  - name: c\n    path: /c/\n    backends: [\"http://10.0.0.3\"]\n  - name: d\n    path: /d/\n    backends: [\"http://10.0.0.4\"]\n    circuitBreaker: {consecutive5xx: 5, ejectFor: 10s, maxEjectedPercent: 50}\n");
        let w = breaker_warnings(&c);
        let text = |svc: &str| {
            w.iter()
                .filter(|(s, _)| s == svc)
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
        };
        let a = text("a");
        assert_eq!(a.len(), 2, "{w:?}");
        assert!(a[0].contains("one 5xx ejects") && a[1].contains("whole pool"));
        // b's 10.0.0.3 is alone in c's pool: its breaker can never eject it.
        let b = text("b");
        assert_eq!(b.len(), 1, "{w:?}");
        assert!(
            b[0].contains("10.0.0.3") && b[0].contains("service \"c\""),
            "{b:?}"
        );
        // A breaker route alone in its own pool is not warned about here (documented), nor is
        // a route without a breaker.
        assert!(text("c").is_empty() && text("d").is_empty(), "{w:?}");
    }

    #[test]
    fn a_service_without_upstream_tls_files_compiles_to_none() {
        let c = cfg("services:\n  - name: a\n    path: /a/\n    backends: [\"https://10.0.0.1\", \"h2c://10.0.0.2:50051\"]\n  - name: b\n    path: /b/\n    backends: [\"https://10.0.0.1\"]\n    upstreamTls:\n      serverName: billing.internal\n      insecureSkipVerify: true\n");
        let compiled = compile(c, &Mem::default(), Scope::Start).expect("compiles");
        assert!(compiled.upstream_tls[0].is_none());
        let b = compiled.upstream_tls[1].as_ref().expect("built");
        assert!(b.insecure && !b.has_client_cert());
        assert!(b.server_name.is_some());
    }

    #[test]
    fn a_file_in_a_missing_directory_is_refused() {
        struct Fake;
        impl Files for Fake {
            fn read(&self, _: &Path) -> std::io::Result<Vec<u8>> {
                Err(std::io::ErrorKind::NotFound.into())
            }
            fn exists(&self, p: &Path) -> bool {
                p == Path::new("/etc/hexgate/logs")
            }
        }
        let cfg = |yaml: &str| {
            let mut c = crate::config::parse(&format!("{yaml}\nservices: []\n"), "t").unwrap();
            c.base_dir = Some(PathBuf::from("/etc/hexgate"));
            c
        };
        assert!(access_log_path(&cfg("accessLog: {path: logs/a.log}"), &Fake).is_none());
        assert!(access_log_path(&cfg("accessLog: true"), &Fake).is_none());
        assert!(
            access_log_path(&cfg("accessLog: {enabled: false, path: /no/a.log}"), &Fake).is_none()
        );
        let (key, msg) = access_log_path(&cfg("accessLog: {path: nope/a.log}"), &Fake).unwrap();
        assert_eq!(key, "accessLog.path");
        assert!(msg.contains("/etc/hexgate/nope"), "{msg}");
    }
}
