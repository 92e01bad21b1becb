//! Header fields: names with underscores, two Authorization fields, and the count and size
//! limits at their documented values, over HTTP/1 and HTTP/2.

use super::{h2_request, Capture, TOP};
use crate::raw::{exchange, header, status};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_names_never_reach_a_backend_by_default() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    // The CGI desync: Transfer_Encoding beside Content-Length, with a second request in the body.
    let body = "0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nX_Consumer_Id: admin\r\nTransfer_Encoding: chunked\r\nX-Ok: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = exchange(gw.port, raw.as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    let seen = b.last();
    assert!(seen.starts_with("POST /a "), "{seen}");
    for line in seen.lines().skip(1) {
        let name = line.split(':').next().unwrap_or("");
        assert!(!name.contains('_'), "{name} reached the backend:\n{seen}");
    }
    assert_eq!(header(&seen, "x-ok"), Some("1"));
    assert_eq!(b.heads().len(), 1, "the body was read as a second request");

    // HTTP/2 goes through the same policy.
    let (code, _) = h2_request(gw.port, "GET", "x", "/h2", &[("x_consumer_id", "admin")])
        .await
        .unwrap();
    assert_eq!(code, 200);
    let seen = b.last();
    assert!(seen.starts_with("GET /h2 "), "{seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("x_consumer_id"),
        "{seen}"
    );

    // Two Authorization fields: 400 on both protocols, nothing forwarded.
    let n = b.heads().len();
    let r = exchange(
        gw.port,
        b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(
        r.contains("Authorization"),
        "the reason names the header: {r}"
    );
    let (code, _) = h2_request(
        gw.port,
        "GET",
        "x",
        "/a",
        &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
    )
    .await
    .unwrap();
    assert_eq!(code, 400);
    assert_eq!(b.heads().len(), n, "a refused request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_policy_reject_and_allow() {
    let b = Capture::start("b").await;
    let svc = format!(
        "services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let raw = b"GET /a HTTP/1.1\r\nHost: x\r\nX_Thing: 1\r\nConnection: close\r\n\r\n";
    let gw = Gateway::start(&format!("{TOP}underscoreHeaders: reject\n{svc}")).await;
    let r = exchange(gw.port, raw).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(b.heads().is_empty());
    drop(gw);
    let gw = Gateway::start(&format!("{TOP}underscoreHeaders: allow\n{svc}")).await;
    let r = exchange(gw.port, raw).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&b.last(), "x_thing"), Some("1"));
}

// ---------------------------------------------------------------------------------------------
// Header limits at their documented values

fn with_fields(count: usize, value_len: usize) -> Vec<u8> {
    // `Host: x` is one field; `count` more follow.
    let mut raw = b"GET /a HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..count {
        raw.extend_from_slice(format!("x-f{i:04}: {}\r\n", "v".repeat(value_len)).as_bytes());
    }
    raw.extend_from_slice(b"Connection: close\r\n\r\n");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_count_and_size_hold_at_their_values() {
    let b = Capture::start("b").await;
    let svc = format!(
        "services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&format!("{TOP}{svc}")).await;
    // Default maxHeaderCount 100: Host + Connection + 98 = 100 fields pass, 101 do not.
    assert_eq!(status(&exchange(gw.port, &with_fields(98, 1)).await), 200);
    assert_eq!(status(&exchange(gw.port, &with_fields(99, 1)).await), 431);
    let (code, _) = h2_request(
        gw.port,
        "GET",
        "x",
        "/a",
        &(0..101).map(|_| ("x-f", "v")).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(code, 431, "HTTP/2: 101 fields");
    // Default maxHeaderSize 64k, each field counted as name + value + 4 bytes:
    // Host (4+1+4) + Connection (10+5+4) + 60 fields of (7 + v + 4).
    let budget = 64 * 1024 - 9 - 19;
    let per = budget / 60 - 11;
    let raw = with_fields(60, per);
    assert_eq!(status(&exchange(gw.port, &raw).await), 200, "at the limit");
    // The same limit on HTTP/2, each field counted the same way (name + value + 4).
    let value = "v".repeat(per);
    let names: Vec<String> = (0..60).map(|i| format!("x-f{i:04}")).collect();
    let mut fields: Vec<(&str, &str)> =
        names.iter().map(|n| (n.as_str(), value.as_str())).collect();
    // Host (as :authority) and Connection are not there: make up their 28 bytes in one field.
    let pad = "p".repeat(28 - 4 - 5);
    fields.push(("x-pad", &pad));
    let (code, _) = h2_request(gw.port, "GET", "x", "/a", &fields)
        .await
        .unwrap();
    assert_eq!(code, 200, "HTTP/2 at the limit");
    let bigger = "v".repeat(per + 1 + (budget % 60));
    let fields: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), bigger.as_str()))
        .collect();
    let (code, _) = h2_request(gw.port, "GET", "x", "/a", &fields)
        .await
        .unwrap();
    assert_eq!(code, 431, "HTTP/2 just over the limit");
    // 114,681 bytes got through before; now anything over 64k of fields is 431.
    let over = with_fields(60, per + 1 + (budget % 60));
    let r = exchange(gw.port, &over).await;
    assert_eq!(
        status(&r),
        431,
        "just over the limit: {}",
        &r[..r.len().min(200)]
    );
    let big = with_fields(50, 2290); // ~114 KB
    assert_eq!(status(&exchange(gw.port, &big).await), 431);
    drop(gw);

    // A configured count: 150.
    let gw = Gateway::start(&format!("{TOP}maxHeaderCount: 150\n{svc}")).await;
    assert_eq!(status(&exchange(gw.port, &with_fields(148, 1)).await), 200);
    assert_eq!(status(&exchange(gw.port, &with_fields(149, 1)).await), 431);
}
