//! A demo backend: "Hello from Backend (Port N)" on every path, 200 on /health, registered in
//! Consul with an HTTP health check and deregistered on Ctrl+C or SIGTERM.
//!
//! cargo run --example backend -- --port 8081 --service user-service [--advertise-addr 127.0.0.1]
//!   [--bind 0.0.0.0] [--check-interval 5s] [--check-timeout 1s] [--no-register]
//!
//! Consul is found through CONSUL_HTTP_ADDR (default http://127.0.0.1:8500).

use std::net::SocketAddr;
use std::process::ExitCode;

use hexgate::discovery::consul::ConsulClient;

struct Args {
    port: u16,
    service: String,
    advertise: String,
    bind: String,
    interval: String,
    timeout: String,
    register: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 8081,
        service: "user-service".into(),
        advertise: "127.0.0.1".into(),
        bind: "127.0.0.1".into(),
        interval: "5s".into(),
        timeout: "1s".into(),
        register: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.trim_start_matches('-') {
            "port" => a.port = val("--port")?.parse().map_err(|_| "--port: not a port")?,
            "service" => a.service = val("--service")?,
            "advertise-addr" => a.advertise = val("--advertise-addr")?,
            "bind" => a.bind = val("--bind")?,
            "check-interval" => a.interval = val("--check-interval")?,
            "check-timeout" => a.timeout = val("--check-timeout")?,
            "no-register" => a.register = false,
            "h" | "help" => {
                return Err("usage: backend --port N --service NAME [--advertise-addr A] [--bind A] [--check-interval 5s] [--check-timeout 1s] [--no-register]".into())
            }
            other => return Err(format!("unknown flag --{other}")),
        }
    }
    Ok(a)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let addr: SocketAddr = match format!("{}:{}", args.bind, args.port).parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad --bind/--port: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::spawn(hexgate::demo::serve_hello(listener));
    let id = format!("{}-{}", args.service, args.port);
    let client = match ConsulClient::new(&hexgate::config::Consul::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    if args.register {
        let def = serde_json::json!({
            "ID": id,
            "Name": args.service,
            "Address": args.advertise,
            "Port": args.port,
            "Check": {
                "HTTP": format!("http://{}:{}/health", args.advertise, args.port),
                "Interval": args.interval,
                "Timeout": args.timeout,
                "DeregisterCriticalServiceAfter": "1m"
            }
        });
        if let Err(e) = client.register(&def).await {
            eprintln!("Consul registration failed: {e}");
            return ExitCode::from(1);
        }
        println!(
            "backend {id} listening on {addr}, registered in Consul at {}",
            client.addr
        );
    } else {
        println!("backend {id} listening on {addr}");
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if args.register {
        match client.deregister(&id).await {
            Ok(()) => println!("deregistered {id}"),
            Err(e) => eprintln!("deregistration failed: {e}"),
        }
    }
    ExitCode::SUCCESS
}
