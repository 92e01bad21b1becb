//! Host canonicalisation: the one form of a request's host used for routing, host conditions,
//! the HTTP/1 Host/target check, the HTTP/2 `:authority`/`host` check, `X-Forwarded-Host` and
//! the Host sent upstream.
//!
//! Canonical form: ASCII lower-case, one trailing dot removed, the scheme's default port
//! removed, an IPv6 literal re-written in its shortest form. Anything that is not an RFC 3986
//! `host[:port]` is refused: userinfo (`evil@x`), paths (`x/y`), two ports (`x:80:80`), bytes
//! outside ASCII, empty labels (`a..b`, `.a`, `a..`), an empty host, a port above 65535.
//! Registered names are limited to letters, digits, `-`, `_` and `.` (what DNS and /etc/hosts
//! names use); percent-escapes and sub-delimiters in a host are refused, as no backend's
//! virtual-host matching would read them the same way we do.

use std::net::Ipv6Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host is not a valid host[:port]")]
    Invalid,
    #[error("host has an empty label")]
    EmptyLabel,
    #[error("bad port in host")]
    BadPort,
    #[error("Host header does not match the request target")]
    Mismatch,
}

/// A canonical `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// `host[:port]`, port only when it is not the scheme's default.
    full: String,
    /// Length of the host part of `full` (IPv6 literals keep their brackets).
    host_len: usize,
}

impl Authority {
    /// The host without port (IPv6 in brackets), for matching routes.
    pub fn host(&self) -> &str {
        &self.full[..self.host_len]
    }

    /// `host[:port]` as sent upstream in Host and X-Forwarded-Host.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn into_string(self) -> String {
        self.full
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Canonicalises a registered name or IPv4 address (no port): lower-case, one trailing dot
/// removed, every label non-empty. Also used for route `hosts` in the config (where a leading
/// `*.` is allowed and handled by the caller).
pub fn canonical_name(raw: &[u8]) -> Result<String, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() {
        return Err(HostError::EmptyLabel);
    }
    if name.len() > 253 {
        return Err(HostError::Invalid);
    }
    for label in name.split(|b| *b == b'.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if !label.iter().all(|b| is_name_byte(*b)) {
            return Err(HostError::Invalid);
        }
    }
    // Only ASCII bytes got here; room for a port too, so `canonicalize` appends in place.
    let mut out = String::with_capacity(name.len() + 6);
    out.extend(name.iter().map(|b| b.to_ascii_lowercase() as char));
    Ok(out)
}

/// Canonicalises a Host header value or an HTTP/2 `:authority`. `default_port` is the scheme's
/// (80 for http, 443 for https); it is removed.
pub fn canonicalize(raw: &[u8], default_port: u16) -> Result<Authority, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    let (host, port): (String, Option<&[u8]>) = if raw[0] == b'[' {
        let close = raw
            .iter()
            .position(|b| *b == b']')
            .ok_or(HostError::Invalid)?;
        let inner = std::str::from_utf8(&raw[1..close]).map_err(|_| HostError::Invalid)?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| HostError::Invalid)?;
        let rest = &raw[close + 1..];
        let port = match rest {
            [] => None,
            [b':', p @ ..] => Some(p),
            _ => return Err(HostError::Invalid),
        };
        (format!("[{ip}]"), port)
    } else {
        let (name, port) = match raw.iter().position(|b| *b == b':') {
            Some(i) => (&raw[..i], Some(&raw[i + 1..])),
            None => (raw, None),
        };
        (canonical_name(name)?, port)
    };
    let port = match port {
        // RFC 3986 3.2.3: an empty port is the same as none.
        None | Some([]) => None,
        Some(p) => {
            if p.len() > 5 || !p.iter().all(u8::is_ascii_digit) {
                return Err(HostError::BadPort);
            }
            let n: u32 = p.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'));
            if n == 0 || n > 65535 {
                return Err(HostError::BadPort);
            }
            (n != u32::from(default_port)).then_some(n)
        }
    };
    let host_len = host.len();
    let mut full = host;
    if let Some(p) = port {
        use std::fmt::Write as _;
        let _ = write!(full, ":{p}");
    }
    Ok(Authority { full, host_len })
}

/// The scheme's default port.
pub fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

/// `*.example.com` matches one or more labels in front of `example.com`; otherwise equality.
/// Both sides are canonical.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Result<String, HostError> {
        canonicalize(s.as_bytes(), 80).map(Authority::into_string)
    }

    #[test]
    fn variants_collapse() {
        for v in [
            "admin.example.com",
            "admin.example.com.",
            "ADMIN.EXAMPLE.COM.",
            "admin.example.com.:80",
            "Admin.Example.Com:80",
            "admin.example.com:",
        ] {
            assert_eq!(c(v).as_deref(), Ok("admin.example.com"), "{v}");
        }
        assert_eq!(c("a.example.com:8080").as_deref(), Ok("a.example.com:8080"));
        assert_eq!(
            canonicalize(b"a.example.com:443", 443).map(Authority::into_string),
            Ok("a.example.com".into())
        );
        assert_eq!(c("[0:0::1]:80").as_deref(), Ok("[::1]"));
        assert_eq!(c("[::1]:8000").unwrap(), "[::1]:8000");
        assert_eq!(canonicalize(b"[::1]:8000", 80).unwrap().host(), "[::1]");
    }

    #[test]
    fn refusals() {
        for v in [
            "",
            "evil@x",
            "x/y",
            "x:80:80",
            "a..b",
            ".a",
            "a..",
            ".",
            "x:y",
            "x:0",
            "x:65536",
            "x:123456",
            "[::1",
            "[::1]x",
            "[zz]",
            "h\u{e9}.com",
            "a b",
            "a%2eb",
            "x?y",
            "x#y",
            "x\\y",
        ] {
            assert!(c(v).is_err(), "{v:?} should be refused");
        }
        assert!(canonicalize(b"a\xffb", 80).is_err());
    }

    #[test]
    fn wildcards() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("api.example.com", "api.example.com"));
    }
}
