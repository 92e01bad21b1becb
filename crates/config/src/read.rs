//! Typed reads from the YAML tree that collect every problem (file, line, key) instead of stopping
//! at the first, and reject unknown keys with a "did you mean" hint.

use std::time::Duration;

use super::keys::{self, KeyDecl};
use super::yaml::{Kind, Node};
use super::{duration, ConfigError};

/// Collects errors while the raw tree is read into typed config.
pub struct Reader {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

/// A mapping whose keys have been checked against their declarations.
pub struct Fields<'n> {
    pub path: String,
    pub line: usize,
    entries: &'n [(String, usize, Node)],
    decls: &'static [KeyDecl],
}

impl<'n> Fields<'n> {
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, n)| k == key && !n.is_null())
            .map(|(_, _, n)| n)
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn key_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The declared kind of `key`. A key read without a declaration is a bug (debug builds
    /// panic); release builds read it as text.
    pub fn kind(&self, key: &str) -> keys::Kind {
        match keys::find(self.decls, key) {
            Some(d) => d.kind,
            None => {
                debug_assert!(false, "{} is not declared", self.key_path(key));
                keys::Kind::String
            }
        }
    }

    pub fn key_line(&self, key: &str) -> usize {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, l, _)| *l)
            .unwrap_or(self.line)
    }
}

pub use crate::keys::join;

/// A name of a service or plan: letters, digits, `-`, `_`, `.`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A [`keys::Kind::Switch`] as given: the bare `true`/`false`, or the mapping's fields.
pub enum Switched<'n> {
    Bool(bool),
    Block(Fields<'n>),
}

impl Reader {
    pub fn new(file: &str) -> Self {
        Reader {
            file: file.to_string(),
            errors: Vec::new(),
        }
    }

    /// `value` when nothing was wrong, else every problem in line order.
    pub fn finish<T>(mut self, value: T) -> Result<T, crate::ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            self.errors.sort_by_key(|e| e.line);
            Err(crate::ConfigErrors(self.errors))
        }
    }

    pub fn err(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Checks that `node` is a mapping with only the declared keys and no duplicates.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        decls: &'static [KeyDecl],
    ) -> Fields<'n> {
        let allowed = keys::names(decls);
        let Kind::Map(entries) = &node.kind else {
            if !node.is_null() {
                self.err(
                    node.line,
                    path,
                    format!("expected a mapping, found a {}", node.type_name()),
                );
            }
            return Fields {
                path: path.to_string(),
                line: node.line,
                entries: &[],
                decls,
            };
        };
        for (i, (k, line, _)) in entries.iter().enumerate() {
            if !allowed.contains(&k.as_str()) {
                let hint = match suggest(k, &allowed) {
                    Some(s) => format!(" (did you mean \"{s}\"?)"),
                    None => format!(" (allowed keys: {})", allowed.join(", ")),
                };
                self.err(*line, &join(path, k), format!("unknown key \"{k}\"{hint}"));
            } else if entries[..i].iter().any(|(k2, _, _)| k2 == k) {
                self.err(*line, &join(path, k), "duplicate key");
            }
        }
        Fields {
            path: path.to_string(),
            line: node.line,
            entries,
            decls,
        }
    }

    fn scalar<'n>(&mut self, node: &'n Node, path: &str, want: &str) -> Option<(&'n str, bool)> {
        match &node.kind {
            Kind::Scalar { value, quoted } => Some((value.as_str(), *quoted)),
            _ => {
                self.err(
                    node.line,
                    path,
                    format!("expected {want}, found a {}", node.type_name()),
                );
                None
            }
        }
    }

    pub fn string(&mut self, f: &Fields, key: &str) -> Option<String> {
        let node = f.get(key)?;
        let path = f.key_path(key);
        self.scalar(node, &path, "a string")
            .map(|(s, _)| s.to_string())
    }

    pub fn bool(&mut self, f: &Fields, key: &str) -> Option<bool> {
        let node = f.get(key)?;
        let path = f.key_path(key);
        let (s, quoted) = self.scalar(node, &path, "true or false")?;
        match (s, quoted) {
            ("true" | "True" | "TRUE", false) => Some(true),
            ("false" | "False" | "FALSE", false) => Some(false),
            _ => {
                self.err(
                    node.line,
                    &path,
                    format!("expected true or false, found {s:?}"),
                );
                None
            }
        }
    }

    /// A switch (`true`/`false`) or its mapping, with the keys its declaration gives.
    pub fn switch<'n>(&mut self, f: &Fields<'n>, key: &str) -> Option<Switched<'n>> {
        let children = match f.kind(key) {
            keys::Kind::Switch(children) => children,
            other => {
                debug_assert!(false, "{} is declared {other:?}", f.key_path(key));
                &[]
            }
        };
        let node = f.get(key)?;
        let path = f.key_path(key);
        match &node.kind {
            Kind::Map(_) => Some(Switched::Block(self.fields(node, &path, children))),
            Kind::Scalar { value, quoted } => match (value.as_str(), *quoted) {
                ("true" | "True" | "TRUE", false) => Some(Switched::Bool(true)),
                ("false" | "False" | "FALSE", false) => Some(Switched::Bool(false)),
                (s, _) => {
                    self.err(
                        node.line,
                        &path,
                        format!("expected true, false or a mapping, found {s:?}"),
                    );
                    None
                }
            },
            _ => {
                self.err(
                    node.line,
                    &path,
                    format!(
                        "expected true, false or a mapping, found a {}",
                        node.type_name()
                    ),
                );
                None
            }
        }
    }

    /// An unsigned integer in its declared range; quoted digits are accepted too (the seed
    /// quotes ports).
    pub fn uint(&mut self, f: &Fields, key: &str) -> Option<u64> {
        let (min, max) = match f.kind(key) {
            keys::Kind::Int { min, max } => (min, max),
            keys::Kind::Port => (0, 65535),
            other => {
                debug_assert!(false, "{} is declared {other:?}", f.key_path(key));
                (0, u64::MAX)
            }
        };
        let node = f.get(key)?;
        let path = f.key_path(key);
        let (s, _) = self.scalar(node, &path, "a whole number")?;
        match s.trim().parse::<u64>() {
            Ok(v) if v >= min && v <= max => Some(v),
            Ok(v) => {
                self.err(
                    node.line,
                    &path,
                    format!("{v} is out of range ({min}..={max})"),
                );
                None
            }
            Err(_) => {
                self.err(
                    node.line,
                    &path,
                    format!("expected a whole number, found {s:?}"),
                );
                None
            }
        }
    }

    /// A number above its declared minimum.
    pub fn float(&mut self, f: &Fields, key: &str) -> Option<f64> {
        let (min_exclusive, fraction) = match f.kind(key) {
            keys::Kind::Number { min_exclusive } => (min_exclusive, false),
            keys::Kind::Fraction => (f64::NAN, true),
            other => {
                debug_assert!(false, "{} is declared {other:?}", f.key_path(key));
                (f64::MIN, false)
            }
        };
        let node = f.get(key)?;
        let path = f.key_path(key);
        let (s, _) = self.scalar(node, &path, "a number")?;
        match s.trim().parse::<f64>() {
            Ok(v) if fraction && (0.0..=1.0).contains(&v) => Some(v),
            Ok(v) if fraction => {
                self.err(node.line, &path, format!("{v} must be from 0 to 1"));
                None
            }
            Ok(v) if v.is_finite() && v > min_exclusive => Some(v),
            Ok(v) => {
                self.err(
                    node.line,
                    &path,
                    format!("{v} must be greater than {min_exclusive}"),
                );
                None
            }
            Err(_) => {
                self.err(node.line, &path, format!("expected a number, found {s:?}"));
                None
            }
        }
    }

    /// A port given as "8000" or 8000.
    pub fn port(&mut self, f: &Fields, key: &str) -> Option<u16> {
        self.uint(f, key).map(|v| v as u16)
    }

    /// A duration: a Go duration string, or a bare integer meaning seconds.
    pub fn duration(&mut self, f: &Fields, key: &str) -> Option<Duration> {
        let node = f.get(key)?;
        let path = f.key_path(key);
        let (s, _) = self.scalar(node, &path, "a duration such as \"30s\"")?;
        if let Ok(secs) = s.trim().parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        match duration::parse(s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(node.line, &path, e);
                None
            }
        }
    }

    /// A byte size: an integer, or a number with k/m/g suffix (binary units, e.g. "10m", "64k").
    pub fn size(&mut self, f: &Fields, key: &str) -> Option<u64> {
        let node = f.get(key)?;
        let path = f.key_path(key);
        let (s, _) = self.scalar(node, &path, "a size such as \"10m\"")?;
        match parse_size(s) {
            Some(v) => Some(v),
            None => {
                self.err(
                    node.line,
                    &path,
                    format!("invalid size {s:?} (use bytes, or a number with k, m or g)"),
                );
                None
            }
        }
    }

    pub fn list<'n>(&mut self, f: &Fields<'n>, key: &str) -> Option<&'n [Node]> {
        let node = f.get(key)?;
        match &node.kind {
            Kind::Seq(items) => Some(items),
            _ => {
                self.err(
                    node.line,
                    &f.key_path(key),
                    format!("expected a list, found a {}", node.type_name()),
                );
                None
            }
        }
    }

    pub fn string_list(&mut self, f: &Fields, key: &str) -> Option<Vec<(String, usize)>> {
        let items = self.list(f, key)?;
        let path = f.key_path(key);
        let mut out = Vec::with_capacity(items.len());
        for (i, n) in items.iter().enumerate() {
            if let Some((s, _)) = self.scalar(n, &format!("{path}[{i}]"), "a string") {
                out.push((s.to_string(), n.line));
            }
        }
        Some(out)
    }

    /// A string-to-string mapping (e.g. forwardClaims).
    pub fn string_map(&mut self, f: &Fields, key: &str) -> Option<Vec<(String, String)>> {
        let node = f.get(key)?;
        let path = f.key_path(key);
        let Kind::Map(entries) = &node.kind else {
            self.err(
                node.line,
                &path,
                format!("expected a mapping, found a {}", node.type_name()),
            );
            return None;
        };
        let mut out = Vec::new();
        for (k, _, v) in entries {
            if let Some((s, _)) = self.scalar(v, &join(&path, k), "a string") {
                out.push((k.clone(), s.to_string()));
            }
        }
        Some(out)
    }

    /// One of the words declared for `key`.
    pub fn choice(&mut self, f: &Fields, key: &str) -> Option<String> {
        let options = match f.kind(key) {
            keys::Kind::Enum(words) => words,
            other => {
                debug_assert!(false, "{} is declared {other:?}", f.key_path(key));
                &[]
            }
        };
        let node = f.get(key)?;
        let s = self.string(f, key)?;
        if options.contains(&s.as_str()) {
            Some(s)
        } else {
            let hint = match suggest(&s, options) {
                Some(h) => format!(" (did you mean \"{h}\"?)"),
                None => String::new(),
            };
            self.err(
                node.line,
                &f.key_path(key),
                format!("must be one of {}, found {s:?}{hint}", options.join(", ")),
            );
            None
        }
    }
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1024),
        (i, 'm' | 'M') => (&s[..i], 1024 * 1024),
        (i, 'g' | 'G') => (&s[..i], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// The allowed word closest to `word` (edit distance at most 2, or a case-insensitive match).
pub fn suggest<'a>(word: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let lw = word.to_ascii_lowercase();
    allowed
        .iter()
        .map(|a| (levenshtein(&lw, &a.to_ascii_lowercase()), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("gatewayport", &["gatewayPort", "adminPort"]),
            Some("gatewayPort")
        );
        assert_eq!(suggest("backend", &["backends", "path"]), Some("backends"));
        assert_eq!(suggest("zzzzzz", &["backends", "path"]), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10m"), Some(10 * 1024 * 1024));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("x"), None);
    }
}
