//! `requestHeaders` and `responseHeaders`: set, add and remove, with `${consumer}`,
//! `${request_id}`, `${client_ip}` and `${plan}` in values. Names were checked at load (no
//! hop-by-hop field, none of the gateway's own).
//!
//! Order: `remove`, then `set` (replaces every value), then `add` (appends). A variable with no
//! value (no consumer, no plan) is empty. A value that is not a valid header value once the
//! variables are in (a consumer name with a control character) is skipped and logged, never a
//! panic; a `set` still removes the field then, so a client's own value never survives a
//! `set` rule.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{HeaderRules, Piece, Template, Var};

/// What the variables of a rule's value stand for in one request.
pub struct Vars<'a> {
    pub consumer: Option<&'a str>,
    pub request_id: &'a str,
    pub client_ip: IpAddr,
    pub plan: Option<&'a str>,
}

/// A rule's value: built once when it has no variables.
#[derive(Debug)]
enum Value {
    Static(HeaderValue),
    Dynamic(Vec<Piece>),
}

impl Value {
    fn build(t: &Template) -> Option<Value> {
        if t.is_static() {
            // Checked at load; a value that still fails is dropped rather than sent broken.
            HeaderValue::from_str(&t.source).ok().map(Value::Static)
        } else {
            Some(Value::Dynamic(t.pieces.clone()))
        }
    }

    /// The value for this request; None when the variables make it invalid.
    fn render(&self, vars: &Vars) -> Option<HeaderValue> {
        match self {
            Value::Static(v) => Some(v.clone()),
            Value::Dynamic(pieces) => {
                let mut s = String::with_capacity(64);
                for p in pieces {
                    match p {
                        Piece::Text(t) => s.push_str(t),
                        Piece::Var(Var::Consumer) => s.push_str(vars.consumer.unwrap_or("")),
                        Piece::Var(Var::RequestId) => s.push_str(vars.request_id),
                        Piece::Var(Var::ClientIp) => {
                            let _ = write!(s, "{}", vars.client_ip);
                        }
                        Piece::Var(Var::Plan) => s.push_str(vars.plan.unwrap_or("")),
                    }
                }
                HeaderValue::from_str(&s).ok()
            }
        }
    }
}

/// One direction's rules, compiled.
#[derive(Debug, Default)]
pub struct RulesRt {
    pub cfg: HeaderRules,
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, Value)>,
    add: Vec<(HeaderName, Value)>,
}

impl RulesRt {
    pub fn build(cfg: &HeaderRules) -> RulesRt {
        // Names and static values were checked at load: one that still fails is left out.
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).ok();
        let pairs = |list: &[(String, Template)]| -> Vec<(HeaderName, Value)> {
            list.iter()
                .filter_map(|(n, t)| Some((name(n)?, Value::build(t)?)))
                .collect()
        };
        RulesRt {
            remove: cfg.remove.iter().filter_map(|n| name(n)).collect(),
            set: pairs(&cfg.set),
            add: pairs(&cfg.add),
            cfg: cfg.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies the rules to `headers`: remove, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap, vars: &Vars) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            match value.render(vars) {
                Some(v) => {
                    headers.insert(name.clone(), v);
                }
                None => {
                    headers.remove(name);
                    skipped(name, vars);
                }
            }
        }
        for (name, value) in &self.add {
            match value.render(vars) {
                Some(v) => {
                    headers.append(name.clone(), v);
                }
                None => skipped(name, vars),
            }
        }
    }
}

fn skipped(name: &HeaderName, vars: &Vars) {
    tracing::warn!(
        header = %name,
        request_id = vars.request_id,
        consumer = ?vars.consumer,
        plan = ?vars.plan,
        "header rule skipped: its value is not a valid header value once its variables are in"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Template {
        Template {
            source: s.to_string(),
            pieces: vec![Piece::Text(s.to_string())],
        }
    }

    fn vars_template() -> Template {
        Template {
            source: "c=${consumer} r=${request_id} ip=${client_ip} p=${plan}".into(),
            pieces: vec![
                Piece::Text("c=".into()),
                Piece::Var(Var::Consumer),
                Piece::Text(" r=".into()),
                Piece::Var(Var::RequestId),
                Piece::Text(" ip=".into()),
                Piece::Var(Var::ClientIp),
                Piece::Text(" p=".into()),
                Piece::Var(Var::Plan),
            ],
        }
    }

    fn vars<'a>(consumer: Option<&'a str>, plan: Option<&'a str>) -> Vars<'a> {
        Vars {
            consumer,
            request_id: "rid-1",
            client_ip: "2001:db8::1".parse().unwrap(),
            plan,
        }
    }

    fn rules() -> RulesRt {
        RulesRt::build(&HeaderRules {
            set: vec![
                ("x-env".into(), text("prod")),
                ("x-who".into(), vars_template()),
            ],
            add: vec![
                ("x-via".into(), text("hexgate")),
                ("x-also".into(), vars_template()),
            ],
            remove: vec!["server".into(), "x-via".into()],
        })
    }

    #[test]
    fn remove_then_set_then_add() {
        let r = rules();
        let mut h = HeaderMap::new();
        h.insert("server", HeaderValue::from_static("nginx"));
        h.append("x-env", HeaderValue::from_static("dev"));
        h.append("x-env", HeaderValue::from_static("test"));
        h.insert("x-via", HeaderValue::from_static("client"));
        r.apply(&mut h, &vars(Some("acme"), Some("pro")));
        assert!(!h.contains_key("server"));
        let all =
            |n: &str| -> Vec<&str> { h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect() };
        assert_eq!(all("x-env"), ["prod"], "set replaces every value");
        assert_eq!(all("x-via"), ["hexgate"], "removed, then added");
        assert_eq!(all("x-who"), ["c=acme r=rid-1 ip=2001:db8::1 p=pro"]);
        assert_eq!(all("x-also"), ["c=acme r=rid-1 ip=2001:db8::1 p=pro"]);
    }

    #[test]
    fn missing_variables_are_empty_and_bad_values_are_skipped() {
        let r = rules();
        let mut h = HeaderMap::new();
        r.apply(&mut h, &vars(None, None));
        assert_eq!(h["x-who"], "c= r=rid-1 ip=2001:db8::1 p=");
        let mut h = HeaderMap::new();
        h.insert("x-who", HeaderValue::from_static("spoofed"));
        r.apply(&mut h, &vars(Some("bad\nname"), None));
        assert!(!h.contains_key("x-who"), "a set never leaves the old value");
        assert!(!h.contains_key("x-also"));
        assert_eq!(h["x-env"], "prod");
    }

    #[test]
    fn empty_rules_are_empty() {
        assert!(RulesRt::build(&HeaderRules::default()).is_empty());
        assert!(!rules().is_empty());
    }
}
