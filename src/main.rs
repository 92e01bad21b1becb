//! The `hexgate` command line: run, validate, demo.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use hexgate::auth::keys::Alg;
use hexgate::auth::tools;
use hexgate::compile::{compile, Compiled, Disk, Scope};
use hexgate::config::{self, Config};
use hexgate::discovery::consul::{ConsulClient, ConsulError};
use hexgate::discovery::kv;
use hexgate::server::{self, Listeners};
use hexgate::state::{Overrides, Source, State};

#[global_allocator]
static GLOBAL: hexgate::alloc::MiMalloc = hexgate::alloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hexgate", version, about = "HexGate API gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE and write it to KEY with check-and-set (refused if KEY changed meanwhile).
    Push {
        #[arg(long, default_value = "hexgate/config")]
        key: String,
        file: PathBuf,
        /// Write only if the key's ModifyIndex is this (0: only if the key does not exist);
        /// default: the index read just before writing.
        #[arg(long)]
        cas: Option<u64>,
        /// Overwrite without check-and-set.
        #[arg(long)]
        force: bool,
    },
    /// Print the config stored at KEY.
    Get {
        #[arg(long, default_value = "hexgate/config")]
        key: String,
    },
    /// Show what pushing FILE would change.
    Diff {
        #[arg(long, default_value = "hexgate/config")]
        key: String,
        file: PathBuf,
    },
    /// Print a JSON Schema of the config file, for editors
    /// (`# yaml-language-server: $schema=hexgate.schema.json`).
    Schema,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a YAML config file (hot-reloaded on change and on SIGHUP).
    Run {
        /// Path to the config file.
        #[arg(long, short = 'c', default_value = "config/config.yaml")]
        config: PathBuf,
        /// Read the config from this Consul KV key instead (e.g. hexgate/config), and follow it.
        /// Consul is found through CONSUL_HTTP_ADDR (default http://127.0.0.1:8500).
        #[arg(long, conflicts_with = "config")]
        consul_key: Option<String>,
        /// Public port for this instance, overriding gatewayPort in every config version.
        #[arg(long)]
        gateway_port: Option<u16>,
        /// Admin port for this instance, overriding adminPort in every config version.
        #[arg(long)]
        admin_port: Option<u16>,
    },
    /// Store, show or compare the config kept in Consul KV.
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
    /// Check a config file offline: exit 0 with a summary, or non-zero listing every problem.
    Validate {
        /// Path to the config file.
        file: PathBuf,
        /// After the offline checks pass, try what needs the network (the JWKS URL, Redis,
        /// Consul, the API key list at apiKeys.consulKey): one line each, non-zero exit if any
        /// failed.
        #[arg(long)]
        connect: bool,
    },
    /// Write a key pair for signing test tokens: DIR/private.pem (0600) and DIR/public.pem.
    Keygen {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "config")]
        out: PathBuf,
        /// Key type by algorithm: RS256 (RSA-2048, default), ES256, ES384 or EdDSA.
        #[arg(long, default_value = "RS256")]
        alg: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print a signed JWT on stdout (and nothing else), e.g. TOKEN=$(hexgate token --sub alice).
    Token {
        /// PEM private key (PKCS#8, or PKCS#1 RSA).
        #[arg(long, default_value = "config/private.pem")]
        key: PathBuf,
        /// Subject (the consumer id by default).
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long)]
        iss: Option<String>,
        #[arg(long)]
        aud: Option<String>,
        /// Key id for the token header.
        #[arg(long)]
        kid: Option<String>,
        /// Signing algorithm; defaults to the key's (RS256 for RSA).
        #[arg(long)]
        alg: Option<String>,
        /// Extra claim, k=v (v parsed as JSON when it is valid JSON, else a string). Repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
    /// API keys for `apiKeys.file`.
    Apikey {
        #[command(subcommand)]
        action: ApikeyCommand,
    },
    /// Start the gateway with three built-in backends, memory only: the first thing to try.
    Demo {
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
        /// Ports of the three demo backends (user-service x2, product-service).
        #[arg(long, value_delimiter = ',', default_value = "8081,8082,8083")]
        backend_ports: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Make a new key: prints the key once (first line), then the entry to add to the key file
    /// (only the key's SHA-256 is stored there).
    New {
        /// The consumer the key belongs to (sent upstream as X-Consumer-Id).
        #[arg(long)]
        consumer: String,
        #[arg(long)]
        plan: Option<String>,
        /// The key's id in the file (default: CONSUMER-RANDOM).
        #[arg(long)]
        id: Option<String>,
        /// When the key stops working: RFC 3339 time or a date (midnight UTC).
        #[arg(long)]
        expires: Option<String>,
        /// Scopes the key grants, comma-separated.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
}

/// `hexgate apikey new`: the key on the first line, then its key-file entry.
fn apikey_new(
    consumer: String,
    plan: Option<String>,
    id: Option<String>,
    expires: Option<String>,
    scopes: Vec<String>,
) -> ExitCode {
    let visible = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    };
    if !visible(&consumer) {
        eprintln!(
            "hexgate apikey new: --consumer must be visible ASCII without quotes or backslashes"
        );
        return ExitCode::from(2);
    }
    if let Some(e) = &expires {
        if config::apikeys::parse_time(e).is_none() {
            eprintln!("hexgate apikey new: --expires {e:?} is not an RFC 3339 time (2027-06-30T00:00:00Z) or a date (2027-06-30)");
            return ExitCode::from(2);
        }
    }
    for v in plan.iter().chain(id.iter()).chain(scopes.iter()) {
        if !visible(v) {
            eprintln!(
                "hexgate apikey new: {v:?} must be visible ASCII without quotes or backslashes"
            );
            return ExitCode::from(2);
        }
    }
    if let Some(t) = expires.as_deref().and_then(config::apikeys::parse_time) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if t <= now {
            eprintln!("hexgate apikey new: warning: --expires is in the past; the key is refused from the start");
        }
    }
    let (key, hash) = hexgate::auth::apikeys::new_key();
    let id = id.unwrap_or_else(|| format!("{consumer}-{:08x}", fastrand::u32(..)));
    let mut out = format!("{key}\n- id: \"{id}\"\n  consumer: \"{consumer}\"\n");
    if let Some(p) = plan {
        out.push_str(&format!("  plan: \"{p}\"\n"));
    }
    if let Some(e) = expires {
        out.push_str(&format!("  expires: \"{e}\"\n"));
    }
    if !scopes.is_empty() {
        let list: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
        out.push_str(&format!("  scopes: [{}]\n", list.join(", ")));
    }
    // Last: an entry cut short while the file is written has no hash, so the whole file is
    // refused rather than installed without its expiry or scopes.
    out.push_str(&format!("  hash: \"{hash}\"\n"));
    // A closed pipe (`| head -1`) is not an error worth a panic.
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HEXGATE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a file, journald or a container's log gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file, connect } => validate(&file, connect),
        Command::Keygen { out, alg, force } => keygen(&out, &alg, force),
        Command::Apikey {
            action:
                ApikeyCommand::New {
                    consumer,
                    plan,
                    id,
                    expires,
                    scopes,
                },
        } => apikey_new(consumer, plan, id, expires, scopes),
        Command::Token {
            key,
            sub,
            ttl,
            iss,
            aud,
            kid,
            alg,
            claims,
        } => match token(&key, sub, &ttl, iss, aud, kid, alg, claims) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hexgate token: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Run {
            config,
            consul_key,
            gateway_port,
            admin_port,
        } => {
            init_tracing();
            let overrides = Overrides {
                gateway_port,
                admin_port,
            };
            match consul_key {
                Some(key) => report(run_from_consul(key, overrides)),
                None => {
                    let loaded = config::load_file(&config).and_then(|mut c| {
                        overrides.apply(&mut c);
                        compile(c, &Disk, Scope::Start)
                    });
                    let compiled = match loaded {
                        Ok(c) => c,
                        Err(errors) => {
                            eprintln!("{errors}");
                            eprintln!(
                                "hexgate: {} problem(s) in {}; not starting",
                                errors.0.len(),
                                config.display()
                            );
                            return ExitCode::from(2);
                        }
                    };
                    report(run_gateway_at(
                        compiled,
                        Source::File(config),
                        None,
                        0,
                        overrides,
                    ))
                }
            }
        }
        Command::Config {
            action: ConfigCommand::Schema,
        } => print_schema(),
        Command::Config { action } => config_command(action),
        Command::Demo {
            port,
            admin_port,
            backend_ports,
        } => {
            init_tracing();
            let ports: [u16; 3] = match backend_ports.as_slice() {
                [a, b, c] => [*a, *b, *c],
                _ => {
                    eprintln!("hexgate demo: --backend-ports takes exactly three ports");
                    return ExitCode::from(2);
                }
            };
            let keys = std::env::temp_dir().join(format!("hexgate-demo-{}", std::process::id()));
            let token = match demo_keys(&keys) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("hexgate demo: {e:#}");
                    return ExitCode::from(1);
                }
            };
            let keys_str = keys.display().to_string();
            let yaml = hexgate::demo::config_yaml(port, admin_port, ports, &keys_str);
            let cfg = match config::parse(&yaml, "<demo>")
                .and_then(|c| compile(c, &Disk, Scope::Start))
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let banner = hexgate::demo::banner(port, admin_port, ports, &keys_str, &token);
            let result = run_gateway(cfg, Source::Embedded, Some((ports, banner)));
            let _ = std::fs::remove_dir_all(&keys);
            report(result)
        }
    }
}

/// A fresh RS256 key pair and the API key file for the demo, and a day-long token for "alice".
fn demo_keys(dir: &std::path::Path) -> anyhow::Result<String> {
    tools::keygen(dir, Alg::RS256, true)?;
    hexgate::demo::write_api_key_file(dir)
        .with_context(|| format!("writing the demo API key file in {}", dir.display()))?;
    let private = dir.join("private.pem");
    token(
        &private,
        "alice".into(),
        "24h",
        None,
        None,
        None,
        None,
        Vec::new(),
    )
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<config::ConfigErrors>().is_some() => {
            eprintln!("{e}");
            eprintln!("hexgate: configuration rejected; not starting");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("hexgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_alg(s: &str) -> anyhow::Result<Alg> {
    Alg::parse(s).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown algorithm {s:?} (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
        )
    })
}

fn keygen(out: &std::path::Path, alg: &str, force: bool) -> ExitCode {
    let result = parse_alg(alg).and_then(|a| Ok(tools::keygen(out, a, force)?));
    match result {
        Ok(()) => {
            eprintln!(
                "wrote {0}/private.pem (keep it secret) and {0}/public.pem (set authentication.publicKeyPath to it)",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hexgate keygen: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn token(
    key: &std::path::Path,
    sub: String,
    ttl: &str,
    iss: Option<String>,
    aud: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    claims: Vec<String>,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(key).with_context(|| format!("{}", key.display()))?;
    let signing =
        tools::SigningKey::from_pem(&text).with_context(|| format!("{}", key.display()))?;
    let alg = match alg {
        Some(a) => parse_alg(&a)?,
        None => signing.default_alg(),
    };
    let ttl = config::duration::parse(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut body = serde_json::json!({ "sub": sub, "iat": now, "exp": now + ttl.as_secs() });
    if let Some(i) = iss {
        body["iss"] = i.into();
    }
    if let Some(a) = aud {
        body["aud"] = a.into();
    }
    for c in claims {
        let (k, v) = c
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--claim {c:?}: expected key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        body[k] = value;
    }
    Ok(tools::sign_token(&signing, alg, kid.as_deref(), &body)?)
}

fn validate(file: &std::path::Path, connect: bool) -> ExitCode {
    match config::load_file(file).and_then(|c| compile(c, &Disk, Scope::Start)) {
        Ok(Compiled { config: cfg, .. }) => {
            let backends: usize = cfg
                .services
                .iter()
                .map(|s| {
                    s.backends.len() + s.split.iter().map(|sp| sp.backends.len()).sum::<usize>()
                })
                .sum();
            let consul = cfg
                .services
                .iter()
                .filter(|s| s.consul_service_name.is_some())
                .count();
            println!(
                "{}: OK: {} service(s), {} static backend(s), {} discovered through Consul, gateway port {}, admin port {}",
                file.display(),
                cfg.services.len(),
                backends,
                consul,
                cfg.gateway_port,
                cfg.admin_port
            );
            if let Some(key) = cfg.api_keys.as_ref().and_then(|k| k.consul_key.as_deref()) {
                if !connect {
                    println!("apiKeys.consulKey {key}: the key list in Consul is not read offline (--connect fetches and parses it)");
                }
            }
            if connect && !connect_checks(&cfg) {
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} problem(s)", file.display(), errors.0.len());
            ExitCode::from(2)
        }
    }
}

fn print_schema() -> ExitCode {
    match serde_json::to_string_pretty(&config::schema::schema()) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hexgate config schema: {e}");
            ExitCode::from(1)
        }
    }
}

/// `validate --connect`: tries what the config needs the network for (`hexgate::connect`), one
/// line per check; false when any failed.
fn connect_checks(cfg: &Config) -> bool {
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e:#}");
            return false;
        }
    };
    let checks = rt.block_on(hexgate::connect::checks(cfg));
    if checks.is_empty() {
        println!("nothing to connect to (no authentication.jwksUrl, redis or Consul)");
    }
    let mut ok = true;
    for (what, result) in checks {
        match result {
            Ok(detail) => println!("{what}: OK: {detail}"),
            Err(e) => {
                ok = false;
                eprintln!("{what}: FAILED: {e}");
            }
        }
    }
    ok
}

fn run_gateway(
    cfg: Compiled,
    source: Source,
    demo: Option<([u16; 3], String)>,
) -> anyhow::Result<()> {
    run_gateway_at(cfg, source, demo, 0, Overrides::default())
}

/// The control runtime: admin, health checks, reloads, discovery (public traffic runs on the
/// per-core workers started by `server::serve`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hexgate-control")
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// A Consul client whose address (`consul.address` or CONSUL_HTTP_ADDR, which may carry
/// `user:pass@` or `?token=`) appears in errors and logs only redacted.
fn consul_client(cfg: &hexgate::config::Consul) -> Result<ConsulClient, ConsulError> {
    use hexgate::httpc::{redact_url, HttpError};
    match ConsulClient::new(cfg) {
        Ok(mut client) => {
            client.addr = redact_url(&client.addr);
            Ok(client)
        }
        Err(ConsulError::Http(addr, e)) => Err(ConsulError::Http(
            redact_url(&addr),
            match e {
                HttpError::Url(u) => HttpError::Url(redact_url(&u)),
                other => other,
            },
        )),
        Err(other) => Err(other),
    }
}

/// `run --consul-key`: the config must exist and be valid at start.
fn run_from_consul(key: String, overrides: Overrides) -> anyhow::Result<()> {
    let (cfg, index) = runtime()?.block_on(async {
        let client = consul_client(&hexgate::config::Consul::default())?;
        kv::load(&client, &key).await.map_err(|e| match e {
            kv::KvError::Invalid(errors) => anyhow::Error::new(errors),
            other => anyhow::anyhow!("{other}"),
        })
    })?;
    let mut cfg = cfg;
    overrides.apply(&mut cfg);
    let compiled = compile(cfg, &Disk, Scope::Start)?;
    run_gateway_at(compiled, Source::ConsulKv(key), None, index, overrides)
}

/// How long `run` waits for the API keys of `apiKeys.consulKey` before serving without them.
const KEYS_FIRST_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Starts a gateway from its compiled config (every start, from a file, Consul KV or the demo,
/// goes through `compile::compile` first, TLS included, with the overrides applied).
fn run_gateway_at(
    mut compiled: Compiled,
    source: Source,
    demo: Option<([u16; 3], String)>,
    kv_index: u64,
    overrides: Overrides,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        if let Some((ports, _)) = &demo {
            hexgate::demo::start_backends(*ports).await?;
        }
        let cfg = compiled.config.clone();
        let listeners = Listeners::bind(&cfg, compiled.tls.take()).await?;
        let keys_in_consul = cfg
            .api_keys
            .as_ref()
            .and_then(|k| k.consul_key.clone());
        let needs_consul = cfg.consul.register
            || cfg.services.iter().any(|s| s.consul_service_name.is_some())
            || matches!(source, Source::ConsulKv(_))
            || keys_in_consul.is_some();
        let consul = if needs_consul {
            Some(consul_client(&cfg.consul)?)
        } else {
            None
        };
        // The API key watcher's client: the one above, else one made anyway (quietly: nothing
        // needs Consul yet) in case a reload switches to `apiKeys.consulKey`.
        let keys_consul = consul
            .clone()
            .or_else(|| consul_client(&cfg.consul).ok());
        let registration = if cfg.consul.register {
            consul
                .clone()
                .map(|c| Registration::new(c, &cfg, &listeners))
        } else {
            None
        };
        let kv = match &source {
            Source::ConsulKv(key) => consul.clone().map(|c| (c, key.clone())),
            _ => None,
        };
        let state = State::new(compiled, source, consul, overrides);
        // The access log's writer and SIGUSR1 (reopen), whether or not the log is on now.
        hexgate::access_log::start(&cfg, state.metrics.clone()).map_err(anyhow::Error::msg)?;
        // The span exporter, whether or not tracing is on now (a reload may turn it on).
        hexgate::otel::export::start(state.metrics.clone());
        // API keys from Consul are fetched before serving when Consul answers soon; otherwise
        // the gateway serves with none (every key refused) until the watcher gets them.
        let (keys_ready, first_keys) = tokio::sync::oneshot::channel();
        tokio::spawn(hexgate::reload::watch_api_keys(
            state.clone(),
            keys_consul,
            Some(keys_ready),
        ));
        if let Some(key) = &keys_in_consul {
            if tokio::time::timeout(KEYS_FIRST_WAIT, first_keys).await.is_err() {
                tracing::warn!(key = %key, "no answer from Consul for apiKeys.consulKey within {}s: serving with no API keys (every key refused) until it answers", KEYS_FIRST_WAIT.as_secs());
            }
        }
        tracing::info!(
            public = ?listeners.public_addr(),
            https = ?listeners.https_addr(),
            admin = ?listeners.admin_addr(),
            "hexgate listening"
        );
        if let Some((_, banner)) = &demo {
            println!("{banner}");
        }
        tokio::spawn(hexgate::health::run(state.clone()));
        tokio::spawn(hexgate::reload::watch(state.clone()));
        if let Some((client, key)) = kv {
            tokio::spawn(hexgate::discovery::kv::watch(
                state.clone(),
                client,
                key,
                kv_index,
            ));
        }
        if let Some(r) = &registration {
            r.register().await;
        }
        server::serve(state, listeners, &cfg, shutdown_signal()).await;
        hexgate::access_log::flush(std::time::Duration::from_secs(2)).await;
        hexgate::otel::export::flush(std::time::Duration::from_secs(2)).await;
        if let Some(r) = &registration {
            r.deregister().await;
        }
        Ok(())
    })
}

/// This instance's entry in Consul's catalog (service `consul.serviceName`, default `hexgate`),
/// with an HTTP check on the admin /healthz, so Prometheus can find every instance.
struct Registration {
    client: ConsulClient,
    id: String,
    definition: serde_json::Value,
}

impl Registration {
    fn new(client: ConsulClient, cfg: &Config, listeners: &Listeners) -> Registration {
        let admin_port = listeners
            .admin_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.admin_port);
        let gateway_port = listeners
            .public_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.gateway_port);
        let address = cfg.consul.advertise_address.clone().unwrap_or_else(|| {
            if cfg.admin_bind.is_unspecified() {
                // The local address used to reach Consul (no packet is sent).
                std::net::UdpSocket::bind("0.0.0.0:0")
                    .and_then(|s| {
                        s.connect((client.host(), client.port()))?;
                        s.local_addr()
                    })
                    .map(|a| a.ip().to_string())
                    .unwrap_or_else(|_| "127.0.0.1".into())
            } else {
                cfg.admin_bind.to_string()
            }
        });
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".into());
        let id = format!("{}-{host}-{gateway_port}", cfg.consul.service_name);
        let definition = serde_json::json!({
            "ID": id,
            "Name": cfg.consul.service_name,
            "Address": address,
            "Port": admin_port,
            "Tags": ["hexgate"],
            "Meta": { "gateway_port": gateway_port.to_string(), "admin_port": admin_port.to_string() },
            "Check": {
                "HTTP": format!("http://{address}:{admin_port}/healthz"),
                "Interval": "5s",
                "Timeout": "2s",
                "DeregisterCriticalServiceAfter": "1m"
            }
        });
        Registration {
            client,
            id,
            definition,
        }
    }

    async fn register(&self) {
        match self.client.register(&self.definition).await {
            Ok(()) => tracing::info!(id = %self.id, "registered in Consul"),
            Err(e) => tracing::warn!(id = %self.id, error = %e, "Consul registration failed"),
        }
    }

    async fn deregister(&self) {
        match self.client.deregister(&self.id).await {
            Ok(()) => tracing::info!(id = %self.id, "deregistered from Consul"),
            Err(e) => tracing::warn!(id = %self.id, error = %e, "Consul deregistration failed"),
        }
    }
}

fn config_command(action: ConfigCommand) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hexgate config: {e:#}");
            return ExitCode::from(1);
        }
    };
    let result: anyhow::Result<ExitCode> = rt.block_on(async {
        let client = consul_client(&hexgate::config::Consul::default())?;
        match action {
            ConfigCommand::Schema => Ok(print_schema()),
            ConfigCommand::Get { key } => match client.kv_get(&key, 0, std::time::Duration::from_secs(1)).await? {
                (Some((text, _)), _) => {
                    print!("{text}");
                    if !text.ends_with('\n') {
                        println!();
                    }
                    Ok(ExitCode::SUCCESS)
                }
                (None, _) => {
                    eprintln!("hexgate config get: key {key:?} does not exist");
                    Ok(ExitCode::from(1))
                }
            },
            ConfigCommand::Diff { key, file } => {
                let new = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
                let old = client
                    .kv_get(&key, 0, std::time::Duration::from_secs(1))
                    .await?
                    .0
                    .map(|(t, _)| t)
                    .unwrap_or_default();
                let d = kv::diff(&old, &new);
                if d.is_empty() {
                    println!("no changes");
                } else {
                    print!("{d}");
                }
                Ok(ExitCode::SUCCESS)
            }
            ConfigCommand::Push { key, file, cas, force } => {
                let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
                // The same checks as `validate` and `run`, files included (relative to the file).
                let checked = config::parse(&text, &file.display().to_string()).and_then(|mut c| {
                    c.base_dir = file.parent().map(|p| p.to_path_buf());
                    compile(c, &Disk, Scope::Start)
                });
                if let Err(errors) = checked {
                    eprintln!("{errors}");
                    eprintln!("hexgate config push: {} problem(s); nothing pushed", errors.0.len());
                    return Ok(ExitCode::from(2));
                }
                let cas = if force {
                    None
                } else {
                    match cas {
                        Some(c) => Some(c),
                        None => Some(
                            client
                                .kv_get(&key, 0, std::time::Duration::from_secs(1))
                                .await?
                                .0
                                .map(|(_, modify)| modify)
                                .unwrap_or(0),
                        ),
                    }
                };
                if client.kv_put(&key, &text, cas).await? {
                    eprintln!("pushed {} to Consul key {key}", file.display());
                    Ok(ExitCode::SUCCESS)
                } else {
                    eprintln!(
                        "hexgate config push: {key} changed since index {} was read; nothing pushed (check `hexgate config diff`, then push again, or use --force)",
                        cas.unwrap_or(0)
                    );
                    Ok(ExitCode::from(3))
                }
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hexgate config: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
