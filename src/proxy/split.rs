//! `split`: a route's weighted pools (canary releases). A request whose headers or cookies
//! match a split goes there (the first matching split, in config order); the others are spread
//! by weight over the splits with a weight above 0. Each split's pool has its own health and
//! balancing.
//!
//! The weighted choice is a random draw per request (`fastrand`, a thread-local generator):
//! no state is shared between the worker threads, so nothing is locked or contended on the
//! request path, and over n requests a split of weight share p gets n·p ± a few √(n·p(1-p)).
//! A smooth weighted round robin would be exact over each cycle, but only with a shared cursor
//! (a lock or a compare-and-swap loop across workers) or one per worker, which is exact per
//! worker only; neither is worth it for traffic shares of whole percents.

use std::sync::Arc;

use http::{header, HeaderMap};

use crate::config::SplitMatch;
use crate::metrics::CodeCounts;
use crate::upstream::Pool;

/// One split of a route.
pub struct SplitRt {
    pub name: String,
    pub weight: u32,
    pub matches: SplitMatch,
    pub pool: Arc<Pool>,
    /// `hexgate_split_requests_total` of this split, by code.
    pub metrics: Arc<CodeCounts>,
}

/// The pool a request goes to, with the split's index (None: the route's own pool).
/// `pool`: the route's own, for a route without splits.
pub fn choose(
    splits: &[SplitRt],
    pool: &Arc<Pool>,
    headers: &HeaderMap,
) -> (Arc<Pool>, Option<usize>) {
    if splits.is_empty() {
        return (pool.clone(), None);
    }
    let i = pick(splits, headers, fastrand::u64);
    (splits[i].pool.clone(), Some(i))
}

/// The split for a request: the first whose match it meets, else a draw by weight (`draw`
/// gives a number in a range). The config guarantees at least one split with a weight.
fn pick(
    splits: &[SplitRt],
    headers: &HeaderMap,
    draw: impl FnOnce(std::ops::Range<u64>) -> u64,
) -> usize {
    if let Some(i) = splits
        .iter()
        .position(|s| !s.matches.is_empty() && matches(&s.matches, headers))
    {
        return i;
    }
    let total: u64 = splits.iter().map(|s| u64::from(s.weight)).sum();
    if total == 0 {
        return 0;
    }
    let mut at = draw(0..total);
    for (i, s) in splits.iter().enumerate() {
        let w = u64::from(s.weight);
        if at < w {
            return i;
        }
        at -= w;
    }
    0
}

/// Whether every header and cookie of `m` has exactly its value. A header with several fields
/// matches if one of them is the value; cookies are read from every `Cookie` field (HTTP/2
/// clients send one per cookie).
pub fn matches(m: &SplitMatch, headers: &HeaderMap) -> bool {
    m.headers.iter().all(|(name, want)| {
        headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.as_bytes() == want.as_bytes())
    }) && m
        .cookies
        .iter()
        .all(|(name, want)| cookie(headers, name).is_some_and(|v| v == want.as_bytes()))
}

/// The value of cookie `name` in the request's `Cookie` fields (`a=1; b=2`, RFC 6265 5.4),
/// without the double quotes a value may be wrapped in; the first one if it is sent twice.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for field in headers.get_all(header::COOKIE) {
        for pair in field.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name.as_bytes() {
                continue;
            }
            let v = pair[eq + 1..].trim_ascii();
            let v = match v {
                [b'"', inner @ .., b'"'] => inner,
                v => v,
            };
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendAddr, LoadBalancing, Scheme};
    use http::HeaderValue;

    fn split(
        name: &str,
        weight: u32,
        headers: &[(&str, &str)],
        cookies: &[(&str, &str)],
    ) -> SplitRt {
        let own = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        SplitRt {
            name: name.into(),
            weight,
            matches: SplitMatch {
                headers: own(headers),
                cookies: own(cookies),
            },
            pool: Arc::new(Pool::new(
                vec![Arc::new(crate::upstream::Backend::new(BackendAddr {
                    scheme: Scheme::Http,
                    host: "127.0.0.1".into(),
                    port: 1,
                }))],
                LoadBalancing::RoundRobin,
            )),
            metrics: Arc::new(CodeCounts::default()),
        }
    }

    fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn canary() -> Vec<SplitRt> {
        vec![
            split("stable", 90, &[], &[]),
            split("canary", 10, &[("x-canary", "1")], &[("beta", "yes")]),
            split("dark", 0, &[("x-dark", "1")], &[]),
        ]
    }

    #[test]
    fn the_draw_follows_the_weights_exactly_over_every_value() {
        let splits = canary();
        let none = HeaderMap::new();
        let mut counts = [0usize; 3];
        for d in 0..100 {
            counts[pick(&splits, &none, |r| {
                assert_eq!(r, 0..100);
                d
            })] += 1;
        }
        assert_eq!(counts, [90, 10, 0], "a weight of 0 gets nothing unmatched");
    }

    #[test]
    fn random_draws_stay_within_five_sigma() {
        let splits = canary();
        let none = HeaderMap::new();
        let n = 20_000usize;
        let canaries = (0..n)
            .filter(|_| pick(&splits, &none, fastrand::u64) == 1)
            .count();
        let (mean, sd) = (n as f64 * 0.1, (n as f64 * 0.1 * 0.9).sqrt());
        assert!(
            (canaries as f64 - mean).abs() < 5.0 * sd,
            "{canaries} of {n}"
        );
    }

    #[test]
    fn a_match_needs_every_header_and_cookie() {
        let splits = canary();
        let never = |_: std::ops::Range<u64>| 0;
        // Both the header and the cookie: the canary, whatever the draw.
        let both = hdrs(&[("x-canary", "1"), ("cookie", "a=1; beta=yes; c=3")]);
        assert_eq!(pick(&splits, &both, never), 1);
        // Only one of them: no match, the draw decides.
        assert_eq!(pick(&splits, &hdrs(&[("x-canary", "1")]), never), 0);
        assert_eq!(
            pick(
                &splits,
                &hdrs(&[("x-canary", "2"), ("cookie", "beta=yes")]),
                never
            ),
            0
        );
        // A split with weight 0 still takes its matches.
        assert_eq!(pick(&splits, &hdrs(&[("x-dark", "1")]), never), 2);
        // The first matching split in config order wins.
        let two = vec![
            split("a", 1, &[("x-v", "1")], &[]),
            split("b", 1, &[("x-v", "1")], &[]),
        ];
        assert_eq!(pick(&two, &hdrs(&[("x-v", "1")]), |_| 1), 0);
    }

    #[test]
    fn cookies_are_parsed_as_pairs_over_every_field() {
        let h = hdrs(&[
            ("cookie", "session=abc;theme=dark"),
            ("cookie", " beta = \"yes\" ; other=1"),
        ]);
        assert_eq!(cookie(&h, "session"), Some(&b"abc"[..]));
        assert_eq!(cookie(&h, "theme"), Some(&b"dark"[..]));
        assert_eq!(cookie(&h, "beta"), Some(&b"yes"[..]));
        assert_eq!(cookie(&h, "other"), Some(&b"1"[..]));
        assert_eq!(cookie(&h, "sess"), None, "names are whole");
        assert_eq!(cookie(&hdrs(&[("cookie", "xbeta=yes")]), "beta"), None);
        assert_eq!(cookie(&hdrs(&[("cookie", "beta")]), "beta"), None);
        assert_eq!(
            cookie(&hdrs(&[("cookie", "beta=")]), "beta"),
            Some(&b""[..])
        );
        // A value is compared whole.
        let m = SplitMatch {
            headers: vec![],
            cookies: vec![("beta".into(), "yes".into())],
        };
        assert!(!matches(&m, &hdrs(&[("cookie", "beta=yesno")])));
        assert!(matches(&m, &h));
    }
}
