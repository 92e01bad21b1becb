//! `hexgate demo` as a newcomer runs it: routing, balancing, auth and 429s in one command.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_routing_balancing_auth_and_429() {
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let mut child = Command::new(bin())
        .args([
            "demo",
            "--port",
            &ports[0].to_string(),
            "--admin-port",
            &ports[1].to_string(),
        ])
        .args([
            "--backend-ports",
            &format!("{},{},{}", ports[2], ports[3], ports[4]),
        ])
        .env("HEXGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut token = None;
    let mut banner = String::new();
    while token.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo banner");
        banner.push_str(&line);
        banner.push('\n');
        if let Some(t) = line.trim().strip_prefix("export TOKEN=") {
            token = Some(t.to_string());
        }
    }
    let token = token.unwrap();
    assert!(
        banner.contains(&format!("curl http://localhost:{}/products/abc", ports[0])),
        "{banner}"
    );
    let gw = ports[0];
    let bearer = format!("Bearer {token}");
    let get_auth = |path: &'static str, auth: bool| {
        let fields = if auth {
            vec![("authorization", bearer.as_str())]
        } else {
            vec![]
        };
        async move { get_with(gw, path, &fields).await }
    };
    let (s, _, body) = get_auth("/products/abc", false).await.unwrap();
    assert_eq!(
        (s, body.trim()),
        (
            200,
            format!("Hello from Backend (Port {})", ports[4]).as_str()
        )
    );
    let (s, _, body) = get_auth("/users/1", false).await.unwrap();
    assert_eq!(s, 401);
    assert!(body.contains("401 Unauthorized: Missing Authorization header"));
    let (_, _, b1) = get_auth("/users/1", true).await.unwrap();
    let (_, _, b2) = get_auth("/users/2", true).await.unwrap();
    assert_eq!(b1.trim(), format!("Hello from Backend (Port {})", ports[2]));
    assert_eq!(b2.trim(), format!("Hello from Backend (Port {})", ports[3]));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(get_auth("/users/1", true).await.unwrap().0);
    }
    assert_eq!(codes, vec![200, 200, 200, 429]);
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "demo exits cleanly on Ctrl+C");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
