//! A YAML 1.2 loader that keeps a [`Span`] on every node.
//!
//! `granit-parser` turns the text into events (`MappingStart`, `Scalar`, `Alias`, ...), each
//! with its source range. This module folds those events into a [`Node`] tree, applying the
//! rules GitHub's workflow reader follows and that a generic YAML library does not:
//!
//! - plain scalars are resolved with the YAML 1.2 *core* schema, so `on`, `yes` and `no` are
//!   strings while `true`, `null`, `3.10` are not; quoted scalars always stay strings;
//! - a mapping may not repeat a key (the error names both positions) and keys must be scalars;
//! - `<<` merge keys are rejected (GitHub's anchor support has none);
//! - aliases are expanded in place, under a total node budget and a depth limit, so a
//!   "billion laughs" file is an error instead of an out-of-memory;
//! - a file holds exactly one document.
//!
//! Problems that do not stop the parse (duplicate keys, merge keys) are all collected; a syntax
//! error stops it, since the event stream cannot continue past it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use granit_parser::{Event, Marker, Parser, ScalarStyle};

use crate::load::Diagnostic;
use crate::span::Span;

/// Most nodes a document may expand to, aliases included.
pub const NODE_BUDGET: usize = 200_000;
/// Deepest nesting a document may reach, aliases included.
pub const MAX_DEPTH: usize = 400;

/// A YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the node was written (for an expanded alias: where the alias was written).
    pub span: Span,
    /// What the node is.
    pub kind: NodeKind,
}

/// The resolved content of a [`Node`].
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// `null`, `~` or an empty value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer or float; `raw` is the text as written.
    Number {
        /// The numeric value.
        value: f64,
        /// The source text (`0x1F`, `3.10`).
        raw: String,
    },
    /// A string; `block` tells whether it was written as a `|` or `>` block scalar.
    String {
        /// The string value after escape processing.
        value: String,
        /// Whether it was written in quotes or as a block scalar (not plain).
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping with scalar keys, in document order, without duplicates.
    Map(Vec<(Spanned, Node)>),
}

/// A mapping key: its string form and position.
pub type Spanned = crate::span::Spanned<String>;

impl Node {
    /// The node's kind as a word for error messages ("a string", "a mapping").
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Null => "null",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Number { .. } => "a number",
            NodeKind::String { .. } => "a string",
            NodeKind::Seq(_) => "a sequence",
            NodeKind::Map(_) => "a mapping",
        }
    }

    /// The scalar's string form (`true`, `3.1`, `text`), or `None` for collections and null.
    ///
    /// Numbers are converted the way GitHub converts them: `3.10` is the number 3.1, so an
    /// `env` value or action input written `3.10` is the string `3.1` (a well-known trap that
    /// kiln reproduces rather than hides).
    pub fn scalar_string(&self) -> Option<String> {
        match &self.kind {
            NodeKind::Bool(b) => Some(b.to_string()),
            NodeKind::Number { value, .. } => Some(number_string(*value)),
            NodeKind::String { value, .. } => Some(value.clone()),
            _ => None,
        }
    }

    /// Looks up a key in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            NodeKind::Map(entries) => entries.iter().find(|(k, _)| k.value == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Converts the node into JSON (for values kiln records but does not interpret).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.kind {
            NodeKind::Null => serde_json::Value::Null,
            NodeKind::Bool(b) => serde_json::Value::Bool(*b),
            NodeKind::Number { value, .. } => number_json(*value),
            NodeKind::String { value, .. } => serde_json::Value::String(value.clone()),
            NodeKind::Seq(items) => {
                serde_json::Value::Array(items.iter().map(Node::to_json).collect())
            }
            NodeKind::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.value.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    fn count(&self) -> usize {
        match &self.kind {
            NodeKind::Seq(items) => 1 + items.iter().map(Node::count).sum::<usize>(),
            NodeKind::Map(entries) => 1 + entries.iter().map(|(_, v)| 1 + v.count()).sum::<usize>(),
            _ => 1,
        }
    }

    fn height(&self) -> usize {
        match &self.kind {
            NodeKind::Seq(items) => 1 + items.iter().map(Node::height).max().unwrap_or(0),
            NodeKind::Map(entries) => {
                1 + entries.iter().map(|(_, v)| v.height()).max().unwrap_or(0)
            }
            _ => 1,
        }
    }
}

/// The JSON form of a YAML number: integral values become JSON integers.
pub fn number_json(value: f64) -> serde_json::Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        #[allow(clippy::cast_possible_truncation)]
        let int = value as i64;
        serde_json::Value::from(int)
    } else {
        serde_json::Number::from_f64(value)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

fn number_string(value: f64) -> String {
    crate::value::number_to_string(value)
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
fn resolve_plain(text: &str) -> NodeKind {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return NodeKind::Null,
        "true" | "True" | "TRUE" => return NodeKind::Bool(true),
        "false" | "False" | "FALSE" => return NodeKind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return number(f64::INFINITY, text);
        }
        "-.inf" | "-.Inf" | "-.INF" => return number(f64::NEG_INFINITY, text),
        ".nan" | ".NaN" | ".NAN" => return number(f64::NAN, text),
        _ => {}
    }
    if let Some(hex) = text.strip_prefix("0x")
        && !hex.is_empty()
        && hex.chars().all(|c| c.is_ascii_hexdigit())
        && let Ok(v) = u64::from_str_radix(hex, 16)
    {
        return number(v as f64, text);
    }
    if let Some(oct) = text.strip_prefix("0o")
        && !oct.is_empty()
        && oct.chars().all(|c| matches!(c, '0'..='7'))
        && let Ok(v) = u64::from_str_radix(oct, 8)
    {
        return number(v as f64, text);
    }
    if (is_core_int(text) || is_core_float(text))
        && let Ok(v) = text.parse::<f64>()
    {
        return number(v, text);
    }
    NodeKind::String {
        value: text.to_owned(),
        quoted: false,
    }
}

fn number(value: f64, raw: &str) -> NodeKind {
    NodeKind::Number {
        value,
        raw: raw.to_owned(),
    }
}

/// `[-+]?[0-9]+`
fn is_core_int(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`
fn is_core_float(text: &str) -> bool {
    let s = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit()),
        Some((int, frac)) => {
            !int.is_empty()
                && int.bytes().all(|b| b.is_ascii_digit())
                && frac.bytes().all(|b| b.is_ascii_digit())
        }
        None => !mantissa.is_empty() && mantissa.bytes().all(|b| b.is_ascii_digit()),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(e) => is_core_int(e),
    };
    mantissa_ok && exponent_ok
}

enum Frame {
    Seq {
        start: Span,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        start: Span,
        anchor: usize,
        entries: Vec<(Spanned, Node)>,
        key: Option<Node>,
        seen: HashMap<String, Span>,
    },
}

struct Builder<'a> {
    file: Arc<str>,
    text: &'a str,
    line_starts: Vec<usize>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Node, usize, usize)>,
    nodes: usize,
    root: Option<Node>,
    documents: usize,
    diagnostics: Vec<Diagnostic>,
}

impl Builder<'_> {
    fn span_at(&self, start: &Marker, end: &Marker) -> Span {
        let start_byte = start
            .byte_offset()
            .unwrap_or_else(|| self.byte_of(start.line(), start.col()));
        let end_byte = end
            .byte_offset()
            .unwrap_or_else(|| self.byte_of(end.line(), end.col()));
        Span {
            file: self.file.clone(),
            line: u32::try_from(start.line()).unwrap_or(u32::MAX),
            col: u32::try_from(start.col() + 1).unwrap_or(u32::MAX),
            start: start_byte.min(self.text.len()),
            end: end_byte.clamp(start_byte.min(self.text.len()), self.text.len()),
        }
    }

    /// Byte offset of a 1-based line and 0-based character column.
    fn byte_of(&self, line: usize, col: usize) -> usize {
        let Some(&line_start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        self.text[line_start..]
            .char_indices()
            .nth(col)
            .map_or(self.text.len(), |(i, _)| line_start + i)
    }

    fn error(&mut self, span: Span, message: impl Into<String>, help: Option<String>) {
        self.diagnostics.push(Diagnostic {
            span,
            message: message.into(),
            help,
        });
    }

    /// Accounts for `n` new nodes; false once the budget is exhausted.
    fn spend(&mut self, n: usize, span: &Span) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > NODE_BUDGET {
            self.error(
                span.clone(),
                format!("Document expands to more than {NODE_BUDGET} nodes (aliases included)"),
                Some("deeply nested aliases are not allowed".into()),
            );
            return false;
        }
        true
    }

    /// Places a finished node into its parent (or makes it the root).
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { key, .. }) if key.is_none() => *key = Some(node),
            Some(Frame::Map {
                key, entries, seen, ..
            }) => {
                let Some(k) = key.take() else { return };
                let name = match &k.kind {
                    NodeKind::Seq(_) | NodeKind::Map(_) => {
                        let span = k.span.clone();
                        self.error(span, "Mapping keys must be scalars", None);
                        return;
                    }
                    NodeKind::Null => "null".to_owned(),
                    NodeKind::String { value, quoted } => {
                        if value == "<<" && !quoted {
                            let span = k.span.clone();
                            self.error(
                                span,
                                "Merge keys (`<<`) are not supported in workflow files",
                                Some("repeat the keys or use an alias as a whole value".into()),
                            );
                            return;
                        }
                        value.clone()
                    }
                    _ => k.scalar_string().unwrap_or_default(),
                };
                match seen.entry(name.clone()) {
                    Entry::Occupied(first) => {
                        let first = first.get().clone();
                        let span = k.span.clone();
                        self.error(
                            span,
                            format!("Duplicate key `{name}` (first defined at {first})"),
                            None,
                        );
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(k.span.clone());
                        entries.push((crate::span::Spanned::new(name, k.span), node));
                    }
                }
            }
        }
    }

    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            let count = node.count();
            let height = node.height();
            self.anchors.insert(anchor, (node.clone(), count, height));
        }
        self.push_node(node);
    }

    fn scalar(
        &mut self,
        value: &str,
        style: ScalarStyle,
        tag: Option<&granit_parser::Tag>,
        span: Span,
    ) -> Node {
        let kind = match tag.and_then(|t| t.core_suffix().map(str::to_owned)) {
            Some(suffix) => match suffix.as_str() {
                "str" => NodeKind::String {
                    value: value.to_owned(),
                    quoted: true,
                },
                "null" | "bool" | "int" | "float" => {
                    let resolved = resolve_plain(value);
                    let ok = matches!(
                        (&resolved, suffix.as_str()),
                        (NodeKind::Null, "null")
                            | (NodeKind::Bool(_), "bool")
                            | (NodeKind::Number { .. }, "int" | "float")
                    );
                    if !ok {
                        self.error(
                            span.clone(),
                            format!("Value `{value}` is not a valid `!!{suffix}`"),
                            None,
                        );
                    }
                    resolved
                }
                other => {
                    self.error(
                        span.clone(),
                        format!("Tag `!!{other}` is not allowed on a scalar"),
                        None,
                    );
                    NodeKind::Null
                }
            },
            None if tag.is_some() => {
                let shown = tag.map(|t| t.original()).unwrap_or_default();
                self.error(
                    span.clone(),
                    format!("Unsupported YAML tag `{shown}`"),
                    Some(
                        "workflow files may only use the core tags (`!!str`, `!!int`, ...)".into(),
                    ),
                );
                NodeKind::String {
                    value: value.to_owned(),
                    quoted: true,
                }
            }
            None => match style {
                ScalarStyle::Plain => resolve_plain(value),
                _ => NodeKind::String {
                    value: value.to_owned(),
                    quoted: true,
                },
            },
        };
        Node { span, kind }
    }

    fn handle(&mut self, event: Event<'_>, span: Span) -> bool {
        match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
            Event::DocumentStart(..) => {
                self.documents += 1;
                if self.documents > 1 {
                    self.error(
                        span,
                        "A workflow file must contain a single YAML document",
                        Some("remove the second `---` document".into()),
                    );
                    return false;
                }
            }
            Event::Scalar(value, style, anchor, tag) => {
                if !self.spend(1, &span) {
                    return false;
                }
                let node = self.scalar(&value, style, tag.as_deref(), span);
                self.finish(node, anchor);
            }
            Event::SequenceStart(_, anchor, tag) => {
                if !self.collection_tag(tag.as_deref(), "seq", &span) || !self.spend(1, &span) {
                    return false;
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.error(
                        span,
                        format!("Nesting deeper than {MAX_DEPTH} levels"),
                        None,
                    );
                    return false;
                }
                self.stack.push(Frame::Seq {
                    start: span,
                    anchor,
                    items: Vec::new(),
                });
            }
            Event::MappingStart(_, anchor, tag) => {
                if !self.collection_tag(tag.as_deref(), "map", &span) || !self.spend(1, &span) {
                    return false;
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.error(
                        span,
                        format!("Nesting deeper than {MAX_DEPTH} levels"),
                        None,
                    );
                    return false;
                }
                self.stack.push(Frame::Map {
                    start: span,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                    seen: HashMap::new(),
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return true;
                };
                let (node, anchor) = match frame {
                    Frame::Seq {
                        start,
                        anchor,
                        items,
                    } => (
                        Node {
                            span: join(start, &span),
                            kind: NodeKind::Seq(items),
                        },
                        anchor,
                    ),
                    Frame::Map {
                        start,
                        anchor,
                        entries,
                        ..
                    } => (
                        Node {
                            span: join(start, &span),
                            kind: NodeKind::Map(entries),
                        },
                        anchor,
                    ),
                };
                self.finish(node, anchor);
            }
            Event::Alias(id) => {
                let Some((node, count, height)) = self.anchors.get(&id).cloned() else {
                    self.error(span, "Alias refers to an unknown anchor", None);
                    return false;
                };
                if !self.spend(count, &span) {
                    return false;
                }
                if self.stack.len() + height > MAX_DEPTH {
                    self.error(
                        span,
                        format!("Alias expands deeper than {MAX_DEPTH} levels"),
                        None,
                    );
                    return false;
                }
                let mut node = node;
                node.span = span;
                self.push_node(node);
            }
            _ => {}
        }
        true
    }

    fn collection_tag(
        &mut self,
        tag: Option<&granit_parser::Tag>,
        expected: &str,
        span: &Span,
    ) -> bool {
        match tag {
            None => true,
            Some(t) if t.core_suffix() == Some(expected) => true,
            Some(t) => {
                self.error(
                    span.clone(),
                    format!("Unsupported YAML tag `{}`", t.original()),
                    None,
                );
                false
            }
        }
    }
}

fn join(start: Span, end: &Span) -> Span {
    Span {
        end: end.end.max(start.start),
        ..start
    }
}

/// Parses `text` (the contents of `file`) into a node tree.
///
/// Returns every problem found; a syntax error ends the parse, so it is the last one.
pub fn load(file: &str, text: &str) -> Result<Node, Vec<Diagnostic>> {
    let file: Arc<str> = Arc::from(file);
    let mut line_starts = vec![0];
    line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
    let mut builder = Builder {
        file: file.clone(),
        text,
        line_starts,
        stack: Vec::new(),
        anchors: HashMap::new(),
        nodes: 0,
        root: None,
        documents: 0,
        diagnostics: Vec::new(),
    };
    let mut options = granit_parser::Options::default();
    options.set_emit_comments(false);
    for next in Parser::new_from_str_with_options(text, options) {
        match next {
            Ok((event, span)) => {
                let span = builder.span_at(&span.start, &span.end);
                if !builder.handle(event, span) {
                    break;
                }
            }
            Err(err) => {
                let marker = err.marker();
                let span = builder.span_at(marker, marker);
                let mut message = err.kind().to_string();
                if let Some(first) = message.get(..1) {
                    message = first.to_uppercase() + &message[1..];
                }
                if message.is_empty() {
                    message = "Invalid YAML".to_owned();
                }
                builder.error(span, format!("Invalid YAML: {message}"), None);
                break;
            }
        }
    }
    if !builder.diagnostics.is_empty() {
        return Err(builder.diagnostics);
    }
    match builder.root {
        Some(root) => Ok(root),
        None => Err(vec![Diagnostic {
            span: Span::file_start(file),
            message: "The workflow file is empty".to_owned(),
            help: None,
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> NodeKind {
        load("t.yml", &format!("k: {text}\n"))
            .expect("valid yaml")
            .get("k")
            .expect("key k")
            .kind
            .clone()
    }

    #[test]
    fn core_schema_resolution() {
        assert_eq!(kind("true"), NodeKind::Bool(true));
        assert_eq!(kind("~"), NodeKind::Null);
        assert_eq!(kind(""), NodeKind::Null);
        assert!(matches!(kind("yes"), NodeKind::String { .. }));
        assert!(matches!(kind("on"), NodeKind::String { .. }));
        assert!(matches!(kind("'true'"), NodeKind::String { .. }));
        assert!(matches!(kind("0x1F"), NodeKind::Number { value, .. } if value == 31.0));
        assert!(matches!(kind("1e3"), NodeKind::Number { value, .. } if value == 1000.0));
        assert!(matches!(kind("3.10"), NodeKind::Number { value, .. } if value == 3.1));
        assert!(matches!(kind("1.2.3"), NodeKind::String { .. }));
        assert!(matches!(kind("0777"), NodeKind::Number { value, .. } if value == 777.0));
    }

    #[test]
    fn on_is_a_string_key() {
        let root = load("t.yml", "on: push\n").expect("valid");
        assert!(root.get("on").is_some());
    }

    #[test]
    fn number_strings_are_canonical_like_github() {
        let root = load("t.yml", "a: 3.10\nb: 0x10\nc: 1e2\n").expect("valid");
        let s = |k| root.get(k).and_then(Node::scalar_string).expect("scalar");
        assert_eq!(s("a"), "3.1");
        assert_eq!(s("b"), "16");
        assert_eq!(s("c"), "100");
    }

    #[test]
    fn spans_are_one_based_and_byte_exact() {
        let text = "a:\n  bé: value\n";
        let root = load("t.yml", text).expect("valid");
        let inner = root.get("a").expect("a");
        let NodeKind::Map(entries) = &inner.kind else {
            panic!("map expected")
        };
        let (key, value) = &entries[0];
        assert_eq!(key.span.to_string(), "t.yml:2:3");
        assert_eq!(value.span.to_string(), "t.yml:2:7");
        assert_eq!(&text[value.span.start..value.span.end], "value");
    }

    #[test]
    fn duplicate_keys_name_both_positions() {
        let errs = load("t.yml", "a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].span.to_string(), "t.yml:3:1");
        assert_eq!(
            errs[0].message,
            "Duplicate key `a` (first defined at t.yml:1:1)"
        );
    }

    #[test]
    fn all_duplicates_are_reported() {
        let errs = load("t.yml", "a: 1\na: 2\nb:\n  c: 1\n  c: 2\n").expect_err("dups");
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn merge_keys_are_rejected() {
        let errs = load("t.yml", "x: &x {a: 1}\ny:\n  <<: *x\n").expect_err("merge");
        assert!(errs[0].message.contains("Merge keys"), "{:?}", errs);
        assert_eq!(errs[0].span.to_string(), "t.yml:3:3");
    }

    #[test]
    fn aliases_expand() {
        let root = load("t.yml", "x: &x [1, 2]\ny: *x\n").expect("valid");
        let y = root.get("y").expect("y");
        assert_eq!(y.to_json(), serde_json::json!([1, 2]));
        assert_eq!(y.span.to_string(), "t.yml:2:4");
    }

    #[test]
    fn billion_laughs_is_rejected() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let errs = load("t.yml", &text).expect_err("budget");
        assert!(errs[0].message.contains("more than"), "{errs:?}");
    }

    #[test]
    fn second_document_is_rejected() {
        let errs = load("t.yml", "a: 1\n---\nb: 2\n").expect_err("two docs");
        assert!(errs[0].message.contains("single YAML document"));
    }

    #[test]
    fn syntax_error_has_position() {
        let errs = load("t.yml", "a: [1, 2\nb: 3\n").expect_err("syntax");
        assert!(errs[0].message.starts_with("Invalid YAML"), "{errs:?}");
        assert!(errs[0].span.line >= 1);
    }

    #[test]
    fn empty_file_is_an_error() {
        let errs = load("t.yml", "# nothing\n").expect_err("empty");
        assert_eq!(errs[0].message, "The workflow file is empty");
    }
}
