//! The API key file (`apiKeys.file`): a YAML list of keys, each stored as the SHA-256 of the key
//! only, read with the same reader as the config so every problem has its file, line and key.

use crate::keys;
use crate::read::Reader;
use crate::yaml::{Kind, Node};
use crate::ConfigErrors;

/// One key of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyEntry {
    pub id: String,
    pub consumer: String,
    pub plan: Option<String>,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Unix seconds after which the key is refused.
    pub expires: Option<u64>,
    pub scopes: Vec<String>,
    pub line: usize,
}

/// Checks that the plan every key names is `known` (call it when plans are configured: a key
/// naming another plan would be refused at every request). `file` names the list in errors.
pub fn check_plans(
    entries: &[ApiKeyEntry],
    file: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<(), ConfigErrors> {
    let errors: Vec<crate::ConfigError> = entries
        .iter()
        .filter_map(|e| {
            let plan = e.plan.as_deref()?;
            (!known(plan)).then(|| crate::ConfigError {
                file: file.to_string(),
                line: e.line,
                key: "plan".into(),
                message: format!("key {:?} names plan {plan:?}, which is not in plans", e.id),
            })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Parses the key file's text; `file` names it in errors. An empty file is an empty list.
pub fn parse_api_keys(text: &str, file: &str) -> Result<Vec<ApiKeyEntry>, ConfigErrors> {
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(Vec::new());
    }
    let root = crate::parse_yaml(text, file)?;
    let mut r = Reader::new(file);
    let items: &[Node] = match &root.kind {
        Kind::Seq(items) => items,
        _ if root.is_null() => &[],
        _ => {
            r.err(
                root.line,
                "",
                format!(
                    "expected a list of keys (- id: ..., consumer: ..., hash: ...), found a {}",
                    root.type_name()
                ),
            );
            &[]
        }
    };
    let mut out: Vec<ApiKeyEntry> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("[{i}]");
        let f = r.fields(item, &path, keys::API_KEY_ENTRY);
        let id = r.string(&f, "id").unwrap_or_default();
        let consumer = r.string(&f, "consumer").unwrap_or_default();
        for (key, value) in [("id", &id), ("consumer", &consumer)] {
            if value.is_empty() {
                r.err(f.key_line(key), &f.key_path(key), "required");
            } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
                r.err(
                    f.key_line(key),
                    &f.key_path(key),
                    "visible ASCII characters only (it goes upstream in a header)",
                );
            } else if value.len() > 256 {
                // As a JWT's consumer claim: the same consumer whichever credential names it.
                r.err(f.key_line(key), &f.key_path(key), "at most 256 characters");
            }
        }
        let hash = match r.string(&f, "hash") {
            Some(h) => match parse_hash(&h) {
                Some(h) => Some(h),
                None => {
                    r.err(
                        f.key_line("hash"),
                        &f.key_path("hash"),
                        "expected \"sha256:\" and 64 hex digits",
                    );
                    None
                }
            },
            None => {
                r.err(f.line, &f.key_path("hash"), "required");
                None
            }
        };
        let expires = match r.string(&f, "expires") {
            Some(e) => match parse_time(&e) {
                Some(t) => Some(t),
                None => {
                    r.err(
                        f.key_line("expires"),
                        &f.key_path("expires"),
                        format!("{e:?} is not an RFC 3339 time (2027-06-30T00:00:00Z) or a date (2027-06-30)"),
                    );
                    None
                }
            },
            None => None,
        };
        // As `requireScopes`: a scope with a space, a quote or a backslash could never match.
        let scopes = crate::service::read_scopes(&mut r, &f, "scopes");
        let Some(hash) = hash else { continue };
        if let Some(prev) = out.iter().find(|e| e.id == id) {
            r.err(
                f.key_line("id"),
                &f.key_path("id"),
                format!("duplicate id {id:?} (line {})", prev.line),
            );
        }
        if let Some(prev) = out.iter().find(|e| e.hash == hash) {
            r.err(
                f.key_line("hash"),
                &f.key_path("hash"),
                format!("the same key as {:?} (line {})", prev.id, prev.line),
            );
        }
        out.push(ApiKeyEntry {
            id,
            consumer,
            plan: r.string(&f, "plan").filter(|p| !p.is_empty()),
            hash,
            expires,
            scopes,
            line: item.line,
        });
    }
    r.finish(out)
}

/// `sha256:` and 64 hex digits.
fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Unix seconds of an RFC 3339 time with `Z` or a numeric offset (`2027-06-30T00:00:00Z`,
/// fractional seconds allowed), or of a date at midnight UTC (`2027-06-30`).
pub fn parse_time(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, rest) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut d = date.split('-');
    let (y, m, day) = (d.next()?, d.next()?, d.next()?);
    if d.next().is_some() || y.len() != 4 || m.len() != 2 || day.len() != 2 {
        return None;
    }
    let (y, m, day): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, day.parse().ok()?);
    if !(1..=12).contains(&m) || day == 0 || day > days_in_month(y, m) {
        return None;
    }
    let mut secs = days_from_civil(y, m, day) * 86_400;
    if let Some(t) = rest {
        let (clock, offset) = if let Some(c) = t.strip_suffix(['Z', 'z']) {
            (c, 0i64)
        } else {
            let i = t.rfind(['+', '-'])?;
            let (c, o) = t.split_at(i);
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (oh, om) = o[1..].split_once(':')?;
            let (oh, om): (i64, i64) = (oh.parse().ok()?, om.parse().ok()?);
            if oh > 23 || om > 59 {
                return None;
            }
            (c, sign * (oh * 3600 + om * 60))
        };
        let clock = clock.split('.').next()?;
        let mut c = clock.split(':');
        let (h, mi, se) = (c.next()?, c.next()?, c.next()?);
        if c.next().is_some() {
            return None;
        }
        let (h, mi, se): (i64, i64, i64) = (h.parse().ok()?, mi.parse().ok()?, se.parse().ok()?);
        if h > 23 || mi > 59 || se > 60 {
            return None;
        }
        secs += h * 3600 + mi * 60 + se - offset;
    }
    u64::try_from(secs).ok()
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc_3339_or_dates() {
        for (s, want) in [
            ("1970-01-01", Some(0)),
            ("2027-06-30T00:00:00Z", Some(1_814_313_600)),
            ("2027-06-30", Some(1_814_313_600)),
            ("2027-06-30T02:00:00+02:00", Some(1_814_313_600)),
            ("2027-06-29T22:00:00.5-02:00", Some(1_814_313_600)),
            ("2024-02-29T12:00:00Z", Some(1_709_208_000)),
            ("2023-02-29", None),
            ("2027-13-01", None),
            ("2027-06-30T25:00:00Z", None),
            ("2027-06-30T00:00:00", None),
            ("tomorrow", None),
            ("", None),
        ] {
            assert_eq!(parse_time(s), want, "{s:?}");
        }
    }

    #[test]
    fn the_key_file_is_read_with_lines_and_keys() {
        let h = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!("- id: acme-prod-1\n  consumer: acme\n  plan: pro\n  hash: \"{h}\"\n  expires: 2027-06-30T00:00:00Z\n  scopes: [orders:read]\n");
        let keys = parse_api_keys(&text, "k.yaml").expect("valid");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].consumer, "acme");
        assert_eq!(keys[0].plan.as_deref(), Some("pro"));
        assert_eq!(keys[0].hash[0], 0x9f);
        assert_eq!(keys[0].expires, Some(1_814_313_600));
        assert_eq!(keys[0].scopes, ["orders:read"]);
        assert_eq!(parse_api_keys("", "k.yaml").expect("empty"), []);

        let bad = format!("- id: a\n  consumer: c\n  hash: sha256:12\n- id: a\n  consumer: c d\n  hash: \"{h}\"\n  expires: soon\n  secret: x\n");
        let e = parse_api_keys(&bad, "k.yaml").expect_err("invalid").0;
        let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (3, "[0].hash"),
                (5, "[1].consumer"),
                (7, "[1].expires"),
                (8, "[1].secret"),
            ],
            "{e:?}"
        );
        let e = parse_api_keys("key: value\n", "k.yaml")
            .expect_err("not a list")
            .0;
        assert!(e[0].message.contains("expected a list"), "{e:?}");
    }
}
