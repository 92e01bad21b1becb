//! Path normalisation and the escaped-separator policy, for every listener.
//!
//! Normalisation: percent-escapes of unreserved characters are decoded (`/%75sers` is
//! `/users`), other escapes get upper-case hex and stay encoded (`%2f` is never a separator
//! unless the route says `escapedSlashes: decode`), runs of `/` collapse to one, and `.`/`..`
//! segments are resolved (never above the root). A malformed escape is a 400.
//!
//! Escaped separators (`%2F`, `%5C`) and raw backslashes are what let `/public/..%2fprivate`
//! pass a `/public/` route and reach a backend that decodes them; [`scan`] finds them (and
//! refuses `%00` outright), and the route's [`EscapedSlashes`] decides: reject (400, the
//! default), keep (forward as they are), decode (separators before normalisation and routing).

use std::borrow::Cow;

/// What to do with `%2F`, `%5C` and a raw `\` in a request path (`escapedSlashes`).
/// `%00` is refused whatever the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EscapedSlashes {
    /// 400 (the default, as Traefik's encoded-character filter).
    #[default]
    Reject,
    /// Forwarded as they came (for APIs that put `%2F` in ids); never a separator for routing.
    Keep,
    /// Decoded to `/` before normalisation and routing, so they are separators everywhere.
    Decode,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding in path")]
    BadEscape,
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("%00 in path")]
    NulByte,
    #[error("encoded '/' or '\\' (%2F, %5C) or a raw '\\' in path; this route refuses them (escapedSlashes)")]
    EncodedSeparator,
    #[error("ambiguous path: read with its ';' parameters removed or its escaped separators decoded, as some backends do, it reaches another route")]
    Ambiguous,
    #[error("invalid character in the request target (a control, space, '\"', '<', '>', '`' or a byte above 0x7F): percent-encode it")]
    BadByte,
}

/// A byte no request target may hold unescaped, HTTP/1.1 and HTTP/2 alike (RFC 3986 leaves
/// them out; HTTP/1.1's parser refuses most of them, and HTTP/2's `:path` must not let them
/// through to a backend's HTTP/1.1 request line): controls, space, DEL, `"`, `<`, `>`, `` ` ``,
/// and bytes above 0x7F. (`\` is the path policy's, `escapedSlashes`.)
fn bad_target_byte(b: u8) -> bool {
    b <= b' ' || b >= 0x7f || matches!(b, b'"' | b'<' | b'>' | b'`')
}

/// Refuses a query string with a byte no request target may hold (see [`scan`] for the path).
pub fn check_query(query: &str) -> Result<(), PathError> {
    if query.bytes().any(bad_target_byte) {
        Err(PathError::BadByte)
    } else {
        Ok(())
    }
}

/// What a raw path holds that the separator policy cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Escapes {
    /// `%2F`, `%5C` (any case) or a raw `\`.
    pub separators: bool,
}

/// One pass over a raw path: refuses `%00` and bytes no request target may hold, reports
/// escaped separators.
pub fn scan(path: &str) -> Result<Escapes, PathError> {
    let b = path.as_bytes();
    let mut out = Escapes::default();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            c if bad_target_byte(c) => return Err(PathError::BadByte),
            b'\\' => out.separators = true,
            b'%' if i + 2 < b.len() => {
                match (b[i + 1], b[i + 2].to_ascii_uppercase()) {
                    (b'0', b'0') => return Err(PathError::NulByte),
                    (b'2', b'F') | (b'5', b'C') => out.separators = true,
                    _ => {}
                }
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(out)
}

/// A normalised path as servlet containers (Tomcat, Jetty, Spring) read it: each segment's
/// `;parameters` removed, then dot segments resolved again (`/a/..;/b` is `/b` there). None when
/// the path has no `;`.
pub fn without_segment_params(normalised: &str) -> Option<String> {
    let stripped = strip_segment_params(normalised)?;
    // Cannot fail: the input was normal and removing text adds no escapes.
    normalize_path(&stripped).ok().map(|c| c.into_owned())
}

/// A path with each segment's `;parameters` removed and nothing else changed (no
/// normalisation): the first step of a servlet container's reading, before it decodes.
pub fn strip_segment_params(path: &str) -> Option<String> {
    if !path.contains(';') {
        return None;
    }
    let stripped: Vec<&str> = path
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect();
    Some(stripped.join("/"))
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
    normalize(path, false)
}

/// Normalises with `%2F`, `%5C` and `\` read as `/` (`escapedSlashes: decode`).
pub fn normalize_path_decoding_separators(path: &str) -> Result<Cow<'_, str>, PathError> {
    normalize(path, true)
}

fn normalize(path: &str, separators: bool) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let needs_work = b.contains(&b'%')
        || (separators && b.contains(&b'\\'))
        || b.windows(2).any(|w| w == b"//" || w == b"/.");
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
            } else if separators && (v == b'/' || v == b'\\') {
                decoded.push('/');
            } else {
                decoded.push('%');
                decoded.push(b[i + 1].to_ascii_uppercase() as char);
                decoded.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
        } else if separators && b[i] == b'\\' {
            decoded.push('/');
            i += 1;
        } else {
            // `path` is a &str: copy whole multi-byte sequences in order.
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
    fn segment_params() {
        let w = |p: &str| without_segment_params(p);
        assert_eq!(w("/a/b"), None);
        assert_eq!(
            w("/files/private;x/secret").as_deref(),
            Some("/files/private/secret")
        );
        assert_eq!(
            w("/files;/private/secret").as_deref(),
            Some("/files/private/secret")
        );
        assert_eq!(
            w("/files/public/..;/private/s").as_deref(),
            Some("/files/private/s")
        );
        assert_eq!(w("/a;b=c").as_deref(), Some("/a"));
    }

    #[test]
    fn separators() {
        let s = |p: &str| scan(p).map(|e| e.separators);
        assert_eq!(s("/a/b"), Ok(false));
        assert_eq!(s("/a%2fb"), Ok(true));
        assert_eq!(s("/a%2Fb"), Ok(true));
        assert_eq!(s("/a%5cb"), Ok(true));
        assert_eq!(s("/a\\b"), Ok(true));
        assert_eq!(s("/a%00b"), Err(PathError::NulByte));
        assert_eq!(s("/a%2"), Ok(false));
        assert_eq!(s("/a%"), Ok(false));
        let d = |p: &str| normalize_path_decoding_separators(p).map(|c| c.into_owned());
        assert_eq!(
            d("/files/public/..%2fprivate/secret").unwrap(),
            "/files/private/secret"
        );
        assert_eq!(d("/a\\..\\b").unwrap(), "/b");
        assert_eq!(d("/a%5C..%5cb").unwrap(), "/b");
    }
}
