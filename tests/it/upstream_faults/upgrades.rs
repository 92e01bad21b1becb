//! Upgrades: only allowed tokens are forwarded, and a tunnel opens only on a 101 that completes
//! the handshake the client asked for.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Answer, UpgradeBackend};
use crate::raw::{read_head, read_to_close, send};
use crate::support::*;

/// The RFC 6455 example key (base64 of 16 bytes).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const TUNNEL_BYTES: &[u8] = b"TUNNEL-BYTES-FROM-THE-CLIENT";

fn upgrade_request(path: &str, upgrade: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n{extra}\r\n"
    )
}

fn ws_headers(key: &str, version: &str) -> String {
    format!("Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n")
}

/// Sends `req`, then `TUNNEL_BYTES` right behind it as a client that assumes the upgrade
/// succeeds would; returns the response head and the open stream.
async fn try_upgrade(port: u16, req: &str) -> (String, Vec<u8>, TcpStream) {
    let mut s = send(port, req.as_bytes()).await;
    let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
    let _ = s.write_all(TUNNEL_BYTES).await;
    (head, rest, s)
}

/// Asserts that a failed upgrade tunnelled nothing: the backend saw the request, none of the
/// bytes sent after it, and the gateway closed the client's connection.
async fn assert_nothing_tunnelled(backend: &UpgradeBackend, s: &mut TcpStream) {
    assert!(
        read_to_close(s, Duration::from_secs(3)).await.1,
        "the gateway closes the connection after a failed upgrade"
    );
    // Bytes a tunnel would carry arrive within milliseconds; wait well past that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backend.heads().len(), 1, "the request reached the backend");
    let after = backend.after();
    assert!(
        !after.windows(TUNNEL_BYTES.len()).any(|w| w == TUNNEL_BYTES) && after.is_empty(),
        "nothing reached the backend after the request: {:?}",
        String::from_utf8_lossy(&after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_101_without_the_right_accept_is_a_502_and_no_tunnel() {
    for answer in [Answer::WebSocketWrong, Answer::WebSocketMissing] {
        let backend = UpgradeBackend::start(answer).await;
        let gw = Gateway::start(&loopback_config(
            "",
            &service("ws", "/ws/", &[&backend.url], ""),
        ))
        .await;
        let req = upgrade_request("/ws/chat", "websocket", &ws_headers(WS_KEY, "13"));
        let (head, _, mut s) = try_upgrade(gw.port, &req).await;
        assert!(head.starts_with("http/1.1 502"), "{head:?}");
        assert!(head.contains("connection: close"), "{head}");
        assert_nothing_tunnelled(&backend, &mut s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_the_right_accept_tunnels_both_ways() {
    let backend = UpgradeBackend::start(Answer::WebSocketRight).await;
    let gw = Gateway::start(&loopback_config(
        "",
        &service("ws", "/ws/", &[&backend.url], ""),
    ))
    .await;
    let req = upgrade_request("/ws/chat", "websocket", &ws_headers(WS_KEY, "13"));
    let mut s = send(gw.port, req.as_bytes()).await;
    let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 101"), "{head:?}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            websocket_accept(WS_KEY.as_bytes()).to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(rest.is_empty());
    // The backend saw the handshake as the client sent it.
    let heads = backend.heads();
    assert!(heads[0].contains("upgrade: websocket"), "{heads:?}");
    assert!(heads[0].contains("connection: upgrade"), "{heads:?}");
    for round in 0..3 {
        let msg = format!("frame {round}");
        s.write_all(msg.as_bytes())
            .await
            .expect("write through the tunnel");
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(echo, msg.as_bytes());
    }
    let after = String::from_utf8_lossy(&backend.after()).into_owned();
    assert_eq!(after, "frame 0frame 1frame 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_requests_without_a_valid_key_or_version_are_refused() {
    let backend = UpgradeBackend::start(Answer::WebSocketRight).await;
    let gw = Gateway::start(&loopback_config(
        "",
        &service("ws", "/ws/", &[&backend.url], ""),
    ))
    .await;
    let cases = [
        (
            "no key",
            "Sec-WebSocket-Version: 13\r\n".to_string(),
            "Sec-WebSocket-Key",
        ),
        (
            "key of 15 bytes",
            ws_headers("dGhlIHNhbXBsZSBub25jZQ", "13"),
            "Sec-WebSocket-Key",
        ),
        (
            "key not base64",
            ws_headers("not base64 at all!!!!!!!", "13"),
            "Sec-WebSocket-Key",
        ),
        (
            "two keys",
            format!(
                "{}Sec-WebSocket-Key: {WS_KEY}\r\n",
                ws_headers(WS_KEY, "13")
            ),
            "Sec-WebSocket-Key",
        ),
        (
            "version 8",
            ws_headers(WS_KEY, "8"),
            "Sec-WebSocket-Version",
        ),
        (
            "no version",
            format!("Sec-WebSocket-Key: {WS_KEY}\r\n"),
            "Sec-WebSocket-Version",
        ),
    ];
    for (name, extra, reason) in cases {
        let req = upgrade_request("/ws/chat", "websocket", &extra);
        let mut s = send(gw.port, req.as_bytes()).await;
        let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
        assert!(head.starts_with("http/1.1 400"), "{name}: {head:?}");
        let mut body = rest;
        let mut buf = [0u8; 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
        {
            body.extend_from_slice(&buf[..n]);
        }
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(reason), "{name}: {body}");
    }
    assert!(
        backend.heads().is_empty(),
        "no refused handshake reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_route_does_not_allow_goes_upstream_as_an_ordinary_request() {
    // A backend that answers normally: the client gets its ordinary answer.
    let plain = UpgradeBackend::start(Answer::Ordinary).await;
    // A backend that switches anyway: 502, nothing tunnelled.
    let rogue = UpgradeBackend::start(Answer::Switch("foo")).await;
    let services = format!(
        "{}{}",
        service("plain", "/plain/", &[&plain.url], ""),
        service("rogue", "/rogue/", &[&rogue.url], "")
    );
    let gw = Gateway::start(&loopback_config("", &services)).await;

    let mut s = send(gw.port, upgrade_request("/plain/x", "foo", "").as_bytes()).await;
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    let seen = plain.heads();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].contains("upgrade"),
        "no Upgrade and no Connection: upgrade: {seen:?}"
    );

    let (head, _, mut s) = try_upgrade(gw.port, &upgrade_request("/rogue/x", "foo", "")).await;
    assert!(head.starts_with("http/1.1 502"), "{head:?}");
    assert_nothing_tunnelled(&rogue, &mut s).await;
    assert!(!rogue.heads()[0].contains("upgrade"), "{:?}", rogue.heads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_upgrades_on_a_route_lets_another_protocol_through() {
    let foo = UpgradeBackend::start(Answer::Switch("foo")).await;
    let bar = UpgradeBackend::start(Answer::Switch("bar")).await;
    let services = format!(
        "{}{}",
        service("foo", "/foo/", &[&foo.url], "    allowedUpgrades: [foo]\n"),
        service("bar", "/bar/", &[&bar.url], "    allowedUpgrades: [foo]\n")
    );
    let gw = Gateway::start(&loopback_config("", &services)).await;

    let mut s = send(gw.port, upgrade_request("/foo/x", "Foo", "").as_bytes()).await;
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 101"), "{head:?}");
    assert!(head.contains("upgrade: foo"), "{head}");
    assert!(foo.heads()[0].contains("upgrade: foo"), "{:?}", foo.heads());
    s.write_all(b"ping")
        .await
        .expect("write through the tunnel");
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"ping");

    // A 101 naming another protocol than the one asked for: 502, no tunnel.
    let (head, _, mut s) = try_upgrade(gw.port, &upgrade_request("/bar/x", "foo", "")).await;
    assert!(head.starts_with("http/1.1 502"), "{head:?}");
    assert_nothing_tunnelled(&bar, &mut s).await;

    // websocket is not in this route's list: the request goes up without an Upgrade.
    let (head, _, _s) = try_upgrade(
        gw.port,
        &upgrade_request("/foo/ws", "websocket", &ws_headers(WS_KEY, "13")),
    )
    .await;
    assert!(head.starts_with("http/1.1 502"), "{head:?}");
    let heads = foo.heads();
    assert_eq!(heads.len(), 2);
    assert!(!heads[1].contains("upgrade"), "{heads:?}");
}
