//! Path normalisation and the compiled route matcher.
//!
//! Matching runs on the normalised path, and the same normalised path goes upstream, so a path
//! trick cannot reach one route through another's prefix. Normalisation: percent-escapes of
//! unreserved characters are decoded (`/%75sers` is `/users`), other escapes get upper-case hex
//! and stay encoded (`%2f` is never a separator), runs of `/` collapse to one, and `.`/`..`
//! segments are resolved (never above the root). A malformed escape is a 400.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::PathType;
use crate::snapshot::ServiceRt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding in path")]
    BadEscape,
    #[error("path must start with '/'")]
    NotAbsolute,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a request path (no query). Borrows when the path is already normal.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let needs_work = b.contains(&b'%') || b.windows(2).any(|w| w == b"//" || w == b"/.");
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    // 1. escapes
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (h, l) = match (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(PathError::BadEscape),
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push(b[i + 1].to_ascii_uppercase() as char);
                decoded.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
        } else {
            // Safe: `path` is a &str and we copy whole multi-byte sequences byte-wise in order.
            let ch_len = utf8_len(b[i]);
            decoded.push_str(&path[i..i + ch_len]);
            i += ch_len;
        }
    }
    // 2. collapse slashes and resolve dot segments
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing || result.is_empty() {
        result.push('/');
    }
    Ok(Cow::Owned(result))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// One route: a path (prefix or exact), optional hosts and methods, and its service.
pub struct Route {
    pub path: String,
    pub path_type: PathType,
    pub hosts: Vec<String>,
    pub methods: Vec<http::Method>,
    pub service: Arc<ServiceRt>,
}

impl Route {
    fn accepts(&self, host: Option<&str>, method: &http::Method) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.hosts.is_empty()
                || host.is_some_and(|h| self.hosts.iter().any(|x| host_matches(x, h))))
    }

    /// Routes with host or method conditions are tried before catch-alls on the same path.
    fn specificity(&self) -> u8 {
        u8::from(!self.hosts.is_empty()) * 2 + u8::from(!self.methods.is_empty())
    }
}

/// `*.example.com` matches one or more labels in front of `example.com`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}

/// Longest-prefix matcher: one hash lookup per distinct prefix length, longest first, so the cost
/// grows with the number of distinct lengths, not the number of routes.
#[derive(Default)]
pub struct Router {
    exact: HashMap<String, Vec<Arc<Route>>>,
    /// (prefix length, prefixes of that length), longest first.
    prefixes: Vec<(usize, HashMap<String, Vec<Arc<Route>>>)>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut r = Router::default();
        let mut by_len: HashMap<usize, HashMap<String, Vec<Arc<Route>>>> = HashMap::new();
        for route in routes {
            let route = Arc::new(route);
            let list = match route.path_type {
                PathType::Exact => r.exact.entry(route.path.clone()).or_default(),
                PathType::Prefix => by_len
                    .entry(route.path.len())
                    .or_default()
                    .entry(route.path.clone())
                    .or_default(),
            };
            list.push(route);
            list.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        }
        r.prefixes = by_len.into_iter().collect();
        r.prefixes.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        r
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// The best route for a normalised path, or None (404).
    pub fn find(
        &self,
        host: Option<&str>,
        method: &http::Method,
        path: &str,
    ) -> Option<&Arc<Route>> {
        if let Some(list) = self.exact.get(path) {
            if let Some(r) = list.iter().find(|r| r.accepts(host, method)) {
                return Some(r);
            }
        }
        for (len, map) in &self.prefixes {
            if *len > path.len() || !path.is_char_boundary(*len) {
                continue;
            }
            if let Some(list) = map.get(&path[..*len]) {
                if let Some(r) = list.iter().find(|r| r.accepts(host, method)) {
                    return Some(r);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/users/1").unwrap(), "/users/1");
        assert_eq!(n("/public/../private/x").unwrap(), "/private/x");
        assert_eq!(n("/%2e%2e/private").unwrap(), "/private");
        assert_eq!(n("/a/%2E%2e/b").unwrap(), "/b");
        assert_eq!(n("/%75sers/").unwrap(), "/users/");
        assert_eq!(n("//users//1").unwrap(), "/users/1");
        assert_eq!(n("/./users/./1").unwrap(), "/users/1");
        assert_eq!(n("/users%2f..%2fadmin").unwrap(), "/users%2F..%2Fadmin");
        assert_eq!(n("/../../etc").unwrap(), "/etc");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/%c0%ae%c0%ae/x").unwrap(), "/%C0%AE%C0%AE/x");
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("x"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn hosts() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("api.example.com", "api.example.com"));
    }
}
