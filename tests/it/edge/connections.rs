//! Connections that say nothing: a silent or half-sent HTTP/1 or HTTP/2 connection is closed
//! after one header read timeout, an idle HTTP/2 one after the idle timeout, and a stalled
//! HTTP/2 stream does not hold its connection while a streaming response does.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Capture, TOP};
use crate::raw::{connect, frame, h2_send, time_to_close, RawServer};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_one_header_read_timeout() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}timeouts: {{headerRead: 1s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    for (what, first, after) in [
        ("nothing", &b""[..], 0),
        ("half a preface", b"PRI * HT", 0),
        ("half a head", b"GET / HT", 0),
        // A first byte late in the budget does not buy a second headerRead.
        ("a late half head", b"G", 900),
        (
            "an HTTP/2 preface and SETTINGS, then nothing",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            0,
        ),
    ] {
        let t = Instant::now();
        let mut s = connect(gw.port).await;
        tokio::time::sleep(Duration::from_millis(after)).await;
        s.write_all(first).await.unwrap();
        // A 408 may come first.
        let closed = time_to_close(&mut s, Duration::from_secs(4)).await;
        assert!(closed.is_some(), "{what}: still open after 4 s");
        let held = t.elapsed();
        assert!(
            held < Duration::from_millis(1600),
            "{what}: held for {held:?}, headerRead is 1s"
        );
    }
}

/// An HTTP/2 connection with no stream open for `timeouts.idle` is closed (GOAWAY), even when
/// the client keeps answering pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}timeouts: {{headerRead: 1s, idle: 2s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let tcp = connect(gw.port).await;
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get("http://x/a").body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let t = Instant::now();
    // The h2 client answers pings by itself; the gateway must still close the connection.
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(
        ended.is_ok(),
        "still open 6 s after the last stream (idle is 2s)"
    );
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_millis(4500),
        "closed after {held:?}, idle is 2s"
    );
}

/// A backend that streams its body: `n` chunks, one every `gap`.
async fn streaming_backend(n: usize, gap: Duration) -> RawServer {
    RawServer::start(move |mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            )
            .await;
        for _ in 0..n {
            tokio::time::sleep(gap).await;
            if s.write_all(b"5\r\nchunk\r\n").await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    })
    .await
}

/// The HTTP/2 idle timer counts a response still sending as activity (a long stream is not cut),
/// and a stream the client stalls (zero flow-control window) as none: that connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_idle_spares_streaming_responses_and_closes_stalled_ones() {
    let backend = streaming_backend(8, Duration::from_millis(400)).await;
    let yaml = format!(
        "{TOP}timeouts: {{headerRead: 1s, idle: 1s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        backend.url
    );
    let gw = Gateway::start(&yaml).await;
    // 8 chunks over 3.2 s, with idle 1 s: the whole body arrives.
    let tcp = connect(gw.port).await;
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(http::Request::get("http://x/s").body(()).unwrap(), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), body.data())
        .await
        .expect("the stream stalled")
    {
        let chunk = chunk.expect("the stream was cut");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"chunk".repeat(8), "the whole streamed body");
    // And the connection was not told to go away meanwhile: it takes another request.
    let mut client = client.ready().await.expect("no GOAWAY during the stream");
    let (resp, _) = client
        .send_request(http::Request::get("http://x/s").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.expect("a second stream").status(), 200);

    // A client that never opens its flow-control window: the response cannot move, and the
    // connection is closed after idle (GOAWAY) plus one more idle, not held forever.
    let mut s = h2_send(
        gw.port,
        &[0x00, 0x04, 0, 0, 0, 0], // SETTINGS_INITIAL_WINDOW_SIZE = 0
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/s"),
            (":authority", "x"),
        ],
    )
    .await;
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                // Answer pings (type 6) so the client looks alive.
                if n >= 9 && buf[3] == 0x6 && buf[4] & 1 == 0 {
                    let mut pong = Vec::new();
                    frame(&mut pong, 0x6, 0x1, 0, &buf[9..17.min(n)]);
                    let _ = s.write_all(&pong).await;
                }
            }
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "a stalled stream held its connection for 6 s with idle 1s"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    drop(backend);
}
