//! A YAML document as a small tree that remembers the line of every node, so every config error
//! can name its file, line and key.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One YAML node with the line (1-based) where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    pub line: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    /// A scalar; `quoted` is true for '...' and "..." scalars (always strings).
    Scalar {
        value: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Keys in document order, each with its own line.
    Map(Vec<(String, usize, Node)>),
}

impl Node {
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { value, quoted } => {
                if !*quoted && is_null(value) {
                    "null"
                } else {
                    "scalar"
                }
            }
            Kind::Seq(_) => "list",
            Kind::Map(_) => "mapping",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, quoted: false } if is_null(value))
    }
}

fn is_null(v: &str) -> bool {
    matches!(v, "" | "~" | "null" | "Null" | "NULL")
}

/// A YAML syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

enum Frame {
    Seq(usize, Vec<Node>),
    Map(usize, Vec<(String, usize, Node)>, Option<(String, usize)>),
}

/// Most nodes a document may build, aliases expanded: a few kilobytes of nested aliases would
/// otherwise expand into billions of nodes (the "billion laughs"), and the config, the API key
/// file and Consul values all go through here. Real configs have a few thousand.
const MAX_NODES: usize = 200_000;

/// The nodes in `n`, itself included.
fn size(n: &Node) -> usize {
    1 + match &n.kind {
        Kind::Scalar { .. } => 0,
        Kind::Seq(items) => items.iter().map(size).sum(),
        Kind::Map(entries) => entries.iter().map(|(_, _, v)| size(v)).sum(),
    }
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    /// Anchored nodes with their sizes.
    anchors: Vec<(usize, Node, usize)>,
    /// Nodes built so far, aliases expanded.
    nodes: usize,
    pending_anchor: Vec<usize>,
    error: Option<String>,
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, key)) => match key.take() {
                None => match node.kind {
                    Kind::Scalar { value, .. } => *key = Some((value, node.line)),
                    _ => {
                        if self.error.is_none() {
                            self.error = Some(format!(
                                "line {}: mapping keys must be plain strings",
                                node.line
                            ));
                        }
                        *key = Some((String::new(), node.line));
                    }
                },
                Some((k, kl)) => entries.push((k, kl, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(value, style, anchor, _) => {
                let quoted = matches!(
                    style,
                    TScalarStyle::SingleQuoted
                        | TScalarStyle::DoubleQuoted
                        | TScalarStyle::Literal
                        | TScalarStyle::Folded
                );
                let node = Node {
                    line,
                    kind: Kind::Scalar { value, quoted },
                };
                self.nodes += 1;
                if anchor > 0 {
                    self.anchors.push((anchor, node.clone(), 1));
                }
                self.push_node(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.pending_anchor.push(anchor);
                self.stack.push(Frame::Seq(line, Vec::new()));
            }
            Event::MappingStart(anchor, _) => {
                self.pending_anchor.push(anchor);
                self.stack.push(Frame::Map(line, Vec::new(), None));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let anchor = self.pending_anchor.pop().unwrap_or(0);
                let node = match self.stack.pop() {
                    Some(Frame::Seq(l, items)) => Node {
                        line: l,
                        kind: Kind::Seq(items),
                    },
                    Some(Frame::Map(l, entries, _)) => Node {
                        line: l,
                        kind: Kind::Map(entries),
                    },
                    None => return,
                };
                self.nodes += 1;
                if anchor > 0 {
                    let n = size(&node);
                    self.anchors.push((anchor, node.clone(), n));
                }
                self.push_node(node);
            }
            Event::Alias(id) => {
                let found = self.anchors.iter().rev().find(|(a, _, _)| *a == id);
                if let Some((_, _, n)) = found {
                    if self.nodes.saturating_add(*n) > MAX_NODES {
                        if self.error.is_none() {
                            self.error = Some(format!(
                                "line {line}: aliases expand to more than {MAX_NODES} nodes"
                            ));
                        }
                        return;
                    }
                    self.nodes += n;
                }
                let found = found.map(|(_, n, _)| n.clone());
                match found {
                    Some(mut n) => {
                        n.line = line;
                        self.push_node(n);
                    }
                    None => {
                        if self.error.is_none() {
                            self.error = Some(format!("line {line}: unknown alias"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Parses one YAML document. An empty document is an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| SyntaxError {
        line: e.marker().line(),
        col: e.marker().col() + 1,
        message: e.info().to_string(),
    })?;
    if let Some(message) = builder.error {
        return Err(SyntaxError {
            line: 0,
            col: 0,
            message,
        });
    }
    Ok(builder.root.unwrap_or(Node {
        line: 1,
        kind: Kind::Map(Vec::new()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_bombs_are_refused_quickly() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        let mut prev = "a".to_string();
        for l in ["b", "c", "d", "e", "f", "g", "h", "i"] {
            let refs = vec![format!("*{prev}"); 9].join(", ");
            text.push_str(&format!("{l}: &{l} [{refs}]\n"));
            prev = l.to_string();
        }
        // 9^9 nodes if expanded: refused once the budget is reached, before building them.
        let e = parse(&text).unwrap_err();
        assert!(
            e.message.contains("aliases expand to more than"),
            "{}",
            e.message
        );
        // Small aliases still work.
        let n = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        let Kind::Map(m) = n.kind else { panic!() };
        assert!(matches!(&m[1].2.kind, Kind::Seq(items) if items.len() == 2));
    }

    #[test]
    fn lines_are_one_based_and_flow_maps_work() {
        let n = parse("a: 1\nb:\n  c: {d: \"x\", e: [1, 2]}\n").unwrap();
        let Kind::Map(m) = n.kind else { panic!() };
        assert_eq!(m[0].0, "a");
        assert_eq!(m[0].1, 1);
        assert_eq!(m[1].1, 2);
        let Kind::Map(inner) = &m[1].2.kind else {
            panic!()
        };
        assert_eq!(inner[0].1, 3);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.line >= 1);
    }
}
