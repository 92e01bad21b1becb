//! The README's config reference, rendered from the key declarations. The tables live in
//! README.md between [`START`] and [`END`]; a test fails when they differ from [`markdown`], and
//! `HEXGATE_BLESS=1 cargo test -p hexgate-config readme` rewrites them.

use crate::keys::{self, DefaultValue, KeyDecl, Kind};
use crate::read::join;

/// The line that opens the generated region of README.md.
pub const START: &str = "<!-- config-reference:start -->";
/// The line that closes it.
pub const END: &str = "<!-- config-reference:end -->";

/// The command that regenerates the README's tables.
pub const REGENERATE: &str = "HEXGATE_BLESS=1 cargo test -p hexgate-config readme";

/// The reference tables in Markdown: the top level, then `services[]`.
pub fn markdown() -> String {
    let mut out = format!(
        "<!-- Generated from crates/config/src/keys.rs; edit there and run `{REGENERATE}`. -->\n\n"
    );
    let mut seen = Vec::new();
    out.push_str("### Top level\n\n");
    table(&mut out, keys::TOP, &mut seen);
    out.push_str("\n### `services[]`\n\n");
    table(&mut out, keys::SERVICE, &mut seen);
    out
}

/// `readme` with the text between [`START`] and [`END`] replaced by [`markdown`].
pub fn splice(readme: &str) -> Result<String, String> {
    let (before, _, after) = region(readme)?;
    Ok(format!("{before}{}{after}", markdown()))
}

/// `readme` split around the generated region: (up to and including the START line, the region,
/// from the END line on).
pub fn region(readme: &str) -> Result<(&str, &str, &str), String> {
    let start = readme
        .find(START)
        .ok_or_else(|| format!("no {START} line"))?;
    let body = start
        + START.len()
        + readme[start + START.len()..]
            .find('\n')
            .map_or(0, |i| i + 1);
    let end = readme[body..]
        .find(END)
        .map(|i| body + i)
        .ok_or_else(|| format!("no {END} line after {START}"))?;
    Ok((&readme[..body], &readme[body..end], &readme[end..]))
}

fn table(out: &mut String, decls: &'static [KeyDecl], seen: &mut Vec<*const KeyDecl>) {
    out.push_str("| key | type | default | meaning |\n| --- | --- | --- | --- |\n");
    rows(out, "", decls, seen);
}

/// One row per key, a block's keys after it; a block shared with an earlier table (per-service
/// `rateLimiting`) gets its own row only, its keys being listed there.
fn rows(out: &mut String, prefix: &str, decls: &'static [KeyDecl], seen: &mut Vec<*const KeyDecl>) {
    for d in decls {
        let path = join(prefix, d.name);
        match d.kind {
            Kind::Block(children) => {
                if !d.doc.is_empty() {
                    row(out, &path, d);
                }
                if !seen.iter().any(|s| std::ptr::eq(*s, children.as_ptr())) {
                    seen.push(children.as_ptr());
                    rows(out, &path, children, seen);
                }
            }
            // A switch with settings (`accessLog`): its own row, then its keys.
            Kind::Switch(children) => {
                row(out, &path, d);
                rows(out, &path, children, seen);
            }
            // A list of blocks inside a table (`split[]`); `services[]` has its own table.
            Kind::Blocks(children) if !std::ptr::eq(children.as_ptr(), keys::SERVICE.as_ptr()) => {
                row(out, &path, d);
                rows(out, &format!("{path}[]"), children, seen);
            }
            Kind::Named(children) => {
                row(out, &path, d);
                rows(out, &format!("{path}.NAME"), children, seen);
            }
            _ => row(out, &path, d),
        }
    }
}

fn row(out: &mut String, path: &str, d: &KeyDecl) {
    let default = if d.required {
        "required".to_string()
    } else {
        match d.default {
            DefaultValue::None => "none".to_string(),
            DefaultValue::Value(v) => format!("`{v}`"),
            DefaultValue::Text(t) => t.to_string(),
        }
    };
    let cell = |s: &str| s.replace('|', "\\|");
    out.push_str(&format!(
        "| `{path}` | {} | {} | {} |\n",
        cell(&d.kind.describe()),
        cell(&default),
        cell(d.doc)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README.md's reference tables are the ones the declarations give.
    #[test]
    fn readme_reference_matches_the_declarations() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, current, _) = region(&text).unwrap_or_else(|e| {
            panic!("README.md: {e}: put the reference tables between {START} and {END}")
        });
        let want = markdown();
        if current == want {
            return;
        }
        if std::env::var("HEXGATE_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(&path, splice(&text).unwrap()).unwrap();
            return;
        }
        let first = current
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "the lengths differ".to_string(),
                |i| {
                    format!(
                        "first difference in the region's line {}:\n  README: {}\n  wanted: {}",
                        i + 1,
                        current.lines().nth(i).unwrap_or(""),
                        want.lines().nth(i).unwrap_or("")
                    )
                },
            );
        panic!(
            "README.md's config reference is out of date with crates/config/src/keys.rs ({first}).\nRegenerate it with: {REGENERATE}"
        );
    }

    #[test]
    fn readme_region_is_found_and_spliced() {
        let text = format!("intro\n{START}\nold\n{END}\noutro\n");
        let (before, mid, after) = region(&text).unwrap();
        assert_eq!(before, format!("intro\n{START}\n"));
        assert_eq!(mid, "old\n");
        assert_eq!(after, format!("{END}\noutro\n"));
        let new = splice(&text).unwrap();
        assert!(new.starts_with(&format!("intro\n{START}\n<!-- Generated")));
        assert!(new.ends_with(&format!("{END}\noutro\n")));
        assert!(region("no markers").is_err());
    }

    #[test]
    fn every_key_has_a_row_or_is_a_block_without_one() {
        let md = markdown();
        for (path, d) in keys::all() {
            let shown = path
                .strip_prefix("services[].")
                .unwrap_or(&path)
                .to_string();
            if matches!(d.kind, Kind::Block(_)) && d.doc.is_empty() {
                continue;
            }
            // Per-service rateLimiting's keys are listed once, under the top level.
            if path.starts_with("services[].rateLimiting.") {
                continue;
            }
            assert!(md.contains(&format!("| `{shown}` |")), "no row for {path}");
        }
    }
}
