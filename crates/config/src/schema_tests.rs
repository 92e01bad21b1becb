//! The schema against the reader: a small validator for the subset of JSON Schema `schema()`
//! emits, the repository's config files, and every file of the config fuzz corpus.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use regex_automata::meta::Regex;
use serde_json::{json, Value};

use super::*;
use crate::{parse, yaml, ADMIN_TOKEN_ENV};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A YAML node as an editor's YAML server types it (YAML 1.2 core schema).
fn to_json(n: &yaml::Node) -> Value {
    match &n.kind {
        yaml::Kind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, _, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        yaml::Kind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        yaml::Kind::Scalar { value, quoted } if *quoted => json!(value),
        yaml::Kind::Scalar { value, .. } => plain(value),
    }
}

fn plain(v: &str) -> Value {
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return json!(true),
        "false" | "False" | "FALSE" => return json!(false),
        _ => {}
    }
    let unsigned = v.strip_prefix(['-', '+']).unwrap_or(v);
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = v.parse::<i64>() {
            return json!(i);
        }
    }
    if let Some(hex) = v.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return json!(i);
        }
    }
    if let Some(oct) = v.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return json!(i);
        }
    }
    let float = Regex::new(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$").unwrap();
    if float.is_match(v) {
        if let Ok(f) = v.parse::<f64>() {
            if f.is_finite() {
                return json!(f);
            }
        }
    }
    json!(v)
}

fn join(at: &str, key: &str) -> String {
    crate::read::join(at, key)
}

/// Problems of `v` against `s`; `unknown` collects the paths of keys refused by
/// `additionalProperties: false`.
fn check(s: &Value, v: &Value, at: &str, errs: &mut Vec<String>, unknown: &mut BTreeSet<String>) {
    if let Some(branches) = s.get("oneOf").and_then(Value::as_array) {
        // Exactly one branch matches; unknown keys are those of any branch (only an object
        // branch has them).
        let mut matched = 0;
        for b in branches {
            let mut e = Vec::new();
            check(b, v, at, &mut e, unknown);
            matched += usize::from(e.is_empty());
        }
        if matched != 1 {
            errs.push(format!("{at}: {v} matches {matched} of the oneOf branches"));
        }
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type in schema at {at}"),
        };
        let ok = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            other => panic!("type {other} at {at}"),
        });
        if !ok {
            errs.push(format!("{at}: {v} is not {t}"));
            return;
        }
    }
    if let Some(e) = s.get("enum") {
        if !e.as_array().unwrap().contains(v) {
            errs.push(format!("{at}: {v} is not one of {e}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if s.get("minimum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n < m)
        {
            errs.push(format!("{at}: {v} below the minimum"));
        }
        if s.get("maximum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n > m)
        {
            errs.push(format!("{at}: {v} above the maximum"));
        }
        if s.get("exclusiveMinimum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n <= m)
        {
            errs.push(format!("{at}: {v} not above the exclusive minimum"));
        }
    }
    if let (Some(text), Some(p)) = (v.as_str(), s.get("pattern").and_then(Value::as_str)) {
        if !Regex::new(p).unwrap().is_match(text) {
            errs.push(format!("{at}: {text:?} does not match {p}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for (k, item) in obj {
            let path = join(at, k);
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(ks), _) => check(ks, item, &path, errs, unknown),
                (None, Some(Value::Bool(false))) => {
                    errs.push(format!("{path}: unknown key"));
                    unknown.insert(path);
                }
                (None, Some(extra)) => check(extra, item, &path, errs, unknown),
                (None, None) => {}
            }
        }
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{at}: {r} is required"));
            }
        }
    }
    if let (Some(items), Some(is)) = (v.as_array(), s.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(is, item, &format!("{at}[{i}]"), errs, unknown);
        }
    }
}

/// (problems, unknown key paths) of a YAML text against the schema.
fn validate(text: &str) -> (Vec<String>, BTreeSet<String>) {
    let node = yaml::parse(text).unwrap_or_else(|e| panic!("YAML: {}: {text}", e.message));
    let (mut errs, mut unknown) = (Vec::new(), BTreeSet::new());
    check(&schema(), &to_json(&node), "", &mut errs, &mut unknown);
    (errs, unknown)
}

/// The keys the reader calls unknown.
fn reader_unknown(text: &str) -> BTreeSet<String> {
    match parse(text, "t") {
        Ok(_) => BTreeSet::new(),
        Err(e) => {
            e.0.into_iter()
                .filter(|e| e.message.starts_with("unknown key"))
                .map(|e| e.key)
                .collect()
        }
    }
}

#[test]
fn schema_is_draft_2020_12_with_the_reader_key_set() {
    let s = schema();
    assert_eq!(s["$schema"], DIALECT);
    assert_eq!(s["additionalProperties"], false);
    let svc = &s["properties"]["services"]["items"];
    assert_eq!(svc["additionalProperties"], false);
    assert_eq!(svc["required"], json!(["name", "path"]));
    assert_eq!(s["properties"]["gatewayPort"]["default"], "8000");
    assert_eq!(s["properties"]["healthCheckInterval"]["default"], 5);
    assert_eq!(
        s["properties"]["allowedUpgrades"]["default"],
        json!(["websocket"])
    );
    assert_eq!(
        s["properties"]["redis"]["properties"]["failureMode"]["enum"],
        json!(["open", "closed", null])
    );
    assert!(
        s["properties"]["authentication"]["properties"]["forwardClaims"]["additionalProperties"]
            .is_object()
    );
    for p in [UINT, NUMBER, DURATION, SIZE] {
        Regex::new(p).unwrap();
    }
}

/// Every config file in the repository is accepted by the reader and by the schema.
#[test]
fn schema_accepts_every_example_config() {
    let mut files: Vec<(String, String)> = Vec::new();
    let mut add = |name: String, text: String| files.push((name, text));
    for dir in ["config", "examples"] {
        for e in std::fs::read_dir(repo(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                add(
                    p.display().to_string(),
                    std::fs::read_to_string(&p).unwrap(),
                );
            }
        }
    }
    let docker = "deploy/docker/config.yaml";
    add(
        docker.into(),
        std::fs::read_to_string(repo(docker)).unwrap(),
    );
    let stack = std::fs::read_to_string(repo("deploy/stack/config.yaml.tmpl")).unwrap();
    let stack = [
        ("@CONSUL_PORT@", "8500"),
        ("@REDIS_PORT@", "6379"),
        ("@KEYS@", "/k"),
        ("@QUOTA@", "100"),
    ]
    .iter()
    .fold(stack, |t, (k, v)| t.replace(k, v));
    add("deploy/stack/config.yaml.tmpl".into(), stack);
    for e in corpus_dir_entries() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            add(
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            );
        }
    }
    // The demo's config, a format string in src/demo.rs.
    let demo = std::fs::read_to_string(repo("src/demo.rs")).unwrap();
    let start = demo
        .find("r#\"gatewayPort")
        .expect("src/demo.rs: no config_yaml template")
        + 3;
    let end = start + demo[start..].find("\"#").unwrap();
    let demo = [
        ("{port}", "8000"),
        ("{admin_port}", "9901"),
        ("{keys}", "/k"),
        ("{a}", "8081"),
        ("{b}", "8082"),
        ("{c}", "8083"),
        ("{{", "{"),
        ("}}", "}"),
    ]
    .iter()
    .fold(demo[start..end].to_string(), |t, (k, v)| t.replace(k, v));
    add("src/demo.rs config_yaml".into(), demo);
    assert!(files.len() >= 6, "{files:?}");
    for (name, text) in &files {
        if std::env::var(ADMIN_TOKEN_ENV).is_err() {
            if let Err(e) = parse(text, name) {
                panic!("the reader refuses {name}:\n{e}\n{text}");
            }
        }
        let (errs, _) = validate(text);
        assert!(
            errs.is_empty(),
            "the schema refuses {name}: {errs:#?}\n{text}"
        );
    }
    // The README's YAML examples (fragments of configs: only their keys and types are checked).
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let mut n = 0;
    for block in readme.split("```yaml\n").skip(1) {
        let text = &block[..block.find("```").unwrap()];
        if text.contains("services:") {
            let (errs, _) = validate(text);
            assert!(
                errs.is_empty(),
                "the schema refuses README's example: {errs:#?}\n{text}"
            );
            n += 1;
        }
    }
    assert!(n >= 2, "README's YAML examples not found");
}

/// On every file of the config fuzz corpus: what the reader accepts, the schema accepts, and
/// both refuse exactly the same keys.
#[test]
fn schema_and_reader_agree_on_the_fuzz_corpus() {
    let mut accepted = 0;
    let mut files = 0;
    for e in corpus_dir_entries() {
        let Ok(text) = std::fs::read_to_string(e.unwrap().path()) else {
            continue; // not UTF-8: the reader never sees it
        };
        if yaml::parse(&text).is_err() {
            continue;
        }
        // A mapping with a key twice has no JSON form (the reader refuses it anyway).
        if let Err(e) = parse(&text, "t") {
            if e.0.iter().any(|e| e.message == "duplicate key") {
                continue;
            }
        }
        files += 1;
        let (errs, unknown) = validate(&text);
        if parse(&text, "t").is_ok() {
            accepted += 1;
            assert!(
                errs.is_empty(),
                "the reader accepts but the schema refuses: {errs:#?}\n{text}"
            );
        }
        assert_eq!(
            unknown,
            reader_unknown(&text),
            "unknown keys differ for:\n{text}"
        );
    }
    assert!(
        files >= 3 && accepted >= 1,
        "{files} files, {accepted} accepted"
    );
}

/// Every declared key is known to the reader (given as null, which it treats as absent) and
/// the schema, and an undeclared key in any block is refused by both.
#[test]
fn every_declared_key_is_known_and_no_other() {
    fn nest(path: &str, leaf: &str) -> String {
        match path.split_once('.') {
            None => match path.strip_suffix("[]") {
                Some(p) => format!("{{{p}: [{{{leaf}}}]}}"),
                None => format!("{{{path}: {leaf}}}"),
            },
            Some((head, rest)) => {
                let inner = nest(rest, leaf);
                match head.strip_suffix("[]") {
                    Some(h) => format!("{{{h}: [{inner}]}}"),
                    None => format!("{{{head}: {inner}}}"),
                }
            }
        }
    }
    let mut blocks = vec![String::new()];
    for (path, d) in keys::all() {
        let text = nest(&path, "~");
        assert_eq!(reader_unknown(&text), BTreeSet::new(), "{path}: {text}");
        let (errs, unknown) = validate(&text);
        assert!(unknown.is_empty(), "{path}: {errs:?}");
        match d.kind {
            keys::Kind::Block(_) | keys::Kind::Switch(_) => blocks.push(path),
            keys::Kind::Blocks(_) => blocks.push(format!("{path}[]")),
            _ => {}
        }
    }
    for b in blocks {
        let text = if b.is_empty() {
            "zzzUnknown: 1\n".to_string()
        } else if b.ends_with("[]") {
            nest(b.trim_end_matches("[]"), "[{zzzUnknown: 1}]")
        } else {
            nest(&b, "{zzzUnknown: 1}")
        };
        let from_reader = reader_unknown(&text);
        let (_, from_schema) = validate(&text);
        assert_eq!(from_reader.len(), 1, "{b}: {text}");
        assert_eq!(from_reader, from_schema, "{b}: {text}");
    }
}

/// Values the reader accepts in forms an editor types differently (quoted numbers, bare
/// seconds, any-case methods, numbers as names, nulls) pass the schema too; values it refuses
/// for their type or range fail both.
#[test]
fn the_schema_accepts_what_the_reader_accepts() {
    let svc = "services:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n";
    for extra in [
        "gatewayPort: 8080",
        "gatewayPort: \" 8080 \"",
        "gatewayPort: \"+8080\"",
        "healthCheckInterval: \"7\"",
        "healthCheckInterval: 1h30m",
        "shutdownTimeout: 1.5h",
        "shutdownTimeout: \"250ms\"",
        "healthCheckTimeout: 2d",
        "maxBodySize: 10m",
        "maxBodySize: \"10 M\"",
        "maxBodySize: 123",
        "maxHeaderSize: 64k",
        "rateLimiting: {enabled: true, ratePerSecond: 0.5}",
        "rateLimiting: {enabled: true, ratePerSecond: \".5\"}",
        "rateLimiting: {enabled: true, ratePerSecond: 1e2, burst: \"7\"}",
        "adminToken:",
        "adminToken: ~",
        "consul: ~",
        "adminToken: 12345",
        "authentication: {issuer: true, forwardClaims: {role: X-Role, n: 5}}",
        "redis: {address: \"r:6379\", db: 15, tls: True}",
        "accessLog: FALSE",
        "accessLog: ~",
        "accessLog: {}",
        "accessLog: {enabled: true, format: json, path: /var/log/hexgate/access.log}",
        "accessLog: {format: text, path: ~}",
        "trustedProxies: [127.0.0.1, \"::1\"]",
        "allowedUpgrades: [WebSocket, h2c]",
        "gatewayBind: \"::\"",
    ] {
        let text = format!("{extra}\n{svc}");
        if let Err(e) = parse(&text, "t") {
            panic!("the reader refuses {extra:?}: {e}");
        }
        let (errs, _) = validate(&text);
        assert!(errs.is_empty(), "{extra:?}: {errs:?}");
    }
    let text = "services:\n  - name: 12\n    path: /a/\n    methods: [get, Post]\n    backends: [\"http://127.0.0.1:1\"]\n    quota: ~\n";
    parse(text, "t").unwrap();
    assert_eq!(validate(text).0, Vec::<String>::new());

    for extra in [
        "gatewayPort: 70000",
        "gatewayPort: -1",
        "accessLog: \"yes\"",
        "accessLog: 1",
        "accessLog: [true]",
        "accessLog: {format: xml}",
        "accessLog: {enabled: \"yes\"}",
        "loadBalancing: random",
        "authentication: {algorithms: [HS256]}",
        "rateLimiting: {ratePerSecond: 0}",
        "retries: 11",
        "tls: true",
        "services: {a: 1}",
        "redis: {db: 16}",
    ] {
        let text = format!("{extra}\n");
        assert!(parse(&text, "t").is_err(), "the reader accepts {extra:?}");
        assert!(
            !validate(&text).0.is_empty(),
            "the schema accepts {extra:?}"
        );
    }
}

/// The config fuzz corpus (`scripts/fuzz.sh`, not committed) when present, else the committed
/// configs in `config/`: the properties are checked on files either way.
fn corpus_dir_entries() -> std::fs::ReadDir {
    let corpus = repo("fuzz/corpus/config");
    match std::fs::read_dir(&corpus) {
        Ok(d) => d,
        Err(_) => std::fs::read_dir(repo("config")).expect("the repository's config/ directory"),
    }
}
