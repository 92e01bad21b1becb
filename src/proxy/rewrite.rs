//! `rewrite`: a regular expression (the `regex` crate: RE2 semantics, linear time) applied to
//! the normalised path after routing; the result is normalised again.
//!
//! The first match is replaced (`Regex::replace`): `$1`, `${1}`, `$name`, `${name}` name
//! captures, `$$` is a `$`. A path the regex does not match goes upstream unchanged. The result
//! must be a path: it is normalised as routing normalises (escapes, `//`, `.` and `..`), and one
//! that is empty, does not start with `/` or cannot be normalised is a 500, logged with the
//! service, the rewrite and the result, and never forwarded.

use std::borrow::Cow;

use crate::rules::path;

/// A route's rewrite, compiled by the compile step.
#[derive(Debug, Clone)]
pub struct RewriteRt {
    pub regex: regex::Regex,
    pub replacement: String,
}

/// A capture reference in a replacement, as `regex` reads it.
enum CapRef<'a> {
    Number(usize),
    Named(&'a str),
}

/// A piece of a replacement: a capture reference (with the text it was written as), or
/// literal text.
enum Part<'a> {
    Ref(CapRef<'a>, &'a str),
    Literal(&'a str),
}

/// The capture references of `replacement` (and `$$` skipped), exactly as the `regex` crate's
/// interpolation reads them: `$name` takes the longest run of `[_0-9A-Za-z]` (so `$1a` is the
/// group named `1a`), `${name}` anything up to `}`, and a `$` that starts neither is literal.
fn scan<'a>(replacement: &'a str, mut each: impl FnMut(Part<'a>)) {
    let mut rest = replacement;
    while let Some(i) = rest.find('$') {
        each(Part::Literal(&rest[..i]));
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            each(Part::Literal("$"));
            rest = tail;
            continue;
        }
        let (name, written, tail) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], &rest[i..i + end + 3], &braced[end + 1..]),
                None => {
                    each(Part::Literal("$"));
                    rest = after;
                    continue;
                }
            }
        } else {
            let end = after
                .bytes()
                .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))
                .unwrap_or(after.len());
            if end == 0 {
                each(Part::Literal("$"));
                rest = after;
                continue;
            }
            (&after[..end], &rest[i..i + 1 + end], &after[end..])
        };
        let r = match name.parse::<usize>() {
            Ok(n) => CapRef::Number(n),
            Err(_) => CapRef::Named(name),
        };
        each(Part::Ref(r, written));
        rest = tail;
    }
    each(Part::Literal(rest));
}

/// Whether a byte may appear as written in a path (RFC 3986 `pchar` and `/`; `%` starts an
/// escape, checked when the result is normalised).
fn path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b)
}

/// The first `%` escape in `text` that no path may hold: not two hex digits, or `%00`. (A
/// literal that ends in the middle of an escape, `%` before a capture, is left to the check of
/// each result.)
fn bad_escape(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = b[i..].iter().position(|c| *c == b'%') {
        let at = i + off;
        let digits = b.get(at + 1..at + 3);
        match digits {
            Some(b"00") => return Some("%00".into()),
            Some(d) if d.iter().all(u8::is_ascii_hexdigit) => {}
            Some(_) => return Some(String::from_utf8_lossy(&b[at..(at + 3).min(b.len())]).into()),
            None => {}
        }
        i = at + 1;
    }
    None
}

impl RewriteRt {
    /// Compiles `regex`; the replacement's capture references must name groups it has, and its
    /// own text must be path characters (no `?` or `#`: the request's query is kept as it is).
    pub fn compile(regex: &str, replacement: &str) -> Result<RewriteRt, String> {
        let regex = regex::Regex::new(regex).map_err(|e| e.to_string())?;
        let mut problems: Vec<String> = Vec::new();
        let groups = regex.captures_len();
        scan(replacement, |part| {
            match part {
            Part::Ref(CapRef::Number(n), written) if n >= groups => problems.push(format!(
                "replacement {replacement:?}: {written} names group {n}, and the regex has {} (write $$ for a literal $)",
                match groups - 1 {
                    0 => "no groups".to_string(),
                    1 => "1 group".to_string(),
                    g => format!("{g} groups"),
                }
            )),
            Part::Ref(CapRef::Named(name), written)
                if !regex.capture_names().flatten().any(|n| n == name) =>
            {
                let hint = match name.find(|c: char| !c.is_ascii_digit()) {
                    Some(i) if i > 0 => format!(
                        " ({written} reads as the group named {name:?}: write ${{{}}}{})",
                        &name[..i],
                        &name[i..]
                    ),
                    _ => " (write $$ for a literal $)".to_string(),
                };
                problems.push(format!(
                    "replacement {replacement:?}: the regex has no group named {name:?}{hint}"
                ));
            }
            Part::Ref(..) => {}
            Part::Literal(text) => {
                if let Some(b) = text.bytes().find(|b| !path_byte(*b)) {
                    problems.push(format!(
                        "replacement {replacement:?}: {:?} cannot appear in a path (the query string is kept as it came; escape other characters as %XX)",
                        char::from(b).to_string()
                    ));
                } else if let Some(bad) = bad_escape(text) {
                    // Every request the rewrite matched would be a 500: refused at load.
                    problems.push(format!(
                        "replacement {replacement:?}: {bad:?} is not a path escape (%XX with two hex digits, never %00)"
                    ));
                }
            }
        }
        });
        if let Some(p) = problems.into_iter().next() {
            return Err(p);
        }
        Ok(RewriteRt {
            regex,
            replacement: replacement.to_string(),
        })
    }

    /// The rewritten, normalised path for `path` (itself normalised); `path` itself when the
    /// regex does not match. Err: the result, which is not a path, and why (for the log).
    pub fn apply<'p>(&self, path: &'p str) -> Result<Cow<'p, str>, (String, String)> {
        let replaced = self.regex.replace(path, self.replacement.as_str());
        let Cow::Owned(out) = replaced else {
            return Ok(Cow::Borrowed(path)); // no match
        };
        let problem = if out.is_empty() {
            "empty".to_string()
        } else if !out.starts_with('/') {
            "does not start with '/'".to_string()
        } else if let Some(b) = out.bytes().find(|b| b.is_ascii() && !path_byte(*b)) {
            // (Bytes beyond ASCII come from the request's own path, through a capture: the
            // request line decides on those, as it did for the request.)
            format!("{:?} cannot appear in a path", char::from(b).to_string())
        } else {
            match path::scan(&out).and_then(|_| path::normalize_path(&out)) {
                Ok(Cow::Borrowed(_)) => return Ok(Cow::Owned(out)),
                Ok(Cow::Owned(n)) => return Ok(Cow::Owned(n)),
                Err(e) => e.to_string(),
            }
        };
        Err((out, problem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(re: &str, rep: &str) -> RewriteRt {
        RewriteRt::compile(re, rep).unwrap_or_else(|e| panic!("{re} → {rep}: {e}"))
    }

    #[test]
    fn captures_numbered_and_named() {
        let r = rw("^/web/v1/(.*)$", "/v2/$1");
        assert_eq!(r.apply("/web/v1/users/7").unwrap(), "/v2/users/7");
        let r = rw("^/u/(?P<id>[0-9]+)/(?<rest>.*)$", "/users/${id}/x-$rest");
        assert_eq!(r.apply("/u/42/a/b").unwrap(), "/users/42/x-a/b");
        let r = rw("^/a/([a-z]+)", "/b/${1}z$$");
        assert_eq!(r.apply("/a/cd/e").unwrap(), "/b/cdz$/e");
        assert_eq!(r.apply("/nomatch").unwrap(), "/nomatch");
    }

    #[test]
    fn only_the_first_match_is_replaced() {
        let r = rw("x", "y");
        assert_eq!(r.apply("/x/x/x").unwrap(), "/y/x/x");
    }

    #[test]
    fn results_are_normalised_or_refused() {
        let r = rw("^/old/(.*)$", "/new/../admin/$1");
        assert_eq!(r.apply("/old/x").unwrap(), "/admin/x");
        let r = rw("^/old/(.*)$", "/a//$1/./%7e");
        assert_eq!(r.apply("/old/x").unwrap(), "/a/x/~");
        let r = rw("^/old/(.*)$", "$1");
        assert_eq!(r.apply("/old/x").unwrap_err().0, "x");
        let r = rw("^/old/.*$", "");
        assert_eq!(r.apply("/old/x").unwrap_err().1, "empty");
        let r = rw("^/old/(.*)$", "/$1");
        assert!(r.apply("/old/%C3%A9").is_ok(), "escapes kept");
        let r = rw("^/old/(.*)$", "/%$1");
        assert!(r.apply("/old/zz").is_err(), "malformed escape");
        let r = rw("^/old/(.*)$", "/%0$1");
        assert!(r.apply("/old/0").is_err(), "%00");
    }

    #[test]
    fn bad_references_are_refused() {
        for (re, rep, want) in [
            (
                "^/(a)/(b)$",
                "/$3",
                "names group 3, and the regex has 2 groups",
            ),
            ("^/a$", "/$1", "has no groups"),
            ("^/(?P<id>a)$", "/${nope}", "no group named \"nope\""),
            ("^/(a)$", "/$1a", "write ${1}a"),
            ("^/(a)$", "/$1?x=1", "\"?\" cannot appear in a path"),
            ("^/(a)$", "/$1 b", "\" \" cannot appear"),
            ("^/(a)$", "/x#y", "\"#\" cannot appear"),
            ("^/(a)$", "/${1", "\"{\" cannot appear"),
            ("^/(a)$", "/x%00/$1", "\"%00\" is not a path escape"),
            ("^/(a)$", "/x%zz/$1", "\"%zz\" is not a path escape"),
        ] {
            let e = RewriteRt::compile(re, rep).unwrap_err();
            assert!(e.contains(want), "{re} → {rep}: {e}");
        }
        assert!(RewriteRt::compile("^/(a", "/x").is_err());
        for ok in [
            "/$$1",
            "/${1}a",
            "/$",
            "/$0",
            "/a$-b",
            "/a%2Fb/$1",
            "/%41$1",
        ] {
            rw("^/(a)$", ok);
        }
    }
}
