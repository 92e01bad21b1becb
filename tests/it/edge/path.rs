//! Paths: the escaped-separator policy, and readings of a path (segment parameters, decoded
//! separators) that would reach another route.

use super::{h2_request, Capture, TOP};
use crate::raw::{exchange, status};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_separators_are_refused_by_default_and_kept_or_decoded_on_request() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}services:\n  - name: public\n    path: /files/public/\n    backends: [\"{u}\"]\n  - name: ids\n    path: /ids/\n    escapedSlashes: keep\n    backends: [\"{u}\"]\n  - name: dec\n    path: /dec/public/\n    escapedSlashes: decode\n    backends: [\"{u}\"]\n  - name: decroot\n    path: /dec/\n    escapedSlashes: decode\n    backends: [\"{u}\"]\n  - name: other\n    path: /other/\n    backends: [\"{u}\"]\n",
        u = b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for path in [
        "/files/public/..%2fprivate/secret",
        "/files/public/..%2Fprivate/secret",
        "/files/public/..%5cprivate/secret",
        "/files/public/..%5Cprivate/secret",
        "/files/public/a%00b",
        "/ids/a%00b",
    ] {
        let r = exchange(gw.port, get(path).as_bytes()).await;
        assert_eq!(status(&r), 400, "{path}: {r}");
    }
    // A raw backslash: refused by the HTTP parser or by the policy, never forwarded.
    let r = exchange(gw.port, get("/files/public/..\\private/secret").as_bytes()).await;
    assert_eq!(status(&r), 400, "raw backslash: {r}");
    assert!(
        b.heads().is_empty(),
        "a refused path reached the backend: {:?}",
        b.heads()
    );

    // keep: forwarded as it came (upper-case hex), routed as one segment.
    let r = exchange(gw.port, get("/ids/org%2fteam/1").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        b.last().starts_with("GET /ids/org%2Fteam/1 "),
        "{}",
        b.last()
    );

    // decode: separators before routing; the decoded path goes upstream.
    let r = exchange(gw.port, get("/dec/public/..%2fprivate/secret").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        b.last().starts_with("GET /dec/private/secret "),
        "{}",
        b.last()
    );
    // decoding may not carry a request onto a route that refuses separators.
    let r = exchange(gw.port, get("/dec/public/..%2f..%2fother/x").as_bytes()).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(!b.last().contains("/other/"), "{}", b.last());
}

/// A path must route the same however the backend reads it: with `;` segment parameters removed
/// (Tomcat, Jetty, Spring) or, on a `keep` route, with its escaped separators decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_readings_that_reach_another_route_are_refused() {
    let private = Capture::start("private").await;
    let public = Capture::start("public").await;
    let yaml = format!(
        "{TOP}services:\n  - name: private\n    path: /files/private/\n    backends: [\"{p}\"]\n  - name: public\n    path: /\n    backends: [\"{u}\"]\n  - name: ids\n    path: /k/\n    escapedSlashes: keep\n    backends: [\"{u}\"]\n",
        p = private.url(),
        u = public.url()
    );
    let gw = Gateway::start(&yaml).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for path in [
        "/files/private;x/secret",
        "/files;/private/secret",
        "/files/public/..;/private/secret",
        "/files/public/..;x=1/private/secret",
        "/k/..%2f..%2ffiles/private/secret",
        "/k/..%2F..%2Ffiles;a/private/secret",
        // Parameters removed before separators are decoded (Tomcat's order).
        "/k/z;%2Fw/..%2F..%2Ffiles/private/secret",
    ] {
        let r = exchange(gw.port, get(path).as_bytes()).await;
        assert_eq!(status(&r), 400, "{path}: {r}");
        assert!(r.contains("ambiguous path"), "{path}: {r}");
    }
    assert!(private.heads().is_empty() && public.heads().is_empty());
    // Parameters that do not change the route are fine.
    for (path, to) in [
        ("/files/private/a;v=1", "private"),
        ("/files/public;v=1/a", "public"),
        ("/k/org%2fteam;v=2", "public"),
    ] {
        let r = exchange(gw.port, get(path).as_bytes()).await;
        assert_eq!(status(&r), 200, "{path}: {r}");
        assert!(r.contains(&format!("x-backend: {to}")), "{path}: {r}");
    }
    // HTTP/2 goes through the same rule.
    let (code, _) = h2_request(gw.port, "GET", "x", "/files/private;x/secret", &[])
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(
        private.heads().len() == 1,
        "only the legitimate request reached private"
    );
}

/// Bytes no request target may hold are refused in the path and the query alike, over HTTP/1.1
/// and HTTP/2 (whose `:path` the HTTP/1.1 parser never sees), and never reach a backend; the
/// characters HTTP/1.1 lets through (`{}|^[]`) pass over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_target_bytes_are_judged_alike_over_http1_and_http2() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}services:\n  - name: a\n    path: /a/\n    backends: [\"{u}\"]\n",
        u = b.url()
    );
    let gw = Gateway::start(&yaml).await;
    for (target, want) in [
        ("/a/x\"y", 400),
        ("/a/x<y", 400),
        ("/a/x`y", 400),
        ("/a/x?q=\"1\"", 400),
        ("/a/x?q=<1>", 400),
        ("/a/x{y}|z^", 200),
        ("/a/x?q[]={1}|2", 200),
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = exchange(gw.port, raw.as_bytes()).await;
        assert_eq!(status(&r), want, "HTTP/1.1 {target}: {r}");
        let h2 = super::h2_raw(
            gw.port,
            &[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"x"),
                (b":path", target.as_bytes()),
            ],
        )
        .await;
        // Refused over HTTP/2 with a 400, or a stream reset where the HTTP/2 layer refuses the
        // `:path` itself (it never becomes a request); either way never forwarded.
        if want == 400 {
            assert!(
                matches!(h2, super::H2Outcome::Status(400) | super::H2Outcome::Reset),
                "HTTP/2 {target}: {h2:?}"
            );
        } else {
            assert_eq!(h2, super::H2Outcome::Status(want), "HTTP/2 {target}");
        }
    }
    // Bytes above 0x7F: HTTP/2 only (an HTTP/1.1 request line is refused by its parser).
    let h2 = super::h2_raw(
        gw.port,
        &[
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"x"),
            (b":path", "/a/é".as_bytes()),
        ],
    )
    .await;
    assert!(
        matches!(h2, super::H2Outcome::Status(400) | super::H2Outcome::Reset),
        "HTTP/2 non-ASCII path: {h2:?}"
    );
    assert!(
        b.heads()
            .iter()
            .all(|h| !h.contains('"') && !h.contains('<') && !h.contains('`')),
        "{:?}",
        b.heads()
    );
}
