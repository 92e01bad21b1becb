//! Connections to the admin listener: slow and half-sent requests are cut off by
//! `timeouts.headerRead`, connections beyond the cap wait in the backlog, one address holds at
//! most 32 connections, the header limits hold, and a flood of unauthenticated keep-alive
//! connections leaves the token's scrapes answered.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{admin_get, config, TOKEN};
use crate::raw::*;
use crate::support::*;

/// Two authenticated GET /metrics on one keep-alive connection from `src`, each answered 200
/// within two seconds, the connection left open.
async fn scrape_twice(src: [u8; 4], port: u16, token: &str, when: &str) {
    let mut s = connect_from(src, port).await.unwrap();
    for i in 1..=2 {
        let sent = Instant::now();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("scrape {i} from {src:?} {when}: write failed: {e}"));
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("scrape {i} from {src:?} {when}: no answer within 2s"));
        eprintln!(
            "scrape {i} from {src:?} {when} answered in {:?}",
            sent.elapsed()
        );
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.body.contains("hexgate_open_connections"), "{}", r.body);
        assert_eq!(r.header("connection"), None, "{}", r.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_silent_admin_connections_are_closed_after_header_read() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("timeouts: {headerRead: 1s, idle: 3s}\n", &b.url());
    let gw = Gateway::start(&yaml).await;

    // Half a request head, never finished.
    let mut half = send(
        gw.admin_port,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
    )
    .await;
    // Nothing at all.
    let mut silent = connect(gw.admin_port).await;
    // A slowloris: one byte every 300 ms keeps it busy but never finishes the head.
    let mut drip = send(gw.admin_port, b"GET /healthz HTTP/1.1\r\n").await;
    let dripper = tokio::spawn(async move {
        let start = Instant::now();
        for _ in 0..30 {
            if drip.write_all(b"X").await.is_err() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        None
    });

    // Both timed from here, concurrently (they were opened just before).
    let limit = Duration::from_secs(6);
    let (half_closed, silent_closed) = tokio::join!(
        time_to_close(&mut half, limit),
        time_to_close(&mut silent, limit)
    );
    eprintln!("half-sent closed after {half_closed:?}, silent after {silent_closed:?}");
    let half_closed = half_closed.expect("half-sent admin request still open after 6s");
    let silent_closed = silent_closed.expect("silent admin connection still open after 6s");
    // The header read timeout closed them, not something immediate.
    assert!(half_closed >= Duration::from_millis(800), "{half_closed:?}");
    assert!(half_closed <= Duration::from_secs(4), "{half_closed:?}");
    assert!(
        silent_closed >= Duration::from_millis(800),
        "{silent_closed:?}"
    );
    assert!(silent_closed <= Duration::from_secs(4), "{silent_closed:?}");
    let dripped = dripper.await.unwrap();
    assert!(
        dripped.is_some_and(|d| d <= Duration::from_secs(5)),
        "a slowloris on the admin port was not cut off: {dripped:?}"
    );

    // A keep-alive connection idle after a complete request is closed after `timeouts.idle`
    // (3s here), not after headerRead (1s).
    let mut ka = send(
        gw.admin_port,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), ka.read(&mut buf))
        .await
        .expect("answer on the keep-alive connection")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle_closed = time_to_close(&mut ka, Duration::from_secs(8)).await;
    eprintln!("idle keep-alive closed after {idle_closed:?}");
    let idle_closed = idle_closed.expect("idle admin keep-alive connection still open after 8s");
    assert!(
        idle_closed >= Duration::from_millis(2500),
        "{idle_closed:?}"
    );
    assert!(idle_closed <= Duration::from_secs(6), "{idle_closed:?}");

    // Still serving.
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_beyond_the_cap_wait_in_the_backlog() {
    const CAP: usize = hexgate::admin::MAX_CONNECTIONS;
    assert_eq!(CAP, 256, "the cap the README documents");
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("timeouts: {headerRead: 3s}\n", &b.url());
    let gw = Gateway::start(&yaml).await;

    // CAP half-sent requests hold every admin connection slot until headerRead (3s); one
    // address holds at most MAX_CONNECTIONS_PER_PEER, so they come from 127.0.0.2, .3, ...
    const PER_PEER: usize = hexgate::admin::MAX_CONNECTIONS_PER_PEER;
    let opened = Instant::now();
    let mut holders = Vec::with_capacity(CAP);
    for i in 0..CAP {
        let src = [127, 0, 0, 2 + u8::try_from(i / PER_PEER).unwrap()];
        let mut s = connect_from(src, gw.admin_port).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        holders.push(s);
    }
    // Let the gateway accept all of them.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One more: the kernel completes the handshake (backlog), but the gateway does not accept
    // it while the cap is reached, so its complete request gets no answer...
    let mut extra = connect_from([127, 0, 0, 200], gw.admin_port).await.unwrap();
    let sent = Instant::now();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    // Watched until 2s after the first holder opened (their header read timeout is 3s).
    let watch = Duration::from_secs(2).saturating_sub(opened.elapsed());
    assert!(
        watch >= Duration::from_millis(500),
        "opening the holders took too long"
    );
    let early = tokio::time::timeout(watch, extra.read_to_end(&mut out)).await;
    assert!(
        early.is_err() && out.is_empty(),
        "connection {} was served while {CAP} others held every slot: {:?}",
        CAP + 1,
        String::from_utf8_lossy(&out)
    );
    // ...until the holders' header read timeout frees slots; then it is served.
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut out))
        .await
        .expect("the waiting admin connection was never served")
        .unwrap();
    let waited = sent.elapsed();
    let since_open = opened.elapsed();
    eprintln!(
        "connection {} answered {waited:?} after its request ({since_open:?} after the holders opened)",
        CAP + 1
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        since_open >= Duration::from_millis(2500),
        "served before the holders' header read timeout: {since_open:?}"
    );

    // Every holder was closed by the header read timeout.
    let mut still_open = 0;
    for s in holders.iter_mut() {
        if time_to_close(s, Duration::from_secs(3)).await.is_none() {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "holders still open after headerRead");
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_header_limits_hold() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("maxHeaderCount: 10\nmaxHeaderSize: 2k\n", &b.url());
    let gw = Gateway::start(&yaml).await;
    let with_fields = |n: usize, value_len: usize| {
        // Host and Connection, then n - 2 more.
        let mut req =
            String::from("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for i in 0..n - 2 {
            req.push_str(&format!("X-F{i}: {}\r\n", "v".repeat(value_len)));
        }
        req.push_str("\r\n");
        req
    };
    // Exactly maxHeaderCount fields pass; one more is 431.
    let ok = raw_request(gw.admin_port, with_fields(10, 1).as_bytes()).await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    let many = raw_request(gw.admin_port, with_fields(11, 1).as_bytes()).await;
    assert_eq!(many.status, 431, "{}", many.head);
    // Fields over maxHeaderSize (2 KiB, under hyper's 8 KiB buffer): 431 from the policy.
    let big = raw_request(gw.admin_port, with_fields(3, 3000).as_bytes()).await;
    assert_eq!(big.status, 431, "{}", big.head);
    assert!(big.body.contains("maxHeaderSize"), "{}", big.body);
    // Over the buffer itself: 431 from hyper, connection closed.
    let huge = raw_request(gw.admin_port, with_fields(3, 20_000).as_bytes()).await;
    assert_eq!(huge.status, 431, "{}", huge.head);
    // Two Authorization fields: which one would be checked? Refused.
    let two = raw_request(
        gw.admin_port,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(two.status, 400, "{}", two.head);
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_keep_alive_flood_from_one_address_leaves_metrics_answered() {
    // The reported attack: with adminToken set, 256 connections from one address each send
    // GET /healthz and stay keep-alive (re-sending every 10s); Prometheus's scrapes with the
    // token then got no answer for seconds.
    const ATTACKERS: usize = 256;
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
        &format!("adminToken: \"{TOKEN}\"\ntimeouts: {{headerRead: 20s, idle: 60s}}\n"),
        &b.url(),
    );
    let gw = Gateway::start(&yaml).await;

    let opened = Instant::now();
    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        let mut s = connect(gw.admin_port).await;
        // A write can fail when the server already closed it (over the per-peer cap).
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        attackers.push(s);
    }
    eprintln!("{ATTACKERS} attackers opened in {:?}", opened.elapsed());

    // During the attack, Prometheus on another address is answered on one kept connection.
    scrape_twice([127, 0, 0, 2], gw.admin_port, TOKEN, "during the attack").await;

    // The server ended every attacker connection itself (the attackers still hold their
    // sockets and send nothing more): each was answered with `connection: close` and closed,
    // or closed without a response over the per-peer cap. Within 5s of opening: far less
    // than headerRead (20s) and idle (60s).
    let deadline = opened + Duration::from_secs(5);
    let (mut answered, mut refused) = (0, 0);
    for (i, s) in attackers.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (out, closed) = read_to_close(s, left).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            closed,
            "attacker {i} still open 5s after the flood began; got {text:?}"
        );
        if out.is_empty() {
            refused += 1;
        } else {
            answered += 1;
            assert!(text.starts_with("HTTP/1.1 200"), "attacker {i}: {text}");
            assert!(
                text.to_ascii_lowercase()
                    .contains("\r\nconnection: close\r\n"),
                "attacker {i} answered without connection: close: {text}"
            );
        }
    }
    eprintln!("attackers: {answered} answered and closed, {refused} closed unanswered");
    assert!(answered >= 1, "no attacker request was answered at all");

    // And the attackers' own address is not locked out either.
    scrape_twice([127, 0, 0, 1], gw.admin_port, TOKEN, "after the attack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_32_admin_connections() {
    const PER_PEER: usize = hexgate::admin::MAX_CONNECTIONS_PER_PEER;
    assert_eq!(PER_PEER, 32, "the cap the README documents");
    const OPENED: usize = 40;
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("timeouts: {headerRead: 4s}\n", &b.url());
    let gw = Gateway::start(&yaml).await;

    // 40 half-sent heads from 127.0.0.1; each watched until the server closes it.
    let opened = Instant::now();
    let mut watchers = Vec::with_capacity(OPENED);
    for _ in 0..OPENED {
        let mut s = connect(gw.admin_port).await;
        // May fail if the server already closed it.
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await;
        watchers.push(tokio::spawn(async move {
            let left = Duration::from_secs(10).saturating_sub(opened.elapsed());
            let (got, closed) = read_to_close(&mut s, left).await;
            (closed.then(|| opened.elapsed()), got.len())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // While 127.0.0.1 holds its 32: one more from it is closed at once, without an answer...
    let mut more = connect(gw.admin_port).await;
    let _ = more
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), more.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "connection {} from 127.0.0.1 was neither served nor closed",
        OPENED + 1
    );
    assert!(
        out.is_empty(),
        "connection {} from 127.0.0.1 was served over the per-peer cap: {:?}",
        OPENED + 1,
        String::from_utf8_lossy(&out)
    );
    // ...and another address is served as usual.
    let mut other = connect_from([127, 0, 0, 2], gw.admin_port).await.unwrap();
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let r = read_one(&mut other, Duration::from_secs(2))
        .await
        .expect("127.0.0.2 not served while 127.0.0.1 is at its cap");
    assert_eq!(r.status, 200, "{}", r.head);
    let checked = opened.elapsed();
    assert!(
        checked < Duration::from_millis(3500),
        "checks ran past headerRead: {checked:?}"
    );

    // 8 were closed within a second, without a byte; the other 32 were held until headerRead.
    let mut prompt = 0;
    let mut held = Vec::new();
    for w in watchers {
        let (closed, got) = w.await.unwrap();
        let closed = closed.expect("a half-sent connection still open 10s after opening");
        if closed < Duration::from_secs(1) {
            assert_eq!(got, 0, "a connection over the cap got a response");
            prompt += 1;
        } else {
            held.push(closed);
        }
    }
    eprintln!("{prompt} closed at once; held ones closed after {held:?}");
    assert!(
        held.len() <= PER_PEER,
        "{} connections from one address held",
        held.len()
    );
    assert_eq!(held.len(), PER_PEER, "fewer than the cap were held");
    assert_eq!(prompt, OPENED - PER_PEER);
    for t in &held {
        assert!(
            *t >= Duration::from_millis(3500) && *t <= Duration::from_secs(8),
            "a held connection closed after {t:?}, not by headerRead (4s)"
        );
    }

    // Their slots were given back: 127.0.0.1 is served again.
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}
