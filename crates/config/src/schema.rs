//! A JSON Schema (draft 2020-12) of the config file, rendered from the key declarations, for
//! editors (`# yaml-language-server: $schema=...`) and `hexgate config schema`.
//!
//! It matches the reader: the same keys everywhere (unknown keys are refused, the names under
//! `authentication.forwardClaims` excepted), and it never refuses a value the reader accepts. Every
//! key may be null (the reader treats `key:` as absent), a text key takes any scalar, numbers may
//! be quoted. Some checks stay with the reader (normalized paths, backend URLs, checks across keys).

use serde_json::{json, Map, Value};

use crate::keys::{self, DefaultValue, Item, KeyDecl, Kind};

/// The JSON Schema dialect.
pub const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// Digits, as the reader's whole numbers (Rust's `u64` parse, after trimming).
const UINT: &str = r"^\s*\+?[0-9]+\s*$";
/// A number as the reader parses it (Rust's `f64`).
const NUMBER: &str = r"^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$";
/// A bare number of seconds, or Go duration segments with `d` added.
const DURATION: &str = r"^\s*(\+?[0-9]+|(([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d))+)\s*$";
/// Bytes, or a number with a binary k, m or g suffix.
/// A name in a mapping of names (`plans`): letters, digits, `-`, `_`, `.`.
const NAME: &str = r"^[A-Za-z0-9._-]+$";
const SIZE: &str = r"^\s*\+?[0-9]+\s*[kKmMgG]?\s*$";

/// The schema of the whole config file.
pub fn schema() -> Value {
    let mut root = block(keys::TOP, true);
    root["$schema"] = json!(DIALECT);
    root["title"] = json!("HexGate configuration");
    root["description"] =
        json!("The HexGate config file (YAML, camelCase keys), from `hexgate config schema`.");
    root
}

/// Any scalar: the reader reads text keys and list items as the scalar's text.
fn scalar() -> Value {
    json!({"type": ["string", "number", "boolean", "null"]})
}

fn block(decls: &'static [KeyDecl], nullable: bool) -> Value {
    let mut props = Map::new();
    for d in decls {
        props.insert(d.name.into(), key(d));
    }
    let required: Vec<&str> = decls
        .iter()
        .filter(|d| d.required)
        .map(|d| d.name)
        .collect();
    let mut s = json!({
        "type": if nullable { json!(["object", "null"]) } else { json!("object") },
        "properties": props,
        "additionalProperties": false,
    });
    if !required.is_empty() {
        s["required"] = json!(required);
    }
    s
}

fn key(d: &KeyDecl) -> Value {
    let mut s = match d.kind {
        Kind::String => scalar(),
        Kind::Int { min, max } => whole(min, max),
        Kind::Port => whole(0, 65535),
        Kind::Number { min_exclusive } => json!({
            "type": ["number", "string", "null"],
            "exclusiveMinimum": min_exclusive,
            "pattern": NUMBER,
        }),
        Kind::Fraction => json!({
            "type": ["number", "string", "null"],
            "minimum": 0,
            "maximum": 1,
            "pattern": NUMBER,
        }),
        Kind::Bool => json!({"type": ["boolean", "null"]}),
        Kind::Duration => {
            json!({"type": ["integer", "string", "null"], "minimum": 0, "pattern": DURATION})
        }
        Kind::Size => json!({"type": ["integer", "string", "null"], "minimum": 0, "pattern": SIZE}),
        Kind::Ip => json!({"type": ["string", "null"]}),
        Kind::Enum(words) => {
            let mut e: Vec<Value> = words.iter().map(|w| json!(w)).collect();
            e.push(Value::Null);
            json!({ "enum": e })
        }
        Kind::List(item) => json!({"type": ["array", "null"], "items": list_item(item)}),
        Kind::Map => json!({"type": ["object", "null"], "additionalProperties": scalar()}),
        Kind::Block(children) => block(children, true),
        // `true`/`false` (or null), or the mapping.
        Kind::Switch(children) => json!({
            "oneOf": [{"type": ["boolean", "null"]}, block(children, false)],
        }),
        Kind::Blocks(children) => {
            json!({"type": ["array", "null"], "items": block(children, false)})
        }
        Kind::Named(children) => json!({
            "type": ["object", "null"],
            "propertyNames": {"pattern": NAME},
            "additionalProperties": block(children, false),
        }),
    };
    if !d.doc.is_empty() {
        s["description"] = json!(d.doc);
    }
    if let Some(v) = default(d) {
        s["default"] = v;
    }
    s
}

fn whole(min: u64, max: u64) -> Value {
    json!({"type": ["integer", "string", "null"], "minimum": min, "maximum": max, "pattern": UINT})
}

fn list_item(item: Item) -> Value {
    match item {
        Item::Any => scalar(),
        Item::OneOf(words) => json!({ "enum": words }),
        Item::OneOfAnyCase(words) => {
            // JSON Schema patterns have no case-insensitive flag: [Gg][Ee][Tt].
            let alts: Vec<String> = words
                .iter()
                .map(|w| {
                    w.chars()
                        .map(|c| {
                            if c.is_ascii_alphabetic() {
                                format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
                            } else {
                                c.to_string()
                            }
                        })
                        .collect()
                })
                .collect();
            json!({"type": "string", "pattern": format!("^({})$", alts.join("|"))})
        }
    }
}

/// A literal default as JSON, typed as the key's kind.
fn default(d: &KeyDecl) -> Option<Value> {
    let DefaultValue::Value(v) = d.default else {
        return None;
    };
    if let Some(s) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Some(json!(s));
    }
    let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    Some(match d.kind {
        Kind::Int { .. } | Kind::Port | Kind::Duration | Kind::Size if digits => {
            json!(v.parse::<u64>().ok()?)
        }
        Kind::Number { .. } | Kind::Fraction => json!(v.parse::<f64>().ok()?),
        Kind::Bool | Kind::Switch(_) => json!(v == "true"),
        Kind::List(_) | Kind::Blocks(_) => {
            let inner = v.strip_prefix('[')?.strip_suffix(']')?;
            json!(inner
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>())
        }
        Kind::Map | Kind::Named(_) => json!({}),
        _ => json!(v),
    })
}

#[cfg(test)]
#[path = "schema_tests.rs"]
mod tests;
