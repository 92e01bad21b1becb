//! Host canonicalisation: every spelling of a host reaches its route over HTTP/1 (Host and
//! absolute targets) and HTTP/2 (`:authority` and `host`); invalid hosts are refused.

use super::{h2_raw, h2_request, Capture, H2Outcome, TOP};
use crate::raw::{exchange, header, status};
use crate::support::*;

/// A host-bound admin route beside a public catch-all on the same path: every spelling of the
/// admin host reaches the admin route, over HTTP/1 and HTTP/2, and invalid hosts are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_variants_reach_the_host_bound_route() {
    let admin = Capture::start("admin").await;
    let public = Capture::start("public").await;
    let yaml = format!(
        "{TOP}services:\n  - name: admin\n    path: /\n    hosts: [admin.example.com]\n    backends: [\"{}\"]\n  - name: public\n    path: /\n    backends: [\"{}\"]\n",
        admin.url(),
        public.url()
    );
    let gw = Gateway::start(&yaml).await;
    for host in [
        "admin.example.com",
        "admin.example.com.",
        "ADMIN.EXAMPLE.COM.",
        "admin.example.com.:80",
        "Admin.Example.Com:80",
        "admin.example.com:",
    ] {
        let r = exchange(
            gw.port,
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&r), 200, "Host {host:?}: {r}");
        assert!(r.contains("x-backend: admin"), "Host {host:?} reached {r}");
        let seen = admin.last();
        assert_eq!(header(&seen, "host"), Some("admin.example.com"), "{seen}");
        assert_eq!(
            header(&seen, "x-forwarded-host"),
            Some("admin.example.com"),
            "{seen}"
        );
    }
    // A non-default port stays, canonical; it is the same host for routing.
    let r = exchange(
        gw.port,
        b"GET /x HTTP/1.1\r\nHost: ADMIN.example.com.:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.contains("x-backend: admin"), "{r}");
    assert_eq!(
        header(&admin.last(), "host"),
        Some("admin.example.com:8080")
    );
    // Absolute-form target: the target's authority is canonicalised too, and must agree.
    let r = exchange(
        gw.port,
        b"GET http://ADMIN.example.com./x HTTP/1.1\r\nHost: admin.example.com:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.contains("x-backend: admin"), "{r}");
    let r = exchange(
        gw.port,
        b"GET http://public.example.com/x HTTP/1.1\r\nHost: admin.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");

    let before = admin.heads().len() + public.heads().len();
    let bad: &[&[u8]] = &[
        b"evil@x",
        b"x/y",
        b"x:80:80",
        b"admin.example.com..",
        b"a..b",
        b".admin.example.com",
        b"x:99999",
        b"x:http",
        b"\xc3\xa9.example.com",
        b"[::1",
        b"x%2ey",
        b"",
    ];
    for host in bad {
        let mut raw = b"GET /x HTTP/1.1\r\nHost: ".to_vec();
        raw.extend_from_slice(host);
        raw.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let r = exchange(gw.port, &raw).await;
        assert_eq!(
            status(&r),
            400,
            "Host {:?} must be refused: {r}",
            String::from_utf8_lossy(host)
        );
    }
    assert_eq!(
        admin.heads().len() + public.heads().len(),
        before,
        "a refused host reached a backend"
    );

    // HTTP/2: the same canonical host from :authority, and :authority/host disagreement.
    for authority in [
        "admin.example.com.",
        "ADMIN.EXAMPLE.COM.:80",
        "admin.example.com",
    ] {
        let (code, headers) = h2_request(gw.port, "GET", authority, "/x", &[])
            .await
            .unwrap();
        assert_eq!(code, 200, ":authority {authority}");
        assert_eq!(
            headers.get("x-backend").map(|v| v.to_str().unwrap()),
            Some("admin"),
            ":authority {authority:?} reached the wrong route"
        );
        assert_eq!(header(&admin.last(), "host"), Some("admin.example.com"));
    }
    let (code, headers) = h2_request(
        gw.port,
        "GET",
        "admin.example.com.",
        "/x",
        &[("host", "ADMIN.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "same host, two spellings");
    assert_eq!(headers.get("x-backend").unwrap(), "admin");
    let (code, _) = h2_request(
        gw.port,
        "GET",
        "public.example.com",
        "/x",
        &[("host", "admin.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(code, 400, ":authority and host differ");
    // Bytes no URI type holds, as raw HEADERS frames: refused (400 or a stream reset).
    for authority in [&b"evil@x"[..], b"a..b", b"\xc3\xa9.example.com", b"x:80:80"] {
        let got = h2_raw(
            gw.port,
            &[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/x"),
                (b":authority", authority),
            ],
        )
        .await;
        assert!(
            matches!(
                got,
                H2Outcome::Status(400) | H2Outcome::Reset | H2Outcome::GoAway
            ),
            ":authority {:?} must be refused, got {got:?}",
            String::from_utf8_lossy(authority)
        );
    }
    let got = h2_raw(
        gw.port,
        &[
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/x"),
            (b":authority", b"admin.example.com."),
        ],
    )
    .await;
    assert_eq!(got, H2Outcome::Status(200), "the raw client works");
    assert_eq!(header(&admin.last(), "host"), Some("admin.example.com"));
    assert_eq!(
        admin.heads().len() + public.heads().len(),
        before + 5,
        "only the valid HTTP/2 requests reached a backend"
    );
}
